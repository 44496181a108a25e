"""policy.py: the adaptive schedule picks the k the formula says (pure unit tests, no timing)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import policy


def costs_from(step_seconds, batch=1):
    """StepCosts holding the given seconds for k = 0, 1, ... at one batch size."""
    costs = policy.StepCosts()
    for k, seconds in enumerate(step_seconds):
        costs.record(batch, k, 99.0)  # the warm-up step, which is left out
        costs.record(batch, k, seconds)
    return costs


def formula_best(a, t_draft, t_verify, cap):
    """DESIGN.md's rule: argmax over k of (1 - a**(k+1)) / (1 - a) / (k * t_draft + t_verify(k + 1))."""
    def rate(k):
        return sum(a**i for i in range(k + 1)) / (k * t_draft + t_verify[k + 1])

    return max(range(cap + 1), key=rate)


def settled_policy(a, costs, num_draft, steps=200):
    """An adaptive policy that has watched one row accept drafts at rate a (k = num_draft steps)."""
    chosen = policy.AdaptivePolicy(num_draft, costs)
    # Deterministic observations with the right mean: accepted counts of a geometric prefix.
    for step in range(steps):
        accepted = 0
        while accepted < num_draft and ((step * 7919 + accepted * 104729) % 1000) / 1000 < a:
            accepted += 1
        chosen.observe([0], num_draft, [num_draft], [accepted], costs.seconds(1, num_draft))
    return chosen


@pytest.mark.parametrize("a", [0.1, 0.4, 0.6, 0.75, 0.9, 0.97])
@pytest.mark.parametrize("verify_growth", [0.0, 0.1, 0.3])
def test_adaptive_picks_the_formulas_k(a, verify_growth):
    """Given costs and acceptance, choose() is the formula's argmax."""
    t_draft = 0.004
    t_verify = {n: 0.020 * (1 + verify_growth * (n - 1)) for n in range(1, 10)}
    step_seconds = [k * t_draft + t_verify[k + 1] for k in range(9)]
    costs = costs_from(step_seconds)
    chosen = policy.AdaptivePolicy(8, costs)
    chosen.rows[0] = (a * 1e6, 1e6)  # an acceptance known exactly
    assert chosen.acceptance(0) == pytest.approx(a, abs=1e-5)
    assert chosen.choose([0], cap=8) == formula_best(a, t_draft, t_verify, 8)
    assert chosen.choose([0], cap=2) == formula_best(a, t_draft, t_verify, 2)


def test_costly_verify_and_poor_acceptance_mean_plain_steps():
    costs = costs_from([0.020, 0.040, 0.060, 0.080])
    chosen = policy.AdaptivePolicy(3, costs)
    chosen.rows[0] = (1.0, 100.0)
    assert chosen.choose([0], cap=3) == 0


def test_batches_add_the_rows_expected_tokens():
    """One k for the batch: the argmax of the summed expected tokens over the batch's step time."""
    costs = costs_from([0.03, 0.04, 0.05, 0.06, 0.07], batch=2)
    chosen = policy.AdaptivePolicy(4, costs)
    chosen.rows[0], chosen.rows[1] = (0.95e6, 1e6), (0.05e6, 1e6)

    def rate(k):
        return (policy.expected_tokens(0.95, k) + policy.expected_tokens(0.05, k)) / (0.03 + 0.01 * k)

    assert chosen.choose([0, 1], cap=4) == max(range(5), key=rate)


def test_every_k_is_measured_before_it_is_judged():
    chosen = policy.AdaptivePolicy(3)
    seen = []
    for _ in range(8):
        k = chosen.choose([0], cap=3)
        seen.append(k)
        chosen.observe([0], k, [k], [k], 0.01 + 0.002 * k)
    # k 0, 1 and 2 twice each (the warm-up step is not kept); the line through k 1 and 2
    # then predicts k 3, which wins (everything accepted, cheap drafts) and is timed.
    assert seen == [0, 0, 1, 1, 2, 2, 3, 3]
    assert chosen.choose([0], cap=3) == 3


def test_acceptance_estimate_follows_observations():
    costs = costs_from([0.02, 0.025, 0.03, 0.035, 0.04, 0.045])
    assert settled_policy(0.9, costs, 5).acceptance(0) > 0.8
    assert settled_policy(0.2, costs, 5).acceptance(0) < 0.3
    # A new row starts from what the others showed.
    assert settled_policy(0.9, costs, 5).acceptance(1) > 0.75


def test_plain_steps_probe_again_after_a_while():
    costs = costs_from([0.020, 0.030])
    chosen = policy.AdaptivePolicy(1, costs)
    chosen.rows[0] = (0.0, 50.0)
    picks = [chosen.choose([0], cap=1) for _ in range(40)]
    assert picks.count(0) >= 35 and 1 in picks


