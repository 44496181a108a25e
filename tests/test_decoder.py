"""decoder.py: greedy speculative output is the target's own; sampled output follows p."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import OFTEN, RARELY

import decoder

PROMPTS = [
    "Return the number of items in the collection.",
    "Create a new parser with the given options and a default formatter for help",
    "Close the file.",
]
MAX_TOKENS = 40


def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


class Shifted:
    """A draft whose greedy choice is never the wrapped model's: its logits rolled by one."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)  # start, vocab_size, eos_token_id, ... of any family

    def decode(self, tokens, cache, padding=None):
        return mx.roll(self.inner.decode(tokens, cache, padding), 1, axis=-1)


class EndsAt(Shifted):
    """The wrapped model, except that it says EOS at decoder position `position`."""

    def __init__(self, inner, position):
        super().__init__(inner)
        self.position = position

    def decode(self, tokens, cache, padding=None):
        logits = self.inner.decode(tokens, cache, padding)
        positions = mx.array(cache.lengths)[:, None] - tokens.shape[1] + mx.arange(tokens.shape[1])
        eos = mx.arange(logits.shape[-1]) == self.eos_token_id
        boost = (positions == self.position)[..., None] & eos
        return mx.where(boost, 1e4, logits)


@pytest.fixture(scope="module")
def pairs(load_pair):
    """name -> (target, draft, tokenizer) for pairs that agree always, often, rarely, never."""
    target, _, tokenizer = load_pair(OFTEN)
    return {
        "always": (target, target, tokenizer),
        "often": load_pair(OFTEN),
        "rarely": load_pair(RARELY),
        "never": (target, Shifted(target), tokenizer),
    }


@pytest.fixture(scope="module")
def greedy_reference(pairs):
    """The targets' own greedy output for each prompt: the independent reference."""
    reference = {}
    for name, (target, _, tokenizer) in pairs.items():
        reference[name] = [list(decoder.generate(target, ids, MAX_TOKENS)) for ids in prompt_ids(tokenizer)]
    return reference


def test_reference_output_is_varied(greedy_reference):
    """A target that repeats one token would make the exactness tests weak."""
    for outputs in greedy_reference.values():
        assert max(len(set(tokens)) for tokens in outputs) >= 8, [len(set(t)) for t in outputs]


# Bands for accepted / drafted at every num-draft 1..8 (it falls as num-draft grows).
ACCEPTANCE = {"always": (1.0, 1.0), "often": (0.4, 1.0), "rarely": (0.01, 0.5), "never": (0.0, 0.0)}


@pytest.mark.parametrize("name", sorted(ACCEPTANCE))
def test_greedy_speculative_equals_target_greedy(pairs, greedy_reference, name):
    target, draft, tokenizer = pairs[name]
    for k in range(1, 9):
        stats = decoder.Stats()
        for ids, expected in zip(prompt_ids(tokenizer), greedy_reference[name]):
            before = stats.generated
            tokens = list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, num_draft=k, stats=stats, schedule="constant"))
            assert tokens == expected, (name, k)
            assert stats.generated - before == len(tokens)
        low, high = ACCEPTANCE[name]
        assert low <= stats.acceptance_rate <= high, (name, k, stats.acceptance_rate)
        if name == "never":
            assert stats.target_calls == stats.generated
        assert stats.draft_calls == stats.drafted and stats.accepted <= stats.drafted


def test_full_acceptance_needs_one_target_call_per_k_plus_1_tokens(pairs):
    target, _, tokenizer = pairs["always"]
    ids = prompt_ids(tokenizer)[0]
    for k in range(1, 9):
        for max_tokens in (1, 2, k, k + 1, 25):
            stats = decoder.Stats()
            tokens = list(decoder.speculative_generate(target, target, ids, max_tokens, num_draft=k, stats=stats, schedule="constant"))
            if target.eos_token_id in tokens:
                continue
            assert len(tokens) == stats.generated == max_tokens
            assert stats.target_calls == math.ceil(max_tokens / (k + 1))
            assert stats.accepted == stats.drafted == max_tokens - stats.target_calls


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 13])
def test_max_tokens_is_exact(pairs, max_tokens):
    target, draft, tokenizer = pairs["often"]
    ids = prompt_ids(tokenizer)[2]
    plain = list(decoder.generate(target, ids, max_tokens))
    for k in range(1, 9):
        tokens = list(decoder.speculative_generate(target, draft, ids, max_tokens, num_draft=k, schedule="constant"))
        assert tokens == plain
        assert len(tokens) == max_tokens or tokens[-1] == target.eos_token_id


def test_delta_one_accepts_every_draft(pairs):
    target, draft, tokenizer = pairs["rarely"]
    stats = decoder.Stats()
    for ids in prompt_ids(tokenizer):
        list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, num_draft=4, delta=1.0, stats=stats, schedule="constant"))
    assert stats.drafted > 0 and stats.acceptance_rate == 1.0


def test_delta_raises_acceptance(pairs):
    target, draft, tokenizer = pairs["rarely"]
    rates = []
    for delta in (0.0, 0.9):
        stats = decoder.Stats()
        for ids in prompt_ids(tokenizer):
            list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, num_draft=4, delta=delta, stats=stats, schedule="constant"))
        rates.append(stats.acceptance_rate)
    assert rates[1] > rates[0]


