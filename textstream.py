"""Text of a growing token sequence, handed out in whole characters.

A byte-level BPE tokenizer splits a character whose UTF-8 bytes span several tokens
(an emoji, most CJK text) across them; decoding a prefix that ends inside such a
character gives U+FFFD for the incomplete bytes. Printing that would lose the character
for good, so the incomplete tail is held back until the tokens that complete it arrive,
or the sequence ends.
"""

REPLACEMENT = "\ufffd"


def text_of(tokenizer, tokens):
    """The text of tokens, special tokens (EOS) left out.

    Without transformers' clean-up of spaces (" n't" -> "n't"): sentencepiece keeps the
    spacing itself, and the clean-up could change text that has already been streamed.
    """
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """Feed tokens with `add`, get the new text in whole characters; `finish` gives the rest.

    What `add` and `finish` return, joined, is text_of(all tokens). Each call decodes a
    short window only, so a token costs the same however long the text grows: the window
    runs from the tokens before the last text handed out (context) to the newest, and its
    text less the context's text is new. Decoding pieces one by one would lose
    sentencepiece's spaces; a window loses its first piece's leading space in both texts
    alike, so the difference keeps it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = []
        self.context = 0  # where the window starts
        self.shown = 0  # tokens whose text is handed out: the window's context ends here

    def add(self, tokens):
        """The text that `tokens` complete; held back (until a later call) while it ends in an incomplete character."""
        self.tokens += tokens
        return self.take(final=False)

    def finish(self):
        """What is still held back (an incomplete character stays U+FFFD once the row ends)."""
        return self.take(final=True)

    def take(self, final):
        before = text_of(self.tokenizer, self.tokens[self.context : self.shown])
        text = text_of(self.tokenizer, self.tokens[self.context :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.context, self.shown = self.shown, len(self.tokens)
        return text[len(before) :]
