"""policy.py: the adaptive schedule picks the k the formula says (pure unit tests, no timing)."""

import pytest

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
    # Each k twice (its warm-up step is not kept), then a choice on measured costs.
    assert seen[:8] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert chosen.choose([0], cap=3) == 3  # everything accepted and cheap drafts: draft the most


def test_acceptance_estimate_follows_observations():
    costs = costs_from([0.02, 0.025, 0.03, 0.035, 0.04, 0.045])
    assert settled_policy(0.9, costs, 5).acceptance(0) > 0.8
    assert settled_policy(0.2, costs, 5).acceptance(0) < 0.3
    # A new row starts from what the others showed.
    assert settled_policy(0.9, costs, 5).acceptance(1) > 0.75


def test_plain_steps_probe_again_after_a_while():
    costs = costs_from([0.020, 0.040])
    chosen = policy.AdaptivePolicy(1, costs)
    chosen.rows[0] = (0.0, 50.0)
    picks = [chosen.choose([0], cap=1) for _ in range(40)]
    assert picks.count(0) >= 35 and 1 in picks


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
