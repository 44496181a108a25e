"""Speculative decoding when k changes from step to step: the adaptive schedule and k = 0 steps."""

import random

import mlx.core as mx
import numpy as np
import pytest
from conftest import OFTEN, RARELY
from test_decoder import MAX_TOKENS, PROMPTS, assert_follows, prompt_ids

import decoder
import policy


class RandomPolicy:
    """Draws k uniformly from 0..cap each step (seeded): k = 0 steps and every change of k."""

    def __init__(self, seed, num_draft=6):
        self.rng, self.num_draft, self.chosen = random.Random(seed), num_draft, []

    def choose(self, rows, cap):
        self.chosen.append(self.rng.randint(0, min(self.num_draft, cap)))
        return self.chosen[-1]

    def observe(self, rows, k, drafted, accepted, seconds):
        pass

    def forget(self, row):
        pass


@pytest.fixture(scope="module")
def often(load_pair):
    target, draft, tokenizer = load_pair(OFTEN)
    ids = prompt_ids(tokenizer)
    return target, draft, ids, [list(decoder.generate(target, p, MAX_TOKENS)) for p in ids]


@pytest.mark.parametrize("calibrated", [False, True])
def test_adaptive_greedy_equals_target_greedy(often, calibrated):
    """Uncalibrated (costs measured as it runs), or from stored costs under which drafting pays
    (the tiny pair's own seldom do: its draft costs about what its target does)."""
    target, draft, prompts, reference = often
    costs = policy.StepCosts({1: policy.Components(0.0, 1e-5, {1: 1e-3, 9: 1.1e-3})}) if calibrated else None
    chosen = policy.AdaptivePolicy(8, costs)
    drafted = []
    for _ in range(2):  # the second round runs on costs measured in the first
        for ids, expected in zip(prompts, reference):
            stats = decoder.Stats()
            tokens = list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, stats=stats, schedule=chosen))
            assert tokens == expected
            assert stats.generated == len(tokens) and stats.accepted <= stats.drafted
            drafted.append(stats.drafted)
    assert sum(drafted) > 0  # it did draft
    if calibrated:
        assert min(drafted) > 0  # every prompt: stored costs say drafting pays from the first step


@pytest.mark.parametrize("seed", range(4))
def test_greedy_output_is_exact_whatever_k_each_step(often, seed):
    target, draft, prompts, reference = often
    chooser = RandomPolicy(seed)
    for ids, expected in zip(prompts, reference):
        assert list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, schedule=chooser)) == expected
    assert 0 in chooser.chosen and len(set(chooser.chosen)) >= 4


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batches_with_changing_k_equal_each_prompt_alone(often, batch_size):
    target, draft, prompts, reference = often
    outputs = [[] for _ in prompts]
    for index, token in decoder.speculative_batch(target, draft, prompts, MAX_TOKENS, batch_size=batch_size,
                                                  schedule=RandomPolicy(batch_size)):
        outputs[index].append(token)
    assert outputs == reference


def test_k_zero_steps_are_plain_target_steps(often):
    """A schedule of k = 0 only: one target call per token, nothing drafted."""
    target, draft, prompts, reference = often
    stats = decoder.Stats()
    zero = policy.ConstantPolicy(0)
    assert list(decoder.speculative_generate(target, draft, prompts[0], MAX_TOKENS, stats=stats, schedule=zero)) \
        == reference[0]
    assert stats.target_calls == stats.generated and stats.drafted == stats.draft_calls == 0


def test_steps_report_what_callers_need(often):
    target, draft, prompts, reference = often
    records = list(decoder.speculative_steps(target, decoder.as_drafter(draft), prompts, MAX_TOKENS,
                                             RandomPolicy(9), batch_size=2))
    for index, expected in enumerate(reference):
        mine = [r for r in records if r.index == index]
        assert [t for r in mine for t in r.tokens] == expected
        assert [r.finished for r in mine] == [False] * (len(mine) - 1) + [True]
        for r in mine:
            assert 0 <= r.accepted <= r.drafted <= r.num_draft and 1 <= len(r.tokens) <= r.accepted + 1
            assert 0 <= r.host_seconds <= r.seconds


