"""Run-time tokenizers, loaded in milliseconds without importing transformers or torch.

A converted folder's tokenizer.json (T5's, GPT-2's, a byte-level BPE's) is read with the
`tokenizers` package, which gives the ids and the text transformers' AutoTokenizer gives
for the same folder (tests/test_tokenizer.py compares them; T5's appends EOS).
transformers stays the reference: a folder whose tokenizer needs more than tokenizer.json
describes (a chat template, a tokenizer class whose flags transformers applies on top of
it, a T5 folder with only spiece.model) loads with transformers, and anything else a
caller asks of a fast tokenizer (say `convert_tokens_to_ids`) is answered by
transformers' tokenizer of the same folder, loaded on first use.

    tok = tokenizer.load("mlx_models/t5-small")
    ids = tok("translate English to German: Hi").input_ids   # a list of ints, EOS last for T5
    text = tok.decode(ids, skip_special_tokens=True)
"""

import json
from pathlib import Path

# tokenizer_config.json classes whose whole pipeline is in tokenizer.json (no flags of
# transformers' own on top); None: the file names no class.
PLAIN_CLASSES = {None, "T5Tokenizer", "T5TokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast",
                 "PreTrainedTokenizerFast", "TokenizersBackend"}
# Flags transformers applies to the tokenizer itself, whatever tokenizer.json says.
OWN_FLAGS = ("add_bos_token", "add_eos_token", "add_prefix_space", "do_lower_case", "legacy")
SPECIAL = ("bos", "eos", "unk", "pad")


class Encoding(dict):
    """What calling a tokenizer returns: {"input_ids": [...]}, also as `.input_ids`."""

    @property
    def input_ids(self):
        return self["input_ids"]


def check_text(text):
    """A ValueError naming the first lone surrogate in `text` (JSON's "\\ud800" escape, or a byte that
    was not UTF-8 in a command line's arguments): such a string is not Unicode text and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"not valid Unicode: a lone surrogate (U+{ord(text[error.start]):04X}) "
                         f"at character {error.start}") from None


def token_text(value):
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """What main.py, benchmark.py and the decoding callers use of a tokenizer:
    tokenizer(text).input_ids, encode, decode(ids, skip_special_tokens,
    clean_up_tokenization_spaces), get_vocab(), len(), bos/eos/unk/pad_token(_id).
    Any other attribute comes from transformers' tokenizer of the same folder, loaded once.
    """

    chat_template = None  # load() gives a folder with one to transformers

    def __init__(self, folder, config):
        self.folder, self.config = Path(folder), config
        self._reference = None
        for kind in SPECIAL:
            text = token_text(config.get(f"{kind}_token"))
            if isinstance(text, str) and self.token_to_id(text) is not None:
                setattr(self, f"{kind}_token", text)
                setattr(self, f"{kind}_token_id", self.token_to_id(text))

    def __call__(self, text, add_special_tokens=True):
        return Encoding(input_ids=self.encode(text, add_special_tokens))

    def __len__(self):
        return len(self.get_vocab())

    def reference(self):
        """transformers' tokenizer of this folder (imports transformers on first use)."""
        if self._reference is None:
            self._reference = reference_tokenizer(self.folder)
        return self._reference

    def __getattr__(self, name):
        if name.startswith("_"):  # not during construction or copying
            raise AttributeError(name)
        return getattr(self.reference(), name)

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        """The text of `ids` (a list of ints); transformers' clean-up of spaces, when asked, is its own."""
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.config.get("clean_up_tokenization_spaces", False)
        if clean_up_tokenization_spaces:
            return self.reference().decode(ids, skip_special_tokens=skip_special_tokens,
                                           clean_up_tokenization_spaces=True)
        return self.text(list(ids), skip_special_tokens)


class FastTokenizer(Tokenizer):
    """A tokenizer.json read with the `tokenizers` package (what transformers' fast tokenizers wrap)."""

    def __init__(self, folder, config):
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(str(Path(folder) / "tokenizer.json"))
        super().__init__(folder, config)

    def encode(self, text, add_special_tokens=True):
        check_text(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def text(self, ids, skip_special_tokens):
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self):
        return self.backend.get_vocab(with_added_tokens=True)

    def token_to_id(self, token):
        return self.backend.token_to_id(token)


def read_config(folder):
    """tokenizer_config.json as a dict ({} if the folder has none)."""
    path = Path(folder) / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def chat_template(folder, config):
    """The folder's chat template (Jinja text): tokenizer_config.json's `chat_template`, else the
    chat_template.jinja file current transformers saves it in; None when it has neither."""
    path = Path(folder) / "chat_template.jinja"
    if config.get("chat_template"):
        return config["chat_template"]
    return path.read_text(encoding="utf-8") if path.is_file() else None


def needs_transformers(folder, config):
    """Why the folder's tokenizer must come from transformers, or None when its files say it all."""
    if chat_template(folder, config) is not None or any(Path(folder).glob("chat_template.*")):
        return "a chat template"
    if config.get("tokenizer_class") not in PLAIN_CLASSES:
        return f"tokenizer class {config['tokenizer_class']}"
    flags = [flag for flag in OWN_FLAGS if flag in config]
    return f"transformers' own flags ({', '.join(flags)})" if flags else None


def load(folder):
    """The tokenizer of a model folder: fast where its files allow, else transformers'.

    Raises whatever the library that reads the files raises for a damaged file
    (model.load turns it into one line).
    """
    folder = Path(folder)
    config = read_config(folder)
    if needs_transformers(folder, config):
        loaded = reference_tokenizer(folder)
        if not getattr(loaded, "chat_template", None):  # a transformers too old to read chat_template.jinja
            loaded.chat_template = chat_template(folder, config)
        return loaded
    if (folder / "tokenizer.json").is_file():
        try:
            return FastTokenizer(folder, config)
        except Exception:  # a file `tokenizers` cannot read: transformers may, or says why not
            return reference_tokenizer(folder)
    # A T5 folder with spiece.model alone: sentencepiece's own segmentation breaks ties
    # between equal-scoring pieces differently from the pipeline transformers builds from
    # it (next to a run of unknown characters: "Ωμέγα>>>" is ">>", ">" to one, ">", ">>" to the
    # other), so transformers stays its tokenizer. convert.py copies tokenizer.json when the
    # checkpoint has one, as Google's T5 checkpoints on the hub do.
    return reference_tokenizer(folder)


def reference_tokenizer(folder):
    """transformers' AutoTokenizer for the folder (imports transformers: about 1.6 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
