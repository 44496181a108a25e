"""What a new user meets first: files that follow the umask, the tests' own cache, undefined
ratios printed as such, family mismatches named, the quick benchmark and its guard."""

import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import ROOT, one_error_line, run_script

import benchmark
import convert
import decoder
import files
import main
import synthetic


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def modes_under(root):
    """{path: mode} of root and everything below it."""
    found = {root: mode(root)}
    for folder, names, file_names in os.walk(root):
        for name in names + file_names:
            found[os.path.join(folder, name)] = mode(os.path.join(folder, name))
    return found


@settings(max_examples=30, deadline=None)
@given(mask=st.integers(0, 0o777))
def test_written_files_and_folders_follow_any_umask(tmp_path_factory, mask):
    folder = tmp_path_factory.mktemp("umask")
    with umask(mask):
        assert files.umask() == mask
        files.write_atomically(folder / "out.json", "w", lambda f: f.write("{}"))
        made = files.temporary_folder(folder / "x", prefix=".x.")
    assert (folder / "out.json").read_text() == "{}" and not list(folder.glob("*.tmp"))
    assert mode(folder / "out.json") == 0o666 & ~mask
    assert mode(made) == 0o777 & ~mask


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken(f):
        f.write("half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        files.write_atomically(tmp_path / "out.json", "w", broken)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_converted_folder_follows_the_umask(v1_checkpoint, tmp_path, mask):
    with umask(mask):
        out = convert.convert(str(v1_checkpoint), str(tmp_path / "mlx"))
    found = modes_under(str(out))
    assert len(found) > 3
    for path, got in found.items():
        expected = (0o777 if os.path.isdir(path) else 0o666) & ~mask
        assert got == expected, (path, oct(got), oct(expected))


def test_cached_tokenizer_folder_follows_the_umask():
    with umask(0o027):
        folder = synthetic.cached_tokenizer(vocab_size=700, kind="bpe")
    assert all(got == (0o750 if os.path.isdir(path) else 0o640) for path, got in modes_under(str(folder)).items())


def test_the_tests_keep_their_own_synthetic_cache():
    default = Path(tempfile.gettempdir()) / "t5-speculative-synthetic"
    assert synthetic.CACHE.resolve() != default.resolve()
    assert synthetic.CACHE == Path(os.environ["MLX_T5_SYNTHETIC_CACHE"])


# The benchmark: a quick default run, the full sweep behind --full, and no verdict from untrustworthy timings.

def test_quick_default_and_full_sweep():
    quick, full = benchmark.parse_args([]), benchmark.parse_args(["--full"])
    assert (quick.num_draft, quick.max_tokens, quick.repeats) == ([1, 2, 4], 48, 3)
    assert (full.num_draft, full.max_tokens) == (list(range(1, 9)), 128)
    mine = benchmark.parse_args(["--full", "--num-draft", "3", "--max-tokens", "9", "--repeats", "1"])
    assert (mine.num_draft, mine.max_tokens, mine.repeats) == ([3], 9, 1)
    # Plain, a few g and adaptive: what the default run shows.
    assert [s.label for s in benchmark.settings_for(quick)] == ["plain", "g 1", "g 2", "g 4", "adaptive"]


def results_like(others=0.05, spreads=(0.03, 0.04), verify=(10.0, 13.0, 16.0), repeats=3):
    """The fields distrust() and best_line() read, as a quiet or a busy run would leave them."""
    rows = [dict(label=f"g {i + 1}", delta=0, tokens_per_second=50.0 + i, tokens_per_second_spread=s)
            for i, s in enumerate(spreads)]
    return dict(load=dict(cpus=2, others_cpu_share=others, load_average=[0.5, 1.2]), repeats=repeats,
                plain=dict(tokens=256, seconds=[6.0, 6.1, 6.05][:repeats]), speculative=rows,
                verify_ms={str(n + 1): ms for n, ms in enumerate(verify)})


def verdict(**kwargs):
    results = results_like(**kwargs)
    results["trust"] = dict(reasons=benchmark.distrust(results))
    return results["trust"]["reasons"], benchmark.best_line(results)


def test_a_quiet_run_gets_a_verdict():
    reasons, line = verdict()
    assert reasons == [] and line.startswith("Fastest: g 2") and "within the repeats' spread of +-4.0%" in line


@pytest.mark.parametrize("kwargs, why", [
    (dict(others=0.6), "other processes took 60% of the machine's CPU time"),
    (dict(spreads=(0.03, 1.69)), "scatter by +-169% (g 2"),
    (dict(verify=(10.0, 13.0, 43.0)), "a target pass over 3 tokens measured 4.3 one-token steps"),
])
def test_untrustworthy_timings_get_no_verdict(kwargs, why):
    reasons, line = verdict(**kwargs)
    assert len(reasons) == 1 and why in reasons[0]
    assert line.startswith("No verdict") and why in line and "Fastest" not in line


def test_one_repeat_has_no_spread():
    assert benchmark.spread([42.0]) == (42.0, None) and benchmark.spread([40.0, 44.0]) == (42.0, 2 / 42)
    reasons, line = verdict(spreads=(None, None), repeats=1)
    assert reasons == [] and "+-0.0%" not in line and "one repeat" in line
    assert benchmark.plus_minus(None) == "n/a" and benchmark.ratio(None) == "n/a"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the machine's CPU time comes from /proc/stat")
def test_other_processes_cpu_time_is_measured():
    start = benchmark.cpu_times()
    burn = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    children = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(os.cpu_count() or 1)]
    for child in children:
        child.wait()
    load = benchmark.machine_load(start, benchmark.cpu_times())
    # Children are other processes: they kept the CPUs busy for most of the window.
    assert load["cpus"] >= 1 and load["others_cpu_share"] > 0.5


