"""Exact per row, whatever shares the batch: each row gets what it would get alone.

A row of a batch may be capped below the batch's k (its request's num_draft), have no
drafts where its neighbours have some (prompt lookup), run out of budget before the
others, or carry its own seed. Its tokens must follow the target's own distribution all
the same (a chi-square test of its first two tokens against the target's exact joint
distribution, computed from the target's logits), and a seeded row's text must not
depend on its neighbours (under the constant schedule). The property tests draw the
rows and their company; the chosen cases below are the faults that were found.
"""

import numpy as np
import pytest
from conftest import OFTEN, RARELY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import chi2
from test_mlx_lm import pair_folders  # noqa: F401  (a fixture: mlx-lm folders)

import mlx.core as mx

import api
import decoder
import drafters
import policy

END = -1  # the second "token" of a row that ended at EOS after one
# A chi-square statistic this unlikely under the target's distribution fails the test
# (per tested row; the draws are seeded, so a run is repeatable).
SIGNIFICANCE = 1e-4
COPIES, RUNS = 96, 12  # the row under test, COPIES times per batch, RUNS batches: 1152 samples


class FillerIsEos:
    """The wrapped target with its logits of token 0 and of token `likely` swapped, and EOS 0.

    Drafters fill a row that has fewer drafts than the batch's k with token 0, so here the
    filler is the row's likely end: the case where drawing the cut token from the residual
    (which excludes the filler) shows most.
    """

    def __init__(self, inner, likely):
        self.inner, self.eos_token_ids, self.eos_token_id = inner, frozenset([0]), 0
        order = np.arange(inner.vocab_size)
        order[[0, likely]] = [likely, 0]
        self.order = mx.array(order)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, tokens, cache, padding=None):
        return mx.take(self.inner.decode(tokens, cache, padding), self.order, axis=-1)


def first_pairs(target, prompt, sampling):
    """{(x1, x2): probability} of a row's first two tokens under the target's own sampling (x2 END after EOS)."""
    cache, firsts = target.start([prompt])
    p1 = np.asarray(decoder.distribution(target.decode(mx.array([firsts]), cache)[0, -1], sampling), np.float64)
    joint = {}
    for x1 in np.flatnonzero(p1):
        if int(x1) in target.eos_token_ids:
            joint[(int(x1), END)] = p1[x1]
            continue
        cache, firsts = target.start([prompt])
        logits = target.decode(mx.array([[firsts[0], int(x1)]]), cache)[0, -1]
        p2 = np.asarray(decoder.distribution(logits, sampling), np.float64)
        for x2 in np.flatnonzero(p2):
            joint[(int(x1), int(x2))] = p1[x1] * p2[x2]
    return joint


def chi_square(samples, joint):
    """(statistic, threshold at SIGNIFICANCE): cells expecting fewer than 5 samples pooled into one."""
    n = len(samples)
    counts = {}
    for pair in samples:
        counts[pair] = counts.get(pair, 0) + 1
    assert set(counts) <= set(joint), f"tokens outside the target's support: {set(counts) - set(joint)}"
    big = [cell for cell, p in joint.items() if p * n >= 5]
    observed = [counts.get(cell, 0) for cell in big]
    expected = [joint[cell] * n for cell in big]
    rest = n - sum(observed), n - sum(expected)
    if rest[1] > 1e-9:
        observed.append(rest[0])
        expected.append(rest[1])
    observed, expected = np.array(observed, np.float64), np.array(expected)
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return statistic, float(chi2.ppf(1 - SIGNIFICANCE, max(len(expected) - 1, 1)))


