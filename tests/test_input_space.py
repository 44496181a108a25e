"""Regressions from trying the input space as a user would: each test is named after what it guards.

The drawn space itself is test_properties.py's; these pin the cases it first found.
"""

import json

import mlx.core as mx
import pytest
from conftest import OFTEN
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import json_lines as json_records
from test_cli import models  # noqa: F401  (a fixture: the tests' T5 pair as main.py flags)
from test_cli import run_main, write_lines

import decoder
import main
from textstream import REPLACEMENT, TextStream, text_of

PROMPTS = ["Return the number.", "hello", "A longer prompt about the items of the list"]


@pytest.fixture(scope="module")
def three_prompts(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("prompts") / "three.jsonl", [json.dumps({"prompt": p}) for p in PROMPTS])


@pytest.mark.parametrize("max_tokens, extra", [(2, []), (3, ["--temperature", "1", "--batch-size", "2"]),
                                               (2, ["--batch-size", "3"])])
def test_a_row_replaced_before_its_draft_ever_ran_does_not_crash(models, three_prompts, max_tokens, extra):
    # The first prompt ends on plain (k 0) steps, so the draft's cache has decoded nothing
    # when the next prompt replaces its row: MLX's scatter into that empty cache raised SIGFPE.
    result = run_main(*models, "--prompt-file", three_prompts, "--max-tokens", max_tokens, "--json", *extra)
    records = json_records(result)
    assert [r["prompt"] for r in records] == PROMPTS
    if "--temperature" not in extra:
        plain = json_records(run_main(*models, "--prompt-file", three_prompts, "--max-tokens", max_tokens,
                                      "--json", "--regular-decode"))
        assert [r["tokens"] for r in records] == [r["tokens"] for r in plain]


class OracleDrafter:
    """Proposes each row's known continuation: every draft is the target's own greedy token."""

    def __init__(self, continuations):
        self.continuations, self.emitted = continuations, []

    def start(self, prompts, firsts):
        self.emitted = [0] * len(prompts)

    def available(self, cap):
        return cap

    def propose(self, newest, k, sampling):
        drafts = [(c[at:] + [0] * k)[:k] for c, at in zip(self.continuations, self.emitted)]
        return mx.array(drafts, mx.int32), None, None

    def settle(self, newest, k, accepted, proposed, verdicts):
        self.emitted = [at + count + 1 for at, count in zip(self.emitted, accepted)]


@pytest.fixture
def eos_third(load_pair):
    """A T5 target whose EOS is the third token of its greedy output for a prompt: (target, prompt, output)."""
    target, _, tokenizer = load_pair(OFTEN)
    prompt = tokenizer(PROMPTS[2]).input_ids
    output = list(decoder.generate(target, prompt, 8))
    assert len(set(output[:3])) == 3, "the test needs three distinct first tokens"
    kept = target.args.eos_token_id
    target.args.eos_token_id = output[2]
    yield target, prompt, output
    target.args.eos_token_id = kept


def test_drafts_after_an_accepted_eos_are_not_counted(eos_third):
    target, prompt, output = eos_third
    stats = decoder.Stats()
    steps = list(decoder.speculative_steps(target, OracleDrafter([output]), [prompt], 8,
                                           decoder.make_policy("constant", 5), stats=[stats]))
    # One step: five drafts proposed, all the target's own; output ends at the third, EOS.
    assert [s.tokens for s in steps] == [output[:3]]
    assert (stats.generated, stats.drafted, stats.accepted, stats.target_calls) == (3, 3, 3, 1)
    assert (steps[0].drafted, steps[0].accepted) == (3, 3)


def test_plain_decoding_counts_the_passes_whose_tokens_it_read(eos_third):
    target, prompt, output = eos_third
    stats = decoder.Stats()
    assert list(decoder.generate(target, prompt, 8, stats=stats)) == output[:3]
    assert stats.target_calls == stats.generated == 3


@pytest.fixture(scope="module")
def bpe_tokenizer(load_pair):
    return load_pair(OFTEN, family="gpt2")[2]


TEXT = "naïve café: 🙂 and 世界, ok"


