"""Property-based tests: draw the space of decoding runs and check invariants on every example.

The space: family (T5 v1 and v1.1, GPT-2, Llama with grouped-query attention), drafter
(draft model, prompt lookup, none), schedule (adaptive, constant, a random k per step
with 0 included), num_draft 1..8, max_tokens 1..12, batch 1..4, 1..6 prompts of 0..30
tokens, greedy or seeded sampling with top-k / top-p, delta 0. Each pair's EOS is set
to a token it emits early for some prompts and not for others, so rows end at any step.

Examples run in tests/property_worker.py, a process of its own: a native crash (SIGFPE,
SIGSEGV) fails the example that caused it, which hypothesis then shrinks and prints,
instead of taking pytest down. CI runs the "ci" profile (fixed seed); set
HYPOTHESIS_PROFILE=long for ten times as many examples.
"""

import json
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORKER = Path(__file__).with_name("property_worker.py")
FAMILIES = {  # name -> pair_dirs overrides
    "t5-v1": dict(family="t5", gated=False),
    "t5-v11": dict(family="t5", gated=True),
    "gpt2": dict(family="gpt2"),
    "llama": dict(family="llama"),  # 4 heads over 2 key/value heads
}
EXAMPLE_SECONDS = 300
# Examples are whole decoding runs, drawn against module-scoped models: slow and large by design.
RUNS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class Worker:
    """The worker process, started again after it dies."""

    def __init__(self, pairs):
        self.pairs, self.process = pairs, None

    def run(self, example):
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(WORKER), json.dumps(self.pairs)], text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.process.stdin.write(json.dumps(example) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], EXAMPLE_SECONDS)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            code = self.process.wait()
            raise AssertionError(f"the worker died (exit {code}) or hung on {example}")
        answer = json.loads(line)
        assert "error" not in answer, f"{answer['error']} on {example}"
        return answer

    def close(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def worker(pair_dirs):
    pairs = {name: [str(p) for p in pair_dirs(0.05, **overrides)] for name, overrides in FAMILIES.items()}
    running = Worker(pairs)
    yield running
    running.close()


GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)
SAMPLED = st.fixed_dictionaries(dict(
    temperature=st.sampled_from([0.5, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 5, 50]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
))
# A request's own settings, as the server takes them: greedy or sampled, its own max_tokens,
# num_draft cap and seed.
ROW = st.builds(lambda sampling, **rest: dict(sampling, **rest), st.just(GREEDY) | SAMPLED,
                max_tokens=st.integers(1, 12), num_draft=st.none() | st.integers(1, 8),
                seed=st.none() | st.integers(0, 2**32 - 1))


def examples(greedy=None, rows=False):
    """Strategy: one decoding run's settings and prompts; with rows, every prompt has settings of its own."""
    sampling = st.just(GREEDY) if greedy else SAMPLED
    run = st.fixed_dictionaries(dict(
        family=st.sampled_from(sorted(FAMILIES)),
        drafter=st.sampled_from(["model", "lookup", "none"]),
        schedule=st.sampled_from(["adaptive", "constant", "random"]),
        num_draft=st.integers(1, 8),
        ngram_max=st.integers(1, 3),
        max_tokens=st.integers(1, 12),
        batch_size=st.integers(1, 4),
        # Ids 3.. of the tiny tokenizers; repeats make prompt lookup find matches.
        prompts=st.lists(st.lists(st.integers(3, 40) | st.integers(3, 900), max_size=30), min_size=1, max_size=6),
        sampling=sampling,
        seed=st.integers(0, 2**32 - 1),
    ))
    if not rows:
        return run
    return run.flatmap(lambda example: st.lists(ROW, min_size=len(example["prompts"]),
                                                max_size=len(example["prompts"])).map(
        lambda drawn: dict(example, rows=drawn)))


def check_counts(example, answer):
    """Statistics add up and count what was emitted; every row ends once, at EOS or max_tokens."""
    eos = answer["eos"]
    for row in answer["rows"]:
        tokens, stats, max_tokens = row["tokens"], row["stats"], row["max_tokens"]
        assert 1 <= len(tokens) <= max_tokens
        assert eos not in tokens[:-1], "output runs past EOS"
        assert len(tokens) == max_tokens or tokens[-1] == eos, "stopped early without EOS"
        assert row["finished"] == 1 and row["empty_steps"] == 0
        assert row["unaccounted"] == 0, "a step's tokens are not its accepted drafts plus at most one"
        assert stats["generated"] == len(tokens)
        assert (stats["drafted"], stats["accepted"]) == (row["drafted"], row["accepted"])
        assert 0 <= stats["accepted"] <= stats["drafted"]
        assert stats["target_calls"] == row["steps"]
        if example["drafter"] == "none":
            assert stats["drafted"] == 0
    # A plain step queues the next pass before reading its token (as plain decoding does), so
    # a row that ends there leaves one pass made and dropped unread, for the rows of its batch.
    used = sum(r["stats"]["target_calls"] for r in answer["rows"])
    assert used <= answer["passes"] <= used + example["batch_size"] * len(example["prompts"])


def check_text(answer):
    """Text streamed in whole characters, joined, equals the decoding of all the tokens."""
    for row in answer["rows"]:
        assert row["streamed"] == row["text"]


@RUNS
@given(example=examples(greedy=True))
def test_greedy_runs_equal_plain_greedy_per_prompt(worker, example):
    answer = worker.run(example)
    check_counts(example, answer)
    check_text(answer)
    assert [row["tokens"] for row in answer["rows"]] == answer["alone"]


@RUNS
@given(example=examples(rows=True))
def test_rows_with_settings_of_their_own_keep_them_in_one_batch(worker, example):
    """Mixed requests in one batch: each greedy row is its prompt's plain greedy decoding alone,
    each sampled row stays in the support of its own filters."""
    answer = worker.run(example)
    check_counts(example, answer)
    check_text(answer)
    for row, alone, outside in zip(answer["rows"], answer["alone"], answer["outside"]):
        assert row["tokens"] == alone if alone is not None else outside == [], "a row strayed from its settings"


@RUNS
@given(example=examples(greedy=False))
def test_sampled_runs_stay_in_the_targets_filtered_support(worker, example):
    answer = worker.run(example)
    check_counts(example, answer)
    check_text(answer)
    assert answer["outside"] == [[] for _ in example["prompts"]], "a token outside top-k / top-p"
