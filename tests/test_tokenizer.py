"""tokenizer.py: the run-time tokenizers give transformers' ids and text, without importing it."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from hypothesis import example, given, settings
from hypothesis import strategies as st

import synthetic
import tokenizer

transformers = pytest.importorskip("transformers")

# Words of the tokenizer's training text, and what it never saw: emoji, CJK, accents, spacing.
PIECES = ["Return", " the", " number", " of", " items", ".", " dictionary", "😀", "👍🏽", "日本語", "中文", "한국어",
          "é", "ß", "Ωμέγα", " ", "  ", "\n", "\t", "'", " n't", ",", "123", "<", ">", "_", "-"]
TEXT = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
)
CHOSEN = ["Return the number of items.", "", " hello  world ", "日本語 😀 emoji", "a\nb\tc", "x <extra_id_0> y"]


def spiece_only(folder):
    """The T5 tokenizer's folder without tokenizer.json: what sentencepiece reads."""
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copyfile(synthetic.cached_tokenizer() / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"t5": synthetic.cached_tokenizer(), "bpe": synthetic.cached_tokenizer(kind="bpe"),
            "spiece": spiece_only(tmp_path_factory.mktemp("spiece"))}


class Pairs(dict):
    def __repr__(self):  # hypothesis prints its arguments; transformers' tokenizers print their whole vocabulary
        return "pairs"


@pytest.fixture(scope="module")
def pairs(folders):
    """kind -> (ours, transformers' AutoTokenizer) for the same folder."""
    return Pairs({kind: (tokenizer.load(f), transformers.AutoTokenizer.from_pretrained(str(f)))
                  for kind, f in folders.items()})


def test_each_folder_takes_its_path(pairs):
    assert type(pairs["t5"][0]) is tokenizer.FastTokenizer and type(pairs["bpe"][0]) is tokenizer.FastTokenizer
    # spiece.model alone: transformers' own (sentencepiece breaks ties between pieces differently).
    assert not isinstance(pairs["spiece"][0], tokenizer.Tokenizer)


@pytest.mark.parametrize("kind", ["t5", "bpe"])
def test_vocabulary_and_special_tokens_match(pairs, kind):
    ours, theirs = pairs[kind]
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs)
    for name in ("eos_token_id", "pad_token_id", "unk_token_id", "bos_token_id", "chat_template"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("kind", ["t5", "bpe"])
@settings(max_examples=150, deadline=None)
@given(text=TEXT)
@example(text=CHOSEN[0]).via("chosen")
@example(text=CHOSEN[1]).via("chosen")
@example(text=CHOSEN[2]).via("chosen")
@example(text=CHOSEN[3]).via("chosen")
@example(text=CHOSEN[4]).via("chosen")
@example(text=CHOSEN[5]).via("chosen")
def test_ids_and_text_equal_transformers(pairs, kind, text):
    ours, theirs = pairs[kind]
    ids = ours(text).input_ids
    assert ids == theirs(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    if kind == "t5":  # T5 appends EOS (id 1); the byte-level BPE adds nothing
        assert ids[-1] == 1 and 1 not in ids[:-1]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
            theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert ours.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True) == \
        theirs.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("kind", ["t5", "bpe"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_ids_decode_as_transformers_does(pairs, kind, data):
    ours, theirs = pairs[kind]
    ids = data.draw(st.lists(st.integers(0, len(theirs) - 1), max_size=20))
    assert ours.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == \
        theirs.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_a_chat_template_loads_transformers_tokenizer(tmp_path):
    for file in synthetic.cached_tokenizer(kind="bpe").iterdir():
        shutil.copyfile(file, tmp_path / file.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = tokenizer.load(tmp_path)
    assert not isinstance(loaded, tokenizer.Tokenizer)
    text = loaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "user: Hi\n"


def test_other_attributes_come_from_transformers(pairs):
    ours, theirs = pairs["t5"]
    assert ours.convert_tokens_to_ids(["<extra_id_0>", "</s>"]) == theirs.convert_tokens_to_ids(["<extra_id_0>", "</s>"])
    assert ours.all_special_ids == theirs.all_special_ids


def test_a_damaged_tokenizer_json_still_fails(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(Exception):
        tokenizer.load(tmp_path)


def test_main_decodes_without_importing_transformers_or_torch(pair_dirs):
    target, draft = pair_dirs(0.05)
    code = ("import sys, main; main.main(['--model', sys.argv[1], '--draft-model', sys.argv[2], '--max-tokens', '3']); "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(target), str(draft)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