def test_streaming_keeps_characters_split_across_tokens(bpe_tokenizer, capsys):
    ids = bpe_tokenizer(TEXT).input_ids
    assert any(REPLACEMENT in text_of(bpe_tokenizer, ids[:n]) for n in range(len(ids))), "no split character"
    steps = [decoder.Step(0, [token], 0, 0, 0, n == len(ids) - 1, 0.0, 0.0) for n, token in enumerate(ids)]
    stats = [decoder.Stats(generated=len(ids), target_calls=len(ids), seconds=1.0)]
    main.stream(steps, bpe_tokenizer, stats, speculative=False)
    assert capsys.readouterr().out.startswith(TEXT + "\n")


@pytest.fixture(scope="module")
def tokenizers(load_pair):
    """kind -> a tokenizer of the tests' pairs: byte-level BPE (GPT-2's kind) and sentencepiece (T5's)."""
    return {"bpe": load_pair(OFTEN, family="gpt2")[2], "sentencepiece": load_pair(OFTEN, family="t5")[2]}


def streamed(stream, ids, cuts):
    """The pieces a TextStream hands out for `ids` fed in chunks of `cuts` tokens (the rest in one), then finish."""
    pieces, at = [], 0
    for size in cuts + [len(ids)]:
        pieces.append(stream.add(ids[at : at + size]))
        at += size
    return pieces + [stream.finish()]


@settings(max_examples=40)
@given(kind=st.sampled_from(["bpe", "sentencepiece"]),
       text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
       cuts=st.lists(st.integers(1, 4), max_size=30))
def test_text_stream_hands_out_whole_characters_that_join_to_the_text(tokenizers, kind, text, cuts):
    tokenizer = tokenizers[kind]
    ids = tokenizer(text).input_ids
    pieces = streamed(TextStream(tokenizer), ids, cuts)
    assert "".join(pieces) == text_of(tokenizer, ids)
    assert all(REPLACEMENT not in piece for piece in pieces[:-1]) or REPLACEMENT in text


@settings(max_examples=40)
@given(kind=st.sampled_from(["bpe", "sentencepiece"]), data=st.data(), cuts=st.lists(st.integers(1, 5), max_size=30))
def test_text_stream_of_any_tokens_joins_to_their_text(tokenizers, kind, data, cuts):
    """Any token ids a model may emit (special ones, bytes that never complete a character): the pieces join
    to the whole sequence's text."""
    tokenizer = tokenizers[kind]
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=60))
    assert "".join(streamed(TextStream(tokenizer), ids, cuts)) == text_of(tokenizer, ids)


class CountingTokenizer:
    """A tokenizer that records how many tokens each decode call is given."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, []

    def decode(self, tokens, **options):
        self.decoded.append(len(tokens))
        return self.inner.decode(tokens, **options)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_text_stream_decodes_a_window_whatever_the_length(tokenizers, kind):
    """Streaming 600 tokens three at a time decodes a few steps' tokens at most (the last two, and those an
    incomplete character held back): the cost of a step does not grow with the text."""
    tokenizer = CountingTokenizer(tokenizers[kind])
    ids = tokenizers[kind](" ".join(["the quick brown fox, naïve café 🙂"] * 60)).input_ids[:600]
    assert len(ids) == 600
    pieces = streamed(TextStream(tokenizer), ids, [3] * 200)
    assert "".join(pieces) == text_of(tokenizers[kind], ids)
    assert max(tokenizer.decoded) <= 18


def test_an_empty_prompt_is_a_prompt(models):
    records = json_records(run_main(*models, "--prompt", "", "--max-tokens", 4, "--json"))
    plain = json_records(run_main(*models, "--prompt", "", "--max-tokens", 4, "--json", "--regular-decode"))
    assert records[0]["prompt"] == "" and records[0]["tokens"] == plain[0]["tokens"]


def test_a_prompt_file_with_a_byte_order_mark_is_read(models, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"prompt": "hello"}).encode() + b"\n")
    records = json_records(run_main(*models, "--prompt-file", path, "--max-tokens", 3, "--json"))
    assert [r["prompt"] for r in records] == ["hello"]
