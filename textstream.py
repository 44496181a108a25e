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

    The whole list is decoded each time: sentencepiece pieces decoded one by one lose
    their spaces. What `add` and `finish` return, joined, is text_of(all tokens).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens = []
        self.shown = 0  # characters of the text handed out so far

    def add(self, tokens):
        """The text that `tokens` complete, without a trailing incomplete character."""
        self.tokens += tokens
        text = text_of(self.tokenizer, self.tokens)
        complete = len(text.rstrip(REPLACEMENT))
        return self.take(text, complete)

    def finish(self):
        """What is still held back (an incomplete character stays U+FFFD once the row ends)."""
        text = text_of(self.tokenizer, self.tokens)
        return self.take(text, len(text))

    def take(self, text, end):
        new = text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return new
