"""calibration.py: step costs measured on purpose, kept per machine in a small file, read back safely."""

import json
import multiprocessing
import os
import stat
import statistics
import threading

import pytest
from conftest import OFTEN, one_error_line, run_script
from test_decoder import MAX_TOKENS, prompt_ids

import api
import calibration
import decoder
import policy
from engine import Engine


@pytest.fixture
def costs_file(tmp_path, monkeypatch):
    """The step-cost file of this test alone (never the user's cache); warnings shown afresh."""
    file = tmp_path / "cache" / "step-costs.json"
    monkeypatch.setenv("MLX_T5_STEP_COSTS", str(file))
    monkeypatch.setattr(calibration, "_warned", set())
    return file


def fields(**changes):
    """Identity fields of an entry (as calibration.identity gives them), without loading models."""
    return {**calibration.machine(), "target": "/models/target", "draft": "/models/draft", "dtype": "float32",
            "batch": 1, **changes}


COSTS = policy.Components(0.0004, 0.003, {1: 0.020, 2: 0.024, 3: 0.027, 4: 0.031})


def test_the_file_lives_in_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLX_T5_STEP_COSTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.path() == tmp_path / "mlx-speculative" / "step-costs.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(calibration.path()).endswith(os.path.join(".cache", "mlx-speculative", "step-costs.json"))


def test_round_trip(costs_file):
    calibration.store(fields(), COSTS, [30.0, 40.0])
    entry = calibration.lookup(fields())
    assert calibration.components(entry) == COSTS
    chosen = calibration.adaptive_policy(8, fields())
    assert chosen.costs.calibrated(1) and not chosen.costs.calibrated(2)
    assert chosen.costs.components[1].step(1, 3) == pytest.approx(COSTS.step(1, 3))
    assert chosen.pooled == pytest.approx([24.0, 32.0])  # the ratio kept, at most 32 judged drafts' weight
    # Another batch size, target or dtype is another entry.
    for other in (dict(batch=2), dict(target="/models/other"), dict(dtype="bfloat16")):
        assert calibration.lookup(fields(**other)) is None
        assert not calibration.adaptive_policy(8, fields(**other)).costs.calibrated(1)


def test_file_follows_the_umask(costs_file):
    previous = os.umask(0o027)
    try:
        calibration.store(fields(), COSTS)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(costs_file.stat().st_mode) == 0o640


@pytest.mark.parametrize("foreign", [dict(processor="Another CPU"), dict(mlx="0.1.0"), dict(device="Device(gpu, 0)"),
                                     dict(blas="libopenblas.so.0")])
def test_an_entry_of_another_machine_or_mlx_version_is_ignored(costs_file, monkeypatch, foreign):
    theirs = dict(calibration.machine(), **foreign)
    calibration.store(dict(fields(), **foreign), COSTS)
    assert calibration.lookup(fields()) is None
    assert not calibration.adaptive_policy(8, fields()).costs.calibrated(1)
    # ... and stays in the file for its own machine.
    monkeypatch.setattr(calibration, "machine", lambda: theirs)
    assert calibration.lookup(fields()) is not None


@pytest.mark.parametrize("text", ["{not json", "", '{"entries": [1, 2]}', '["entries"]', '{"entries": {"k": 3}}',
                                  "\udcff"])
