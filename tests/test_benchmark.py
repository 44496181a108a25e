"""benchmark.py runs end to end and its numbers are consistent (not a timing test)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, one_error_line, run_script

import benchmark

# A tiny synthetic pair (3-layer target, d_model 64) and short runs: seconds, not minutes.
TINY = ["--layers", "3", "--d-model", "64", "--max-tokens", "12", "--repeats", "1"]


def run_benchmark(*args, timeout=900):
    return run_script("benchmark.py", *args, timeout=timeout)


def test_predicted_speedup_formula():
    assert benchmark.predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert benchmark.predicted_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    a, g, c = 0.7, 3, 0.05
    assert benchmark.predicted_speedup(a, g, c) == pytest.approx((1 - a ** (g + 1)) / ((1 - a) * (g * c + 1)))
    assert benchmark.predicted_speedup(a, g, c, verify_cost=1.5) == pytest.approx((1 + a + a**2 + a**3) / (g * c + 1.5))


def test_small_run_reports_consistent_rows(tmp_path):
    out, picture, report = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "bench.md"
    plot = ["--plot", picture] if benchmark.find_spec("matplotlib") else []
    result = run_benchmark(*TINY, "--num-draft", "3", "1", "--batch-size", "1", "3", "--delta", "0", "0.5",
                           "--prompt-lookup", "--json", out, "--markdown", report, "--trace", tmp_path / "trace.json",
                           *plot)
    assert result.returncode == 0, result.stderr
    # The terminal gets the narrow table; --markdown every column and the legend.
    assert "Output check: OK" in result.stdout and "1 repeat (medians)" in result.stdout
    *lines, command = result.stdout.splitlines()  # the last line: main.py's command for this pair, whole
    assert max(map(len, lines)) <= 100 and "| **" not in result.stdout and command.startswith("python main.py --model")
    markdown = report.read_text()
    assert "| setting " in markdown and "target-pass speedup =" in markdown and "Output check: OK" in markdown
    results = json.loads(out.read_text())
    assert not list(tmp_path.glob("*.tmp"))
    # The trace: a position per plain token, step costs of k 0 to 3; simulate.py replays it.
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert sum(map(len, trace["agreement"])) == results["plain"]["tokens"] and sorted(trace["costs"]) == list("0123")
    replayed = run_script("simulate.py", "replay", tmp_path / "trace.json", "--num-draft", 3, "--seeds", 2)
    assert replayed.returncode == 0 and "adaptive, later run" in replayed.stdout, replayed.stderr
    rows, c = results["speculative"], results["cost_ratio"]
    assert [r["label"] for r in rows] == ["g 1", "g 3", "adaptive", "adaptive, delta 0.5", "prompt lookup"]
    assert results["outputs_identical"] is True and results["repeats"] == 1
    assert c == pytest.approx(results["draft_step_ms"] / results["target_step_ms"])
    assert sorted(map(int, results["verify_ms"])) == [1, 2, 3, 4]
    assert 0 < results["plain"]["tokens"] <= len(benchmark.PROMPTS) * 12 and results["plain"]["tokens_per_second"] > 0
    for r in rows:
        if r["acceptance_rate"] is None:  # nothing drafted (an adaptive row that chose k 0 throughout): undefined
            assert r["alpha"] is None
            continue
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and 0.0 <= r["alpha"] <= 1.0
        assert r["acceptance_rate"] <= r["alpha"] + 1e-9  # drafts after a rejection count as drafted, not judged
        assert r["efficiency"] == pytest.approx(r["wall_speedup"] / r["predicted_speedup"])
        assert r["efficiency_with_verify_cost"] == pytest.approx(r["wall_speedup"] / r["predicted_with_verify_cost"])
        assert r["tokens"] == results["plain"]["tokens"] and r["tokens_per_second"] > 0
        assert r["target_pass_speedup"] >= 1.0 and 0 <= r["host_ms"] < r["step_ms"]
        assert r["identical"] is (True if r["delta"] == 0 else None)
    for r in rows[:2]:
        g = r["num_draft"]
        # The expected tokens per step as a finite sum, which also holds at alpha 1.
        expected = sum(r["alpha"] ** i for i in range(g + 1))
        assert r["predicted_speedup"] == pytest.approx(expected / (g * c + 1))
        verify = results["verify_ms"][str(g + 1)] / results["verify_ms"]["1"]
        assert r["predicted_with_verify_cost"] == pytest.approx(expected / (g * c + verify))
        assert r["mean_num_draft"] <= g
    assert rows[0]["acceptance_rate"] == pytest.approx(rows[0]["alpha"])  # one draft: the same thing
    assert 0 <= rows[2]["mean_num_draft"] <= 3 and rows[4]["drafter"] == "lookup"
    assert rows[3]["departure"]["prompts"] == len(benchmark.PROMPTS)
    assert results["best_num_draft"] in (1, 3)
    assert [b["batch_size"] for b in results["batches"]] == [1, 3]
    for b in results["batches"]:
        by_g = {int(g): rate for g, rate in b["speculative_by_num_draft"].items()}
        assert set(by_g) == {g for g in (1, 3) if g <= results["best_num_draft"]}
        assert b["speculative_tokens_per_second"] == by_g[b["num_draft"]] == max(by_g.values())
        assert b["adaptive_tokens_per_second"] > 0
    if plot:
        assert picture.read_bytes().startswith(b"\x89PNG")


def test_eps_sweep_summarises_each_pair(tmp_path):
    out = tmp_path / "sweep.json"
    result = run_benchmark(*TINY, "--num-draft", "2", "--eps", "0.05", "0.5", "--json", out)
    assert result.returncode == 0, result.stderr
    sweep = json.loads(out.read_text())["sweep"]
    assert [s["eps"] for s in sweep] == [0.05, 0.5]
    assert "Sweep over eps" in result.stdout and all(s["outputs_identical"] for s in sweep)
    # The farther target agrees less with its draft.
    alpha = [next(r for r in s["speculative"] if r["label"] == "g 2")["alpha"] for s in sweep]
    assert alpha[0] > alpha[1]


def test_compare_hf(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    result = run_benchmark(*TINY, "--max-tokens", "8", "--num-draft", "2", "--compare-hf", "--json", out)
    assert result.returncode == 0, result.stderr
    hf = json.loads(out.read_text())["hf"]
    assert hf["greedy"]["tokens_per_second"] > 0 and hf["assisted"]["tokens_per_second"] > 0
    assert hf["assisted"]["num_draft"] == 2 and hf["greedy"]["tokens"] == len(benchmark.PROMPTS) * 8
    # Same checkpoint, greedy: transformers decodes the tokens we decode, with or without its assistant.
    plain = json.loads(out.read_text())["plain_outputs"]
    assert hf["greedy"]["outputs"] == hf["assisted"]["outputs"] == hf["assisted_default"]["outputs"] == plain
    assert "ours / transformers" in result.stdout


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_family_pair_against_transformers(tmp_path, family):
    """--family: a causal synthetic pair; speculative output and transformers' greedy are our plain output."""
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    result = run_benchmark(*TINY, "--family", family, "--num-draft", "2", "--compare-hf", "--json", out)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert f"synthetic {family} pair" in result.stdout and results["outputs_identical"] is True
    assert results["hf"]["greedy"]["outputs"] == results["plain_outputs"]
    assert results["hf"]["assisted"]["outputs"] == results["plain_outputs"]


def test_plot_without_matplotlib_is_one_error_line(tmp_path):
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['benchmark.py', '--plot', {str(tmp_path / 'b.png')!r}]; "
        "runpy.run_path('benchmark.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "matplotlib" in one_error_line(result)


@pytest.mark.parametrize("args", [
    ["--num-draft", "0"],
    ["--num-draft", "2", "-1"],
    ["--max-tokens", "0"],
    ["--model", "x"],
    ["--model", "no-such-model", "--draft-model", "no-such-draft"],
    ["--prompt-file", "no-such-file.jsonl"],
    ["--json", "no-such-folder/b.json"],
    ["--delta", "0", "1.5"],
    ["--eps", "-1"],
    ["--model", "a", "--draft-model", "b", "--eps", "0.1", "0.2"],
    ["--hf-model", "x", "--hf-draft-model", "y", "--compare-hf"],
])
def test_bad_arguments(args):
    one_error_line(run_benchmark(*args, timeout=60))