def test_no_probe_where_drafting_cannot_pay():
    """A k 1 step costing two plain steps cannot pay even if its draft were accepted: never probed."""
    costs = costs_from([0.020, 0.041])
    chosen = policy.AdaptivePolicy(1, costs)
    chosen.rows[0] = (0.0, 50.0)
    assert [chosen.choose([0], cap=1) for _ in range(100)] == [0] * 100


def test_constant_policy_and_caps():
    assert policy.ConstantPolicy(5).choose([0], cap=9) == 5
    assert policy.ConstantPolicy(5).choose([0], cap=2) == 2
    assert isinstance(policy.make_policy("constant", 3), policy.ConstantPolicy)
    assert isinstance(policy.make_policy("adaptive", 3), policy.AdaptivePolicy)
    assert policy.AdaptivePolicy(4, costs_from([0.01] * 5)).choose([0], cap=0) == 0


def test_expected_tokens():
    assert policy.expected_tokens(0.0, 5) == 1
    assert policy.expected_tokens(1.0, 5) == 6
    assert policy.expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_seldom_timed_ks_lean_on_the_line_through_the_others():
    """A k timed once is pulled towards the weighted least-squares line of all k >= 1; k 0 stands apart."""
    import numpy as np

    costs = policy.StepCosts()
    medians = {0: 0.015, 1: 0.03, 2: 0.04, 3: 0.08, 4: 0.06}
    counts = {0: 10, 1: 10, 2: 10, 3: 1, 4: 10}
    for k, seconds in medians.items():
        for _ in range(counts[k] + 1):  # the first is the warm-up step
            costs.record(1, k, seconds)
    ks = [1, 2, 3, 4]
    line = np.poly1d(np.polyfit(ks, [medians[k] for k in ks], 1, w=[np.sqrt(counts[k]) for k in ks]))
    weight = policy.StepCosts.trend_weight
    assert costs.seconds(1, 3) == pytest.approx((1 * 0.08 + weight * line(3)) / (1 + weight))
    assert costs.seconds(1, 3) < 0.07
    assert costs.seconds(1, 0) == 0.015
    # Only one k measured: nothing to draw a line through.
    alone = policy.StepCosts()
    alone.record(1, 2, 0.5)
    alone.record(1, 2, 0.05)
    assert alone.seconds(1, 2) == 0.05


# The cost model: components measured on purpose, fitted, rescaled by the loop's steps.

def concave_verify(rows, base=0.02, growth=0.3, knee=4.0):
    """A target pass that costs more with rows, at a falling rate (the CPU's shape)."""
    return base * (1 + growth * knee * (1 - (1 + rows / knee) ** -1) * rows / (rows + 1) + growth * rows / 10)


def test_fitted_verify_curve_matches_known_costs():
    """Noise-free costs come back exactly where measured and between the measured rows along the chords."""
    measured = {r: concave_verify(r) for r in (1, 2, 3, 5, 8, 9)}
    costs = policy.Components(0.0004, 0.003, measured)
    for rows, seconds in measured.items():
        assert costs.verify_at(rows) == pytest.approx(seconds)
    assert costs.verify_at(4) == pytest.approx((measured[3] + measured[5]) / 2)
    assert costs.verify_at(12) == pytest.approx(measured[9] + 3 * (measured[9] - measured[8]))  # the last chord on
    assert costs.step(1, 4) == pytest.approx(0.0004 + 4 * 0.003 + costs.verify_at(5))
    assert costs.step(2, 3) == pytest.approx(0.0004 + 3 * 0.003 + costs.verify_at(8))  # rows = (k + 1) x batch


@settings(deadline=None)  # the first example imports scipy
@given(st.lists(st.floats(0.001, 1.0), min_size=1, max_size=12), st.integers(1, 4))
def test_fitted_verify_curve_is_monotone_and_least_squares(seconds, batch):
    """Whatever the noise, the fit never falls with rows, and is the isotonic least-squares fit (scipy's)."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    measured = {(n + 1) * batch: s for n, s in enumerate(seconds)}
    costs = policy.Components(0.0, 0.0, measured)
    values = [costs.verify_at(rows) for rows in range(1, (len(seconds) + 3) * batch)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    reference = scipy_optimize.isotonic_regression(seconds).x
    assert [costs.verify_at(r) for r in measured] == pytest.approx(list(reference))


def calibrated(host, draft, verify, batch=1):
    return policy.StepCosts({batch: policy.Components(host, draft, verify)})


def test_one_measured_k_rescales_every_k():
    """The machine runs 1.3x slower than calibrated: steps at k 2 alone move every k's estimate."""
    verify = {r: concave_verify(r) for r in range(1, 10)}
    costs = calibrated(0.0005, 0.004, verify)
    model = costs.components[1]
    for _ in range(10):
        costs.record(1, 2, 1.3 * model.step(1, 2))
    estimates = costs.table(1, range(9))
    for k in range(9):
        assert estimates[k] == pytest.approx(1.3 * model.step(1, k))
    assert costs.calibration(1).step(1, 5) == pytest.approx(1.3 * model.step(1, 5))


