"""Nothing a user owns is lost, and every failure is one line (`error: ...`, exit code 2).

convert.py's output folder (replaced only when convert.py wrote it), damaged inputs,
read-only and full disks, Ctrl-C in the middle of a conversion, and damaged model
folders handed to main.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from conftest import ROOT, one_error_line, run_script

import convert
import model
import synthetic


def files_of(folder):
    """{relative path: bytes} of every file under `folder`: what must stay untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_convert(*args, cwd):
    return run_script("convert.py", *args, cwd=cwd, timeout=120)


def staging_left(parent):
    """Hidden folders convert.py stages its output in, left behind in `parent`."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def source(v1, tmp_path_factory):
    """A Hugging Face checkpoint folder (read only by these tests)."""
    return synthetic.save_checkpoint(tmp_path_factory.mktemp("safety") / "hf", *v1)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """A folder convert.py wrote; tests copy it before changing anything."""
    return convert.convert(str(source), str(tmp_path_factory.mktemp("converted") / "mlx"))


def user_folder(folder, converted):
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "data").mkdir()
    (folder / "data" / "results.csv").write_text("1,2,3\n")
    return folder


def our_folder_with_a_user_file(folder, converted):
    shutil.copytree(converted, folder)
    (folder / "notes.txt").write_text("mine")
    return folder


def our_folder_with_a_user_subfolder(folder, converted):
    shutil.copytree(converted, folder)
    (folder / "runs").mkdir()
    (folder / "runs" / "log.txt").write_text("mine")
    return folder


def our_folder_with_a_damaged_marker(folder, converted):
    """Without a readable list of what convert.py wrote, nothing in the folder is known to be ours."""
    shutil.copytree(converted, folder)
    (folder / convert.MARKER).write_text("not json")
    return folder


@pytest.mark.parametrize("make,message", [
    (user_folder, "was not written by convert.py"),
    (our_folder_with_a_user_file, "holds 'notes.txt', which convert.py did not write"),
    (our_folder_with_a_user_subfolder, "holds 'runs', which convert.py did not write"),
    (our_folder_with_a_damaged_marker, "was not written by convert.py"),
])
def test_an_existing_folder_not_wholly_ours_is_refused(source, converted, tmp_path, make, message):
    out = make(tmp_path / "out", converted)
    before = files_of(out)
    line = one_error_line(run_convert("--model", source, "--mlx-path", out, cwd=tmp_path))
    assert message in line and str(out) in line
    assert files_of(out) == before and not staging_left(tmp_path)


def test_an_existing_folder_we_wrote_is_replaced(source, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / "model.safetensors").write_bytes(b"an older, damaged conversion")
    result = run_convert("--model", source, "--mlx-path", out, "--dtype", "bfloat16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = json.loads((out / convert.MARKER).read_text())["files"]
    assert listed == sorted(set(files_of(converted)) - {convert.MARKER})
    assert mx.load(str(out / "model.safetensors"))["shared.weight"].dtype == mx.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_folder_is_filled(source, tmp_path):
    """An empty folder holds nothing to lose (a user may make it first)."""
    (tmp_path / "out").mkdir()
    assert run_convert("--model", source, "--mlx-path", "out", cwd=tmp_path).returncode == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not staging_left(tmp_path)


@pytest.mark.parametrize("mlx_path,cwd,message", [
    (".", "work", "is the current folder or holds it"),
    ("..", "work", "is the current folder or holds it"),
    ("/", "work", "is the current folder or holds it"),
    ("hf", None, "holds the checkpoint being converted"),
    (".", "hf", "is the current folder or holds it"),
])
def test_busy_parent_and_source_folders_are_refused(source, tmp_path, mlx_path, cwd, message):
    """`--mlx-path .` once failed with a raw 'Device or resource busy'; the source folder must never go."""
    root = tmp_path / "root"
    shutil.copytree(source, root / "hf")
    (root / "work").mkdir()
    (root / "work" / "mine.txt").write_text("mine")
    before = files_of(root)
    line = one_error_line(run_convert("--model", root / "hf", "--mlx-path", mlx_path, cwd=root / (cwd or "")))
    assert message in line
    assert files_of(root) == before and staging_left(root) == [] and staging_left(root / "work") == []


def test_a_symbolic_link_is_refused(source, converted, tmp_path):
    shutil.copytree(converted, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    line = one_error_line(run_convert("--model", source, "--mlx-path", tmp_path / "link", cwd=tmp_path))
    assert "symbolic link" in line
    assert (tmp_path / "link").is_symlink() and files_of(tmp_path / "real") == files_of(converted)


def test_a_file_in_the_way_of_the_output_folder(source, tmp_path):
    (tmp_path / "taken").write_text("mine")
    line = one_error_line(run_convert("--model", source, "--mlx-path", tmp_path / "taken" / "out", cwd=tmp_path))
    assert "cannot write" in line and "taken" in line
    assert (tmp_path / "taken").read_text() == "mine"


def set_config(folder, **changes):
    """Rewrite config.json with `changes`; a value of None removes the key."""
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def replace_with_folder(path):
    path.unlink()
    path.mkdir()


def sharded_without_a_shard(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"shared.weight": "part-2.st"}}))


# Each damages a copy of a good checkpoint folder; convert.py must name the problem.
DAMAGED_CHECKPOINTS = {
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{'d_model': 64"), "not valid JSON"),
    "config.json empty": (lambda f: (f / "config.json").write_text(""), "not valid JSON"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "config.json a folder": (lambda f: replace_with_folder(f / "config.json"), "config.json: Is a directory"),
    "config.json without d_ff": (lambda f: set_config(f, d_ff=None), "'d_ff' must be a positive integer"),
    "config.json d_model a string": (lambda f: set_config(f, d_model="64"), "'d_model' must be a positive integer"),
    "feed_forward_proj unknown": (lambda f: set_config(f, feed_forward_proj="swish"), "swish"),
    "d_model that the weights do not fit": (lambda f: set_config(f, d_model=32), "config.json implies"),
    "weights empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "not a valid safetensors file"),
    "weights a folder": (lambda f: replace_with_folder(f / "model.safetensors"), "Is a directory"),
    "index naming a missing shard": (sharded_without_a_shard, "lacks shard part-2.st"),
    "index not JSON": (lambda f: (f / "model.safetensors.index.json").write_text("{"), "not valid JSON"),
    "index without weight_map": (lambda f: (f / "model.safetensors.index.json").write_text("{}"),
                                 "no valid weight_map"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "has no model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_CHECKPOINTS))
def test_damaged_checkpoints_are_one_line(source, tmp_path, case):
    damage, message = DAMAGED_CHECKPOINTS[case]
    folder = tmp_path / "hf"
    shutil.copytree(source, folder)
    damage(folder)
    before = files_of(folder)
    line = one_error_line(run_convert("--model", folder, "--mlx-path", tmp_path / "out", cwd=tmp_path))
    assert message in line
    assert files_of(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("args,message", [
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    ([], "the following arguments are required: --model"),
    (["--model"], "expected one argument"),
    (["--unknown"], "unrecognized arguments: --unknown"),
    (["--model", ""], "--model and --mlx-path must not be empty"),
    (["--mlx-path", " "], "--model and --mlx-path must not be empty"),
])
def test_bad_convert_flags_are_one_line(source, tmp_path, args, message):
    if args and args[0] != "--model":
        args = ["--model", str(source), *args]
    assert message in one_error_line(run_convert(*args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """mount(options) -> a fresh tmpfs folder; skips where mounting is not permitted."""
    mounted = []

    def mount(options):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_previous_output(source, converted, tmp_path, small_disk):
    size = sum(len(data) for data in files_of(converted).values())
    disk = small_disk(f"size={size * 3 // 2 // 1024}k")  # room for one conversion, not two
    shutil.copytree(converted, disk / "out")
    before = files_of(disk / "out")
    line = one_error_line(run_convert("--model", source, "--mlx-path", disk / "out", cwd=tmp_path))
    assert "cannot write" in line and "disk" in line
    assert files_of(disk / "out") == before and os.listdir(disk) == ["out"]


def test_a_read_only_disk_is_one_line(source, tmp_path, small_disk):
    disk = small_disk("ro,size=1m")
    line = one_error_line(run_convert("--model", source, "--mlx-path", disk / "out", cwd=tmp_path))
    assert line == f"error: cannot write {disk / 'out'}: Read-only file system"
    assert os.listdir(disk) == []


# convert.main with each tensor slowed down, so that a signal lands in the middle of the writing.
SLOW_CONVERT = """
import sys, time
sys.path.insert(0, sys.argv.pop(1))
import convert
add = convert.ShardWriter.add
convert.ShardWriter.add = lambda self, name, array: (time.sleep(0.1), add(self, name, array))[1]
convert.main()
"""


def test_ctrl_c_mid_conversion_keeps_the_previous_output(source, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    before = files_of(out)
    args = [sys.executable, "-c", SLOW_CONVERT, str(ROOT), "--model", str(source), "--mlx-path", str(out),
            "--dtype", "bfloat16"]
    process = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(tmp_path.glob(".out.*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # well into the tensors (each takes 0.1 s)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    result = subprocess.CompletedProcess(args, process.wait(timeout=60), "", process.stderr.read())
    assert one_error_line(result) == "error: interrupted; no partial output was left"
    assert files_of(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupts_wait_for_a_held_block():
    """A rename pair or a clean-up is never cut in half: Ctrl-C lands after the block."""
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with convert.interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished = True
    assert finished


def test_an_unreachable_hub_fails_fast_and_suggests_a_folder(tmp_path, monkeypatch):
    """huggingface_hub's list_repo_files retried for 23 s; model_info fails at once."""
    import huggingface_hub

    def unreachable(repo_id):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(convert.ConvertError, match="Name or service not known.*--model path/to/folder"):
        convert.convert("t5-small")
    assert list(tmp_path.iterdir()) == []