def samples_of_row(target, drafter, prompt, row, neighbours, k, seed):
    """The first two tokens of COPIES x RUNS rows `row` (a Request's settings) decoded beside `neighbours`."""
    mx.random.seed(seed)
    samples = []
    for _ in range(RUNS):
        requests = [decoder.Request(list(prompt), 2, row["sampling"], num_draft=row["num_draft"])
                    for _ in range(COPIES)]
        requests += [decoder.Request(list(ids), tokens, sampling, num_draft=None) for ids, tokens, sampling in neighbours]
        tokens = [[] for _ in requests]
        for step in decoder.speculative_steps(target, drafter(), decoder.RequestQueue(requests), None,
                                              policy.ConstantPolicy(k), batch_size=len(requests)):
            tokens[step.index].extend(step.tokens)
        samples += [(out[0], out[1] if len(out) > 1 else END) for out in tokens[:COPIES]]
    return samples


def assert_row_follows_the_target(target, drafter, prompt, row, neighbours, k, seed=0):
    statistic, threshold = chi_square(samples_of_row(target, drafter, prompt, row, neighbours, k, seed),
                                      first_pairs(target, prompt, row["sampling"]))
    assert statistic <= threshold, f"chi-square {statistic:.1f} > {threshold:.1f}"
    return statistic, threshold


def likely_eos(target, prompt, sampling):
    """A target whose EOS is the filler token 0 and the most likely first token of `prompt`: rows end early, often."""
    joint = first_pairs(target, prompt, sampling)
    first = max({x1 for x1, _ in joint}, key=lambda x1: sum(p for (a, _), p in joint.items() if a == x1))
    return FillerIsEos(target, first)


SAMPLED = decoder.Sampling(temperature=1.0, top_k=4)
DISTINCT = [5, 17, 29, 41, 53, 65]  # no repeats: prompt lookup finds nothing for it at first
REPEATING = [7, 8, 9, 7, 8, 9, 7, 8]  # prompt lookup always finds something


def test_a_capped_row_beside_an_uncapped_one_samples_from_the_target(load_pair):
    """Its drafts cut at its own num_draft (1) while the batch drafts 4: the token at the cut comes from p (a
    draft that often agrees: the residual after an accepted draft is far from p)."""
    target, draft, _ = load_pair(OFTEN, family="llama")
    assert_row_follows_the_target(target, lambda: decoder.as_drafter(draft), DISTINCT,
                                  dict(sampling=SAMPLED, num_draft=1), [(REPEATING, 8, SAMPLED)], k=4)


def test_a_lookup_row_with_no_match_beside_matching_rows_samples_from_the_target(load_pair):
    """Prompt lookup has nothing for the row while its neighbour has drafts: it still ends at EOS as often as alone."""
    target, _, _ = load_pair(RARELY, family="llama")
    target = likely_eos(target, DISTINCT, SAMPLED)
    assert_row_follows_the_target(target, lambda: drafters.PromptLookupDrafter(2), DISTINCT,
                                  dict(sampling=SAMPLED, num_draft=None), [(REPEATING, 8, SAMPLED)], k=4)


def seeded_text(target, drafter, prompt, seed, neighbours, k, max_tokens=10):
    """The tokens of one seeded sampled row decoded beside `neighbours` (Requests' settings), constant k."""
    requests = [decoder.Request(list(prompt), max_tokens, SAMPLED, seed=seed)]
    requests += [decoder.Request(list(ids), tokens, sampling, num_draft=cap, seed=s) for ids, tokens, sampling, cap, s
                 in neighbours]
    tokens = []
    for step in decoder.speculative_steps(target, drafter(), decoder.RequestQueue(requests), None,
                                          policy.ConstantPolicy(k), batch_size=len(requests)):
        if step.index == 0:
            tokens += step.tokens
    return tokens


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_a_seeded_row_gives_the_same_text_beside_a_longer_request(load_pair, family):
    """Alone its batch drafts fewer near its end than beside a longer request: the text is the same."""
    target, draft, _ = load_pair(RARELY, family=family)
    alone = seeded_text(target, lambda: decoder.as_drafter(draft), DISTINCT, 42, [], k=4)
    beside = seeded_text(target, lambda: decoder.as_drafter(draft), DISTINCT, 42, [(REPEATING, 30, SAMPLED, None, 7)],
                         k=4)
    assert beside == alone
    assert seeded_text(target, lambda: decoder.as_drafter(draft), DISTINCT, 43, [], k=4) != alone