def test_a_seldom_timed_k_is_not_judged_on_one_noisy_sample():
    verify = {r: concave_verify(r) for r in range(1, 10)}
    costs = calibrated(0.0005, 0.004, verify)
    model = costs.components[1]
    for k in (1, 2, 3, 5):
        for _ in range(6):
            costs.record(1, k, model.step(1, k))
    costs.record(1, 4, 0.5)  # warm-up step: left out
    costs.record(1, 4, 2.0 * model.step(1, 4))  # one step on a busy moment
    estimate = costs.seconds(1, 4)
    weight = policy.StepCosts.trend_weight
    assert estimate == pytest.approx((2.0 * model.step(1, 4) + weight * costs.scale(1) * model.step(1, 4))
                                     / (1 + weight))
    assert estimate < 1.25 * model.step(1, 4)


costs_drawn = st.builds(
    lambda host, draft, base, slopes: (host, draft, {r: base + sum(slopes[:r]) for r in range(1, 10)}),
    st.floats(0.0, 0.002), st.floats(0.0005, 0.02), st.floats(0.005, 0.1),
    st.lists(st.floats(0.0, 0.02), min_size=9, max_size=9))


@settings(max_examples=60, deadline=None)
@given(costs_drawn, st.floats(0.0, 0.99), st.integers(1, 8))
def test_calibrated_choice_maximises_expected_tokens_per_second(drawn, a, cap):
    """From the first step on a calibrated machine: the formula's argmax over the model's costs."""
    host, draft, verify = drawn
    costs = calibrated(host, draft, verify)
    chosen = policy.AdaptivePolicy(8, costs)
    chosen.rows[0] = (a * 1e6, 1e6)
    model = costs.components[1]
    rate = {k: policy.expected_tokens(a, k) / model.step(1, k) for k in range(cap + 1)}
    k = chosen.choose([0], cap)
    assert rate[k] == pytest.approx(max(rate.values()))


@settings(max_examples=40, deadline=None)
@given(costs_drawn, st.floats(0.0, 0.99), st.integers(1, 2), st.integers(0, 2**32 - 1))
def test_calibrated_policy_never_tries_a_k_that_cannot_pay(drawn, a, batch, seed):
    """Over a long run (acceptance drawn step by step), every k tried could beat the best's expected
    rate were all its drafts accepted, and most steps take the best k; the one exception: while plain
    steps win, k 1 is looked at until this process has timed it (its kept cost may be stale)."""
    import random

    host, draft, verify = drawn
    costs = calibrated(host, draft, {rows * batch: s for rows, s in verify.items()}, batch)
    model = costs.components[batch]
    chosen = policy.AdaptivePolicy(8, costs)
    rng = random.Random(seed)
    rows = list(range(batch))
    best_steps = 0
    for _ in range(150):
        acceptances = [chosen.acceptance(row) for row in rows]
        seconds = {k: model.step(batch, k) for k in range(9)}
        rates = {k: chosen.rate(acceptances, k, seconds[k]) for k in range(9)}
        best = max(rates.values())
        untimed = not chosen.costs.samples.get((batch, 1))
        k = chosen.choose(rows, cap=8)
        looked = k == 1 and untimed and rates[0] == pytest.approx(best)
        assert rates[k] == pytest.approx(best) or batch * (k + 1) / seconds[k] > best or looked
        best_steps += rates[k] == pytest.approx(best)
        accepted = []
        for _ in rows:
            count = 0
            while count < k and rng.random() < a:
                count += 1
            accepted.append(count)
        chosen.observe(rows, k, [k] * batch, accepted, seconds[k])
    assert best_steps >= 0.85 * 150


def test_kept_costs_follow_a_ks_own_steps():
    """Calibrated while the machine was busy, the 2-row pass looked 3x the 1-row one; steps at k 1 that
    cost far less move the kept curve at 2 rows towards them (the next run starts from that)."""
    costs = calibrated(0.0, 0.002, {1: 0.010, 2: 0.030, 3: 0.032})
    for _ in range(12):
        costs.record(1, 0, 0.010)
        costs.record(1, 1, 0.002 + 0.012)
    kept = costs.calibration(1)
    assert kept.verify_at(2) < 0.6 * 0.030
    assert kept.verify_at(1) <= kept.verify_at(2) <= kept.verify_at(3)
    assert policy.AdaptivePolicy(1, policy.StepCosts({1: kept}), pooled=[7.0, 10.0]).choose([0], 1) == 1
    assert policy.AdaptivePolicy(1, policy.StepCosts({1: costs.components[1]}), pooled=[7.0, 10.0]).choose([0], 1) == 0