def test_sampled_tokens_follow_the_target_when_k_changes(load_pair):
    """The first two tokens under a random k per step are distributed as the target's own two."""
    target, draft, tokenizer = load_pair(RARELY)
    ids = tokenizer(PROMPTS[0]).input_ids
    sampling = decoder.Sampling(temperature=1.0, top_k=4)
    cache, (first,) = target.start([ids])
    p1 = np.asarray(decoder.distribution(target.decode(mx.array([[first]]), cache)[0, -1], sampling))
    # The second token's marginal: sum over first tokens x of p(x) * p(. | x).
    p2 = np.zeros_like(p1)
    for x in np.flatnonzero(p1):
        cache, _ = target.start([ids])
        logits = target.decode(mx.array([[first, int(x)]]), cache)[0, -1]
        p2 += p1[x] * np.asarray(decoder.distribution(logits, sampling))
    mx.random.seed(4)
    chooser = RandomPolicy(4, num_draft=3)
    pairs = [list(decoder.speculative_generate(target, draft, ids, 2, sampling=sampling, schedule=chooser))
             for _ in range(1500)]
    assert 0 in chooser.chosen and 1 in chooser.chosen
    assert_follows(np.array([p[0] for p in pairs]), p1)
    assert_follows(np.array([p[1] for p in pairs]), p2 / p2.sum())


class Counting:
    """A target that counts its decode calls (everything else passes through)."""

    def __init__(self, target):
        self.target, self.calls = target, 0

    def __getattr__(self, name):
        return getattr(self.target, name)

    def decode(self, *args, **kwargs):
        self.calls += 1
        return self.target.decode(*args, **kwargs)


@pytest.mark.parametrize("draft_too", [True, False])
def test_plain_steps_are_queued_before_the_read(often, draft_too):
    """As in plain decoding, a k = 0 step's successor is queued before the step is read (with a draft
    model drafting nothing, or with none)."""
    target, draft, prompts, reference = often
    counting = Counting(target)
    drafter = decoder.as_drafter(draft) if draft_too else None
    steps = decoder.speculative_steps(counting, drafter, [prompts[0]], MAX_TOKENS, policy.ConstantPolicy(0))
    first = next(steps)  # timed alone: the first plain step at a batch size pays one-off allocations
    assert counting.calls == 1
    second = next(steps)
    assert counting.calls == 3  # this step's pass, and the next one's, queued before the read
    assert first.tokens + second.tokens + [t for step in steps for t in step.tokens] == reference[0]


class Told(policy.ConstantPolicy):
    """Constant k; keeps the seconds each step was told."""

    def __init__(self, num_draft):
        super().__init__(num_draft)
        self.told = []

    def observe(self, rows, k, drafted, accepted, seconds):
        self.told.append(seconds)


def test_plain_steps_queued_behind_each_other_are_each_told_one_passs_time(often):
    """Where a queued pass ends is the backend's business (MLX's CPU backend: one step timed at two
    passes, the next at none); the policy is told each plain step's share, none near zero."""
    target, draft, prompts, reference = often
    told = Told(0)
    steps = list(decoder.speculative_steps(target, decoder.as_drafter(draft), [prompts[0]], MAX_TOKENS, told))
    assert len(told.told) == len(steps) == len(reference[0])
    assert sum(told.told) == pytest.approx(sum(step.seconds for step in steps))
    typical = float(np.median(told.told[1:]))
    assert min(told.told[1:]) > 0.3 * typical, told.told


@pytest.mark.parametrize("batch_size", [2, 3])
def test_queued_plain_passes_are_undone_when_rows_leave(load_pair, batch_size):
    """Rows ending at EOS while the next plain pass is queued: the batch refills and outputs and counts stay exact."""
    target, draft, tokenizer = load_pair(OFTEN)
    # The first meets EOS after 14 tokens: the plain pass queued behind its last step is dropped.
    prompts = [tokenizer(text).input_ids for text in ["Create Return the Return set key Return", *PROMPTS]]
    reference = [list(decoder.generate(target, ids, MAX_TOKENS)) for ids in prompts]
    assert len(reference[0]) < MAX_TOKENS and reference[0][-1] == target.eos_token_id
    stats = [decoder.Stats() for _ in prompts]
    outputs = [[] for _ in prompts]
    for index, token in decoder.speculative_batch(target, draft, prompts, MAX_TOKENS, batch_size=batch_size,
                                                  stats=stats, schedule=policy.ConstantPolicy(0)):
        outputs[index].append(token)
    assert outputs == reference
    assert [s.target_calls for s in stats] == [s.generated for s in stats] == [len(r) for r in reference]