# main.py: the way in without models, undefined ratios, family mismatches.

def test_main_without_models_shows_the_offline_way_in(tmp_path):
    line = one_error_line(run_script("main.py", cwd=tmp_path, timeout=120))
    assert "convert first: python convert.py --model t5-11b" in line and "python benchmark.py" in line


def test_a_t5_target_with_a_gpt2_draft_is_named_as_different_families(pair_dirs):
    target, draft = pair_dirs(0.05)[0], pair_dirs(0.05, family="gpt2")[1]
    line = one_error_line(run_script("main.py", "--model", target, "--draft-model", draft, "--max-tokens", 2, timeout=120))
    assert "different families (gpt2 draft, t5 target)" in line and "vocabularies" not in line


def test_summary_says_undefined_ratios_are_undefined():
    nothing = decoder.Stats(generated=3, target_calls=3)
    assert "acceptance n/a" in main.summary([nothing], 0.5, True) and "0.00" not in main.summary([nothing], 0.5, True)
    assert "n/a tok/s" in main.summary([decoder.Stats()], 0.0, True)
    some = decoder.Stats(generated=4, drafted=4, accepted=3, target_calls=2)
    assert "acceptance 0.75" in main.summary([some], 1.0, True) and "(0.50 per token)" in main.summary([some], 1.0, True)


def test_benchmark_ends_with_the_main_command_that_runs_on_its_pair(tmp_path):
    """The README's offline path: benchmark.py builds the pair and prints main.py's command; it runs.
    Its --json and --markdown files follow the umask."""
    out, report = tmp_path / "b.json", tmp_path / "b.md"
    with umask(0o027):
        result = run_script("benchmark.py", "--layers", 3, "--d-model", 64, "--max-tokens", 8, "--repeats", 1,
                            "--num-draft", 1, "--json", out, "--markdown", report, timeout=600)
    assert result.returncode == 0, result.stderr
    assert mode(out) == mode(report) == 0o640
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[:2] == ["python", "main.py"]
    run = run_script("main.py", *command[2:], "--max-tokens", 4, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("[4 tokens")


def test_stats_leave_undefined_ratios_undefined(pair_dirs):
    assert decoder.Stats(generated=2, target_calls=2).acceptance_rate is None and decoder.Stats().tokens_per_second is None
    assert decoder.Stats(drafted=4, accepted=1).acceptance_rate == 0.25
    target, draft = pair_dirs(0.05)
    result = run_script("main.py", "--model", target, "--draft-model", draft, "--regular-decode", "--json",
                        "--max-tokens", 3, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout.splitlines()[0])["stats"]
    assert stats["drafted"] == 0 and stats["acceptance_rate"] is None and stats["tokens_per_second"] > 0


def test_the_tokenizers_training_text_does_not_depend_on_what_was_imported_first():
    """With caches of their own the tests train their tokenizers in their own process, where
    torch or typing_extensions may already have replaced docstrings the text is read from."""
    code = "{}\nimport hashlib, json, synthetic\nprint(hashlib.sha256(json.dumps(synthetic.corpus_sentences()).encode()).hexdigest())"
    firsts = ["pass", "import typing_extensions", "import torch" if find_spec("torch") else "pass"]
    digests = {subprocess.run([sys.executable, "-c", code.format(first)], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout for first in firsts}
    assert len(digests) == 1