def without_model_type(folder):
    set_config(folder, model_type=None)


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Each damages a copy of a converted folder; loading must name the problem and what to run.
DAMAGED_MODELS = {
    "weights truncated": (lambda f: truncated(f / "model.safetensors"),
                          r"model.safetensors is damaged or incomplete \(.*invalid data offsets.*convert the model"),
    "weights empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors is damaged"),
    "weights a folder": (lambda f: replace_with_folder(f / "model.safetensors"), "model.safetensors is damaged"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no weights in .*; convert it again"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
    "config.json a folder": (lambda f: replace_with_folder(f / "config.json"), "config.json: Is a directory"),
    "config.json without model_type": (without_model_type, "names no model_type; convert the model again"),
    "config.json without d_model": (lambda f: set_config(f, d_model=None), "missing .* 'd_model'"),
    "config.json unknown model_type": (lambda f: set_config(f, model_type="bert"),
                                       "model_type 'bert' is not supported"),
    "config.json d_model the weights do not fit": (lambda f: set_config(f, d_model=32),
                                                  r"do not fit its config: Expected shape \(1104, 32\)"),
    "index naming a missing shard": (sharded_without_a_shard, "lacks shard part-2.st named in"),
    "a tensor missing": (lambda f: set_config(f, num_decoder_layers=3), r"lacks \d+ of the model's tensors"),
    "tokenizer.json damaged": (lambda f: (f / "tokenizer.json").write_text("{"), "tokenizer in .* could not be loaded"),
    "no tokenizer": (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "spiece.model")], "no tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_MODELS))
def test_damaged_model_folders_are_one_line_errors(converted, tmp_path, case):
    damage, message = DAMAGED_MODELS[case]
    folder = tmp_path / "mlx"
    shutil.copytree(converted, folder)
    damage(folder)
    with pytest.raises(model.LoadError, match=message) as error:
        model.load(folder)
    assert "\n" not in str(error.value)


def test_an_unconverted_checkpoint_says_to_run_convert(source, v1, tmp_path):
    """A Hugging Face folder handed to main.py: not hundreds of tensor names, but what to run."""
    pytest.importorskip("torch")
    bin_only = synthetic.save_checkpoint(tmp_path / "bin", *v1, fmt="bin")
    for folder in (source, bin_only):
        line = one_error_line(run_script("main.py", "--model", folder, "--regular-decode", cwd=tmp_path))
        assert line.endswith(f"python convert.py --model {folder}") and len(line) < 300