def test_probes_back_off_while_their_drafts_are_rejected():
    """A pair that never agrees: probes come after 32, 64, 128 ... plain steps; an accepted probe resets the gap."""
    costs = costs_from([0.020, 0.030])
    chosen = policy.AdaptivePolicy(1, costs)
    chosen.rows[0] = (0.0, 50.0)
    probes = []
    for step in range(3000):
        k = chosen.choose([0], cap=1)
        if k:
            probes.append(step)
        chosen.observe([0], k, [k], [0], 0.02 + 0.01 * k)
    gaps = [b - a - 1 for a, b in zip(probes, probes[1:])]
    assert probes[0] == 32 and gaps[:4] == [64, 128, 256, 512] and set(gaps[4:]) == {512}
    chosen.plain_streak = chosen.probe_gap + 1
    assert chosen.choose([0], cap=1) == 1
    chosen.observe([0], 1, [1], [1], 0.03)
    assert chosen.probe_gap == policy.AdaptivePolicy.probe_after


# Whole runs on simulated steps: the costs of a measured verify curve with 10% noise per step,
# acceptance drawn per draft. Seeded, so each case is one fixed trajectory per policy.

CURVES = {  # the target's pass over n tokens in one-token passes, and the draft/target cost ratio
    "cpu": ([1.00, 1.22, 1.45, 1.57, 1.60, 1.79, 2.17, 2.28, 2.26], 0.147),  # this README's 2-core EPYC
    "gpu": ([1.0, 1.02, 1.04, 1.06, 1.08, 1.10, 1.13, 1.16, 1.20], 0.1),  # a pass bound by reading weights
}


def simulated_rate(chosen, costs, a, rng, prompts=6, tokens=64):
    """Tokens per simulated second of `chosen` deciding every step of prompts x tokens."""
    import math

    seconds = emitted = 0.0
    for row in range(prompts):
        done = 0
        while done < tokens:
            k = chosen.choose([row], min(8, tokens - done - 1))
            accepted = 0
            while accepted < k and rng.random() < a:
                accepted += 1
            step = costs.step(1, k) * math.exp(rng.gauss(0, 0.1))
            chosen.observe([row], k, [k], [accepted], step)
            seconds += step
            done += min(accepted + 1, tokens - done)
        chosen.forget(row)
        emitted += done
    return emitted / seconds


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("a", [0.0, 0.5, 0.9])
def test_simulated_runs_keep_up_with_the_best_constant(curve, a):
    import random

    ratios, c = CURVES[curve]
    costs = policy.Components(0.0003, c * 0.02, {n: 0.02 * r for n, r in enumerate(ratios, 1)})

    def rate(make):
        return sum(simulated_rate(make(), costs, a, random.Random(seed)) for seed in range(6)) / 6

    constants = {g: rate(lambda g=g: policy.ConstantPolicy(g)) for g in range(9)}
    best = max(constants.values())
    # Calibrated, with the acceptance a previous run kept: from the first prompt on.
    kept = rate(lambda: policy.AdaptivePolicy(8, policy.StepCosts({1: costs}), [32 * a, 32]))
    assert kept >= 0.96 * best and kept >= 0.99 * constants[0]
    # Costs kept, acceptance not; nothing kept: it learns as it goes.
    assert rate(lambda: policy.AdaptivePolicy(8, policy.StepCosts({1: costs}))) >= 0.94 * best
    assert rate(lambda: policy.AdaptivePolicy(8)) >= 0.93 * best


def test_a_larger_batch_sizes_curve_serves_the_smaller_ones_it_reaches():
    """Measured at batch 4 down to one row, the costs predict batch 3, 2 and 1 steps (a batch
    shrinking as its prompts finish) on the same curve of rows; batch 8, beyond, is not predicted."""
    verify = {r: concave_verify(r) for r in (*range(1, 6), 8, 12, 16, 20)}
    costs = calibrated(0.0005, 0.004, verify, batch=4)
    model = costs.components[4]
    for batch in (1, 2, 3, 4):
        assert costs.calibrated(batch)
        assert costs.table(batch, [2])[2] == pytest.approx(0.0005 + 2 * 0.004 + model.verify_at(3 * batch))
    assert not costs.calibrated(8)
    # Without one row's passes the curve does not reach down to batch 1.
    assert not calibrated(0.0005, 0.004, {4: 0.02, 8: 0.03}, batch=4).calibrated(1)