MLX_LM = "gemma3_text"  # through mlx-lm's own model classes (models/mlxlm.py), its sliding window included
FAMILY = st.sampled_from(["t5", "gpt2", "llama", MLX_LM])


@pytest.fixture(scope="module")
def pair_of(load_pair, pair_folders):  # noqa: F811
    """family -> (target, draft) whose draft often agrees: the tests' own pairs, MLX_LM's as mlx-lm saves it."""
    loaded = {}

    def get(family):
        if family not in loaded:
            both = api.load_models(*pair_folders(family)) if family == MLX_LM else load_pair(OFTEN, family=family)
            loaded[family] = both[:2]
        return loaded[family]

    return get
ROW_SAMPLING = st.builds(decoder.Sampling, temperature=st.sampled_from([0.7, 1.0, 1.5]),
                         top_k=st.sampled_from([2, 3, 5]), top_p=st.sampled_from([1.0, 0.9]))
ANY_SAMPLING = ROW_SAMPLING | st.just(decoder.Sampling())  # sampled, or greedy
PROMPT = st.lists(st.integers(3, 60), min_size=1, max_size=8)
NEIGHBOUR = st.tuples(PROMPT, st.integers(1, 10), ANY_SAMPLING)
DRAWN = settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                         HealthCheck.data_too_large])


@DRAWN
@given(family=FAMILY, lookup=st.booleans(), prompt=PROMPT, sampling=ROW_SAMPLING,
       cap=st.none() | st.integers(1, 4), neighbours=st.lists(NEIGHBOUR, min_size=1, max_size=3),
       k=st.integers(1, 5), early_eos=st.booleans(), seed=st.integers(0, 2**16))
def test_a_row_follows_the_target_whatever_its_company(pair_of, family, lookup, prompt, sampling, cap, neighbours,
                                                       k, early_eos, seed):
    """Drawn: the row's family, drafter, settings and cap, its neighbours' prompts, budgets and settings, the
    batch's k: its first two tokens follow the target's own distribution (chi-square)."""
    target, draft = pair_of(family)
    if early_eos:
        target = likely_eos(target, prompt, sampling)
    drafter = (lambda: drafters.PromptLookupDrafter(2)) if lookup else (lambda: decoder.as_drafter(draft))
    assert_row_follows_the_target(target, drafter, prompt, dict(sampling=sampling, num_draft=cap), neighbours, k,
                                  seed)


SEEDED_NEIGHBOUR = st.tuples(PROMPT, st.integers(1, 16), ANY_SAMPLING, st.none() | st.integers(1, 5),
                             st.none() | st.integers(0, 2**32 - 1))


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(family=FAMILY, lookup=st.booleans(), prompt=PROMPT, seed=st.integers(0, 2**32 - 1),
       neighbours=st.lists(SEEDED_NEIGHBOUR, min_size=1, max_size=3), k=st.integers(1, 5),
       max_tokens=st.integers(1, 12))
def test_a_seeded_row_is_the_same_alone_and_in_company(pair_of, family, lookup, prompt, seed, neighbours, k,
                                                       max_tokens):
    """Drawn neighbours (longer or shorter, greedy or sampled, capped, seeded or not), constant schedule: a seeded
    row's tokens equal its tokens alone."""
    target, draft = pair_of(family)
    drafter = (lambda: drafters.PromptLookupDrafter(2)) if lookup else (lambda: decoder.as_drafter(draft))
    mx.random.seed(seed % 1000)  # unseeded neighbours draw from the global generator
    alone = seeded_text(target, drafter, prompt, seed, [], k, max_tokens)
    assert seeded_text(target, drafter, prompt, seed, neighbours, k, max_tokens) == alone
