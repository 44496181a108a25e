"""simulate.py: a trace predicts what the real loop accepts, replays count what they simulate,
and the adaptive schedule is checked against recorded traces of pairs that agree often and never."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import OFTEN, RARELY
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoder import MAX_TOKENS, prompt_ids

import decoder
import policy
import simulate

ROOT = Path(__file__).resolve().parent.parent
TRACES = Path(__file__).resolve().parent / "traces"


@pytest.mark.parametrize("eps", [OFTEN, RARELY])
@pytest.mark.parametrize("k", [1, 3])
def test_the_agreement_predicts_every_step_of_the_real_loop(load_pair, eps, k):
    """Each step of a constant-k greedy run accepts the run of agreements where it starts (at most its drafts)."""
    target, draft, tokenizer = load_pair(eps)
    for ids in prompt_ids(tokenizer):
        (agreement,) = simulate.agreement(target, draft, [ids], MAX_TOKENS)
        steps = list(decoder.speculative_steps(target, decoder.as_drafter(draft), [ids], MAX_TOKENS,
                                               policy.ConstantPolicy(k)))
        position = 0
        for step in steps:
            assert step.accepted == simulate.accepted_run(agreement, position, step.drafted)
            position += len(step.tokens)
        assert position == len(agreement)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 1), min_size=1, max_size=40), min_size=1, max_size=3),
       k=st.integers(0, 5), cost=st.floats(1e-4, 1.0))
def test_a_constant_k_replays_every_token_once(rows, k, cost):
    """Every position is emitted once; a step emits 1 .. k + 1 tokens; all-agree and never-agree runs
    take the steps they must."""
    trace = simulate.Trace(rows, {j: [cost] for j in range(k + 1)})
    rate = simulate.replay(policy.ConstantPolicy(k), trace)
    tokens = sum(map(len, rows))
    timed = tokens / (rate * cost)
    steps = round(timed)
    assert timed == pytest.approx(steps)
    assert tokens <= steps * (k + 1) and steps <= tokens
    if all(all(row) for row in rows):
        assert steps == sum(math.ceil(len(row) / (k + 1)) for row in rows)
    if not any(any(row) for row in rows):
        assert steps == tokens


def replayed(name, num_draft=4, seeds=20):
    trace = simulate.Trace.from_json(json.loads((TRACES / name).read_text()))
    return {setting: (rate, over_plain, over_best) for setting, rate, over_plain, over_best
            in simulate.compare(trace, num_draft, seeds)}


def test_where_the_draft_never_agrees_the_default_runs_at_plain_speed():
    """Recorded: the synthetic T5 pair at eps 1.0 (per-token agreement 0.00), 2 x 48 tokens."""
    rows = replayed("t5-synthetic-never-agrees.json")
    assert rows["adaptive"][1] >= 0.97
    assert rows["adaptive, later run"][1] >= 0.99 and rows["adaptive, later run"][2] >= 0.95


def test_where_the_draft_often_agrees_the_default_gains():
    """Recorded: the synthetic T5 pair at eps 0.05 (agreement 0.74). A first run pays for timing the
    ks (0.92x the best constant over 20 seeds); a later one starts from what the first kept (0.95x:
    a k the first run timed once, on a slow step, stays dear to the next)."""
    rows = replayed("t5-synthetic-often-agrees.json")
    assert rows["adaptive"][1] > 1.3
    assert rows["adaptive"][2] >= 0.85
    assert rows["adaptive, later run"][2] >= 0.92


def drawn_trace(draw):
    """A trace of 3 prompts x 64 positions: agreement drawn at a per-token rate, step costs along a
    drawn curve (a one-token pass, a draft's share, a verify curve that may bend up) with noise."""
    rate = draw(st.floats(0.0, 0.95))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    agreement = [(rng.random(64) < rate).astype(int).tolist() for _ in range(3)]
    one, draft, bend = draw(st.floats(0.005, 0.1)), draw(st.floats(0.02, 0.5)), draw(st.floats(0.0, 0.6))
    noise = draw(st.floats(0.0, 0.2))
    costs = {k: (one * (1 + k * draft + bend * max(0, k - 1) ** 1.5) * (1 + noise * rng.standard_normal(24)).clip(0.5)
                 ).tolist() for k in range(5)}
    return simulate.Trace(agreement, costs)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_the_default_tracks_the_best_setting_of_any_trace(data):
    """Drawn traces, fast and slow drafts, agreeing or not: against the best of plain decoding and every
    constant k (medians over seeds), a later run (from what a first one kept) stays within 10% and a
    first run within 15% (over 200 such traces: worst 0.91x and 0.88x, medians 0.99x and 0.98x)."""
    trace = drawn_trace(data.draw)
    rows = {name: rate for name, rate, _, _ in simulate.compare(trace, 4, seeds=5)}
    best = max(rate for name, rate in rows.items() if not name.startswith("adaptive"))
    assert rows["adaptive, later run"] >= 0.9 * best, rows
    assert rows["adaptive"] >= 0.85 * best, rows


@pytest.mark.parametrize("flags", [["--seeds", "0"], ["--num-draft", "0"], ["--num-draft", "9"], ["--seeds", "-2"]])
def test_replay_flags_out_of_range_are_one_line_and_exit_2(flags):
    result = subprocess.run([sys.executable, "simulate.py", "replay", str(TRACES / "t5-synthetic-often-agrees.json"),
                             *flags], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