@pytest.mark.parametrize("position", [2, 5, 9])
def test_eos_inside_a_draft_stops_decoding(pairs, position):
    """Draft = target, so the EOS is an accepted draft token in the middle of a step."""
    target, _, tokenizer = pairs["often"]
    ending = EndsAt(target, position)
    ids = prompt_ids(tokenizer)[0]
    plain = list(decoder.generate(ending, ids, MAX_TOKENS))
    assert plain[-1] == target.eos_token_id and len(plain) == position + 1
    for k in (4, 8):
        stats = decoder.Stats()
        tokens = list(decoder.speculative_generate(ending, ending, ids, MAX_TOKENS, num_draft=k, stats=stats, schedule="constant"))
        assert tokens == plain and stats.generated == position + 1


# ----- sampling -------------------------------------------------------------------------


def reference_distribution(logits, temperature, top_k, top_p, min_p=0.0):
    """numpy: softmax(logits / t), then keep the top k, then the smallest set of mass top_p, then the
    tokens at least min_p times as likely as the most likely."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    if min_p > 0:
        p = np.where(p < min_p * p.max(), 0.0, p)
        p /= p.sum()
    return p


SETTINGS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.5, 5, 0.9, 0.0),
            (1.0, 0, 1.0, 0.2), (1.3, 6, 0.95, 0.1)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SETTINGS)
def test_distribution_matches_reference(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(0).normal(size=(3, 10)) * 2
    ours = np.asarray(decoder.distribution(mx.array(logits, dtype=mx.float32),
                                           decoder.Sampling(temperature, top_k, top_p, min_p=min_p)))
    for row in range(3):
        want = reference_distribution(logits[row], temperature, top_k, top_p, min_p)
        np.testing.assert_allclose(ours[row], want, atol=1e-6)
    if min_p and not top_k:  # the cut does something here (behind top-k it may not)
        assert (ours == 0).sum() > (np.asarray(decoder.distribution(
            mx.array(logits, dtype=mx.float32), decoder.Sampling(temperature, top_k, top_p))) == 0).sum()


def test_min_p_per_row():
    """Rows of one batch with their own min_p each get their own cut."""
    logits = np.random.default_rng(2).normal(size=(3, 12)) * 2
    rows = [decoder.Sampling(1.0, min_p=m) for m in (0.0, 0.3, 0.05)]
    ours = np.asarray(decoder.distribution(mx.array(logits, dtype=mx.float32), decoder.Sampling.of_rows(rows)))
    for row, m in enumerate((0.0, 0.3, 0.05)):
        np.testing.assert_allclose(ours[row], reference_distribution(logits[row], 1.0, 0, 1.0, m), atol=1e-6)


def assert_follows(samples, expected, sigmas=5.0):
    """Each token's frequency lies within `sigmas` binomial standard errors of its probability."""
    counts = np.bincount(samples, minlength=len(expected))
    frequency = counts / len(samples)
    bound = sigmas * np.sqrt(expected * (1 - expected) / len(samples)) + 2.0 / len(samples)
    assert np.all(np.abs(frequency - expected) <= bound), (frequency.round(3), expected.round(3))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SETTINGS)
def test_acceptance_step_yields_the_target_distribution(temperature, top_k, top_p, min_p):
    """Draft x ~ q, then accept or resample: the emitted token is distributed as p."""
    rng = np.random.default_rng(1)
    sampling = decoder.Sampling(temperature, top_k, top_p, min_p=min_p)
    target_logits = mx.array(rng.normal(size=(2, 8)) * 1.5, dtype=mx.float32)  # positions 0 and 1
    draft_logits = mx.array(rng.normal(size=(1, 8)) * 1.5, dtype=mx.float32)
    p, q = decoder.distribution(target_logits, sampling), decoder.distribution(draft_logits, sampling)
    emitted = []
    for key in mx.random.split(mx.random.key(7), 6000):
        draw_key, accept_key = mx.random.split(key)
        x = decoder.sample(q, draw_key).astype(mx.int32)
        count, token = decoder.sampled_accept(p[None], q[None], x[None], 0.0, key=accept_key)
        emitted.append(mx.where(count[0] == 1, x[0], token[0]))
    samples = np.array(mx.stack(emitted)).astype(np.int64)
    expected = reference_distribution(np.asarray(target_logits[0]), temperature, top_k, top_p, min_p)
    assert_follows(samples, expected)


def test_first_sampled_tokens_follow_the_target(load_pair):
    """End to end: the first token of many speculative generations is distributed as the target's."""
    target, draft, tokenizer = load_pair(RARELY)
    ids = tokenizer(PROMPTS[0]).input_ids
    sampling = decoder.Sampling(temperature=1.0, top_k=6)
    cache = target.make_cache(target.encode(mx.array([ids])))
    logits = target.decode(mx.array([[target.decoder_start_token_id]]), cache)[0, -1]
    expected = np.asarray(decoder.distribution(logits, sampling))
    support = np.flatnonzero(expected)
    mx.random.seed(3)
    firsts = [
        next(decoder.speculative_generate(target, draft, ids, 2, num_draft=1, sampling=sampling, schedule="constant"))
        for _ in range(1500)
    ]
    assert set(firsts) <= set(support.tolist())
    assert_follows(np.array(firsts), expected)


def test_seed_makes_sampling_reproducible_and_calls_independent(load_pair):
    target, draft, tokenizer = load_pair(RARELY)
    ids = tokenizer(PROMPTS[1]).input_ids
    sampling = decoder.Sampling(temperature=1.0)

    def run():
        return [list(decoder.speculative_generate(target, draft, ids, 12, 3, sampling=sampling, schedule="constant"))
                for _ in range(2)]

    mx.random.seed(11)
    first = run()
    mx.random.seed(11)
    assert run() == first
    assert first[0] != first[1]
