"""benchmark.py runs end to end and its numbers are consistent (not a timing test)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

import benchmark


def test_predicted_speedup_formula():
    assert benchmark.predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert benchmark.predicted_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    a, g, c = 0.7, 3, 0.05
    assert benchmark.predicted_speedup(a, g, c) == pytest.approx((1 + a + a**2 + a**3) / (g * c + 1))


def test_small_run_reports_consistent_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmark.py"), "--layers", "3", "--d-model", "64", "--max-tokens", "12",
         "--num-draft", "1", "3", "--repeats", "1", "--batch-size", "1", "3", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "| num_draft |" in result.stdout
    results = json.loads(out.read_text())
    rows = results["speculative"]
    assert [r["num_draft"] for r in rows] == [1, 3]
    for r in rows:
        assert r["identical"] is True
        assert 0.0 <= r["acceptance_rate"] <= 1.0 and 0.0 <= r["alpha"] <= 1.0
        expected = benchmark.predicted_speedup(r["alpha"], r["num_draft"], results["cost_ratio"])
        assert r["predicted_speedup"] == pytest.approx(expected)
        assert r["efficiency"] == pytest.approx(r["wall_speedup"] / r["predicted_speedup"])
        assert r["target_pass_speedup"] >= 1.0
    assert rows[0]["acceptance_rate"] == pytest.approx(rows[0]["alpha"])  # one draft: the same thing
    assert [b["batch_size"] for b in results["batches"]] == [1, 3]


@pytest.mark.parametrize("args", [["--num-draft", "0"], ["--max-tokens", "0"], ["--model", "x"]])
def test_bad_arguments(args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
