"""Prompt lookup: drafting by copying from the prompt and the output, behind the drafter seam."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import OFTEN
from test_adaptive import RandomPolicy
from test_decoder import MAX_TOKENS, assert_follows, prompt_ids

import decoder
import drafters
import policy


def history(prompt, first, generated=(), ngram_max=3):
    row = drafters.History(list(prompt), first, ngram_max)
    row.extend(list(generated))
    return row


def test_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    # Decoder-only (the first input is the prompt's last token): the prompt starts the output.
    assert history([5, 6, 7, 1, 6, 7, 2, 9, 6, 7], 7).lookup(2) == [2, 9]
    # "3 4 7" and "4 7" never occurred before; "7" last did before "2 3 4".
    assert history([5, 6, 7, 1, 8, 6, 7, 2, 3, 4, 7], 7).lookup(3) == [2, 3, 4]
    # The longest suffix wins over a more recent shorter one: "1 2" -> 3, not "2" -> 8.
    assert history([1, 2, 3, 4, 2, 8, 1, 2], 2).lookup(1) == [3]


def test_the_copy_runs_on_through_its_own_proposal():
    assert history([4, 5, 4, 5], 5).lookup(5) == [4, 5, 4, 5, 4]


def test_no_match_proposes_nothing():
    assert history([1, 2, 3], 3).lookup(4) == []
    assert history([1, 2, 3], 3).lookup(0) == []


def test_encoder_decoder_suffixes_come_from_the_output():
    """T5: the prompt is searched but a suffix is taken from the decoder's own tokens only."""
    prompt, start = [7, 8, 9, 3, 1], 0
    assert history(prompt, start).lookup(3) == []  # output: the start token alone, not in the prompt
    assert history(prompt, start, [8]).lookup(3) == [9, 3, 1]
    assert history(prompt, start, [8, 9, 4, 8]).lookup(2) == [9, 4]  # the output's own earlier "8"


class Echo:
    """A target whose output copies its prompt: each position's prompt token gets a large logit."""

    def __init__(self, inner, prompt):
        self.inner, self.prompt = inner, mx.array(prompt)
        self.vocab_size, self.eos_token_id, self.eos_token_ids = inner.vocab_size, inner.eos_token_id, inner.eos_token_ids

    def start(self, prompts):
        return self.inner.start(prompts)

    def decode(self, tokens, cache, padding=None):
        logits = self.inner.decode(tokens, cache, padding)
        positions = mx.array(cache.lengths)[:, None] - tokens.shape[1] + mx.arange(tokens.shape[1])
        wanted = self.prompt[mx.minimum(positions, self.prompt.size - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == wanted[..., None], 1e4, logits)


@pytest.fixture(scope="module")
def often(load_pair):
    target, _, tokenizer = load_pair(OFTEN)
    ids = prompt_ids(tokenizer)
    return target, ids, [list(decoder.generate(target, p, MAX_TOKENS)) for p in ids]


@pytest.mark.parametrize("schedule", ["adaptive", "constant"])
def test_greedy_output_is_the_targets(often, schedule):
    target, prompts, reference = often
    for ids, expected in zip(prompts, reference):
        stats = decoder.Stats()
        lookup = drafters.PromptLookupDrafter(3)
        tokens = list(decoder.speculative_generate(target, lookup, ids, MAX_TOKENS, num_draft=4, stats=stats,
                                                   schedule=schedule))
        assert tokens == expected
        assert stats.draft_calls == stats.drafted and stats.accepted <= stats.drafted


@pytest.mark.parametrize("batch_size", [2, 3])
def test_mixed_batches_equal_each_prompt_alone(often, batch_size):
    target, prompts, reference = often
    outputs = [[] for _ in prompts]
    for index, token in decoder.speculative_batch(target, drafters.PromptLookupDrafter(2), prompts, MAX_TOKENS,
                                                  batch_size=batch_size, schedule=RandomPolicy(batch_size)):
        outputs[index].append(token)
    assert outputs == reference


def test_an_answer_that_copies_its_prompt_is_mostly_accepted(often):
    target, prompts, _ = often
    ids = prompts[1]
    echo = Echo(target, ids)
    plain = list(decoder.generate(echo, ids, len(ids)))
    assert plain == ids  # the echo target does copy (the prompt ends with EOS)
    stats = decoder.Stats()
    tokens = list(decoder.speculative_generate(echo, drafters.PromptLookupDrafter(3), ids, len(ids), num_draft=5,
                                               stats=stats, schedule="constant"))
    assert tokens == plain
    assert stats.accepted >= 0.8 * stats.drafted and stats.drafted > 0
    assert stats.target_calls <= len(ids) / 3  # about one call per 6 tokens, after a first plain step


@pytest.mark.parametrize("draft", [0, 3, 7])
def test_point_mass_acceptance_yields_the_target_distribution(draft):
    """A deterministic draft x: accept with p(x), else sample p without x; the token is distributed as p."""
    rng = np.random.default_rng(2)
    sampling = decoder.Sampling(temperature=1.0, top_k=6)
    logits = mx.array(rng.normal(size=(2, 8)) * 1.5, dtype=mx.float32)
    p = decoder.distribution(logits, sampling)[None]
    drafts = mx.array([[draft]], mx.int32)
    emitted = []
    for key in mx.random.split(mx.random.key(11), 6000):
        count, token = decoder.sampled_accept(p, None, drafts, 0.0, key=key)
        emitted.append(mx.where(count[0] == 1, drafts[0, 0], token[0]))
    expected = np.asarray(p[0, 0])
    assert_follows(np.array(mx.stack(emitted)).astype(np.int64), expected)


def test_no_match_anywhere_decodes_plainly(often):
    """A drafter that never finds a match leaves every step a plain one."""
    target, prompts, reference = often
    stats = decoder.Stats()
    lookup = drafters.PromptLookupDrafter(3)
    lookup.available = lambda cap: 0
    tokens = list(decoder.speculative_generate(target, lookup, prompts[0], MAX_TOKENS, stats=stats,
                                               schedule=policy.ConstantPolicy(4)))
    assert tokens == reference[0] and stats.target_calls == stats.generated and stats.drafted == 0