def test_a_damaged_file_is_ignored_with_one_warning(costs_file, capsys, text):
    costs_file.parent.mkdir(parents=True)
    costs_file.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert calibration.read() == {}
    assert calibration.lookup(fields()) is None
    assert not calibration.adaptive_policy(8, fields()).costs.calibrated(1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ignoring the step-cost file")
    # The next write replaces it with a good file.
    calibration.store(fields(), COSTS)
    assert calibration.components(calibration.lookup(fields())) == COSTS


def test_an_entry_without_valid_costs_is_ignored(costs_file):
    calibration.store(fields(), COSTS)
    data = json.loads(costs_file.read_text())
    (entry,) = data["entries"].values()
    entry["verify"] = {"1": -0.5}
    costs_file.write_text(json.dumps(data))
    assert calibration.lookup(fields()) is None


def write_many(file, writer, times):
    os.environ["MLX_T5_STEP_COSTS"] = str(file)
    for time in range(times):
        calibration.store(fields(target=f"/models/{writer}"), COSTS.scaled(1 + time), [time, times])


def test_concurrent_writers_do_not_corrupt_the_file(costs_file):
    """Several processes writing at once: the file always parses and keeps every writer's last entry."""
    writers, times = 6, 15
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each, as separate runs would be
    processes = [context.Process(target=write_many, args=(costs_file, w, times)) for w in range(writers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 0
    entries = calibration.read()
    assert len(entries) == writers
    for w in range(writers):
        entry = calibration.lookup(fields(target=f"/models/{w}"))
        assert entry["acceptance"] == [times - 1, times]
        assert calibration.components(entry).draft == pytest.approx(COSTS.draft * times)
    assert not [p for p in costs_file.parent.iterdir() if p.suffix == ".tmp"]


def test_measure_times_every_component(load_pair, costs_file):
    target, draft, tokenizer = load_pair(OFTEN)
    ids = prompt_ids(tokenizer)[0]
    for batch in (1, 2):
        measured = calibration.measure(target, draft, ids, most=3, batch=batch, calls=3)
        # Rows = tokens x batch, and at batch 2 also one row's passes (the batch's last prompt).
        assert sorted(measured.verify) == sorted({n * size for size in {1, batch} for n in range(1, 5)})
        assert measured.draft > 0 and measured.host > 0 and min(measured.verify.values()) > 0
        fitted = [measured.verify_at(rows) for rows in range(1, 4 * batch + 3)]
        assert fitted == sorted(fitted)


def test_a_calibrated_run_is_exact_and_writes_back(load_pair, pair_dirs, costs_file):
    """Greedy output under a policy that starts from stored costs equals the target's; the run's
    acceptance and rescaled costs go back into the file."""
    target, draft, tokenizer = load_pair(OFTEN)
    target_dir, draft_dir = pair_dirs(OFTEN)
    ids = prompt_ids(tokenizer)
    mine = calibration.identity(target_dir, draft_dir, 1)
    # Costs under which drafting pays (a tiny pair's own seldom do: its draft costs about what its target does).
    calibration.store(mine, policy.Components(0.0, 1e-5, {rows: 1e-3 for rows in range(1, 10)}))
    chosen = calibration.adaptive_policy(8, mine)
    assert chosen.costs.calibrated(1) and chosen.pooled == [0.0, 0.0]
    for prompt in ids:
        assert list(decoder.speculative_generate(target, draft, prompt, MAX_TOKENS, schedule=chosen)) == \
            list(decoder.generate(target, prompt, MAX_TOKENS))
    assert calibration.remember(chosen, mine)
    entry = calibration.lookup(mine)
    assert entry["acceptance"][1] > 0 and entry["acceptance"][0] <= entry["acceptance"][1]
    assert calibration.components(entry) == chosen.costs.calibration(1)
    # An uncalibrated run leaves the file alone.
    assert not calibration.remember(policy.AdaptivePolicy(8), dict(mine, batch=3))
    assert calibration.lookup(dict(mine, batch=3)) is None


def test_an_uncalibrated_run_keeps_what_it_timed_and_the_next_starts_from_it(load_pair, pair_dirs, costs_file):
    """A user's first run, with nothing kept, writes each k's median step back; the next run predicts
    every k from its first step (no exploring), and decodes the same."""
    target, draft, tokenizer = load_pair(OFTEN)
    mine = calibration.identity(*pair_dirs(OFTEN), 1)
    first = calibration.adaptive_policy(4, mine)
    assert not first.costs.calibrated(1)
    for prompt in prompt_ids(tokenizer):
        assert list(decoder.speculative_generate(target, draft, prompt, MAX_TOKENS, schedule=first)) == \
            list(decoder.generate(target, prompt, MAX_TOKENS))
    assert calibration.remember(first, mine)
    kept = calibration.components(calibration.lookup(mine))
    timed = {k: statistics.median(samples) for (batch, k), samples in first.costs.samples.items() if samples}
    assert 0 in timed and len(timed) >= 2
    assert {rows - 1: seconds for rows, seconds in kept.verify.items()} == pytest.approx(timed)
    second = calibration.adaptive_policy(4, mine)
    assert second.costs.calibrated(1) and set(second.costs.table(1, range(5))) == set(range(5))
    for prompt in prompt_ids(tokenizer):
        assert list(decoder.speculative_generate(target, draft, prompt, MAX_TOKENS, schedule=second)) == \
            list(decoder.generate(target, prompt, MAX_TOKENS))


def test_the_engine_starts_from_the_costs_kept_at_each_batch_size_and_keeps_its_own(pair_dirs, costs_file):
    """A server's batch grows and shrinks: its policy starts from every batch size's kept costs, and
    what it timed goes back at the end."""
    target_dir, draft_dir = pair_dirs(OFTEN)
    pair = api.load(str(target_dir), str(draft_dir))
    mine = calibration.identity(target_dir, draft_dir, 1)
    calibration.store(dict(mine, batch=2), policy.Components(0.0, 1e-4, {2: 2e-3, 4: 2.2e-3, 6: 2.4e-3}))
    engine = Engine(pair, max_batch=3, num_draft=2)
    assert engine.policy.costs.calibrated(2) and not engine.policy.costs.calibrated(1)
    assert not engine.policy.costs.calibrated(3)
    done = threading.Event()
    ids = pair.tokenizer("Close the file.").input_ids
    engine.submit(ids, api.Settings(max_tokens=24), lambda event: event.finish_reason and done.set())
    try:
        assert done.wait(120)
    finally:
        engine.close()
        engine.join()
    assert calibration.lookup(dict(mine, batch=1)) is not None  # it decoded at batch size 1: kept now
    assert calibration.lookup(dict(mine, batch=3)) is None


def test_main_calibrates_then_runs_from_the_kept_costs(pair_dirs, costs_file):
    """`main.py --calibrate` measures and keeps an entry; an adaptive run then starts from it and writes back."""
    target_dir, draft_dir = pair_dirs(OFTEN)
    models = ("--model", target_dir, "--draft-model", draft_dir)
    done = run_script("main.py", *models, "--calibrate", "--num-draft", 3, "--prompt", "Close the file.")
    assert done.returncode == 0, done.stderr
    assert "| 3 | 4 |" in done.stdout and str(costs_file) in done.stdout
    mine = calibration.identity(target_dir, draft_dir, 1)
    entry = calibration.lookup(mine)
    assert sorted(map(int, entry["verify"])) == [1, 2, 3, 4] and entry["acceptance"] is None
    # Kept costs under which drafting pays (the tiny pair's own do not): the run drafts and writes back.
    cheap = policy.Components(0.0, 1e-5, {1: 1e-3, 4: 1.1e-3})
    calibration.store(mine, cheap)
    run = run_script("main.py", *models, "--num-draft", 3, "--max-tokens", 16, "--prompt", "Close the file.", "--json")
    assert run.returncode == 0, run.stderr
    entry = calibration.lookup(mine)
    assert entry["acceptance"][1] > 0  # the pooled acceptance it saw
    assert calibration.components(entry).draft != cheap.draft  # the costs, rescaled to the steps it timed
    assert calibration.lookup(dict(mine, batch=2)) is None
    # A constant schedule or plain decoding neither reads nor writes the file.
    before = costs_file.read_text()
    for flags in (["--draft-schedule", "constant"], ["--regular-decode"]):
        assert run_script("main.py", *models, "--max-tokens", 4, "--prompt", "Close.", *flags).returncode == 0
    assert costs_file.read_text() == before
    assert "not with --prompt-lookup" in one_error_line(run_script("main.py", *models, "--calibrate",
                                                                   "--prompt-lookup"))


def test_a_file_that_cannot_be_written(pair_dirs, tmp_path, monkeypatch, capsys):
    """A run still ends well, with a warning; --calibrate, whose point is the file, is one error line."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLX_T5_STEP_COSTS", str(blocker / "step-costs.json"))
    chosen = policy.AdaptivePolicy(4, policy.StepCosts({1: COSTS}))
    assert not calibration.remember(chosen, fields())
    assert "warning: the step costs were not kept" in capsys.readouterr().err
    target_dir, draft_dir = pair_dirs(OFTEN)
    line = one_error_line(run_script("main.py", "--model", target_dir, "--draft-model", draft_dir, "--calibrate",
                                     "--num-draft", 2, "--prompt", "Close."))
    assert "cannot keep the step costs" in line
