"""Several ranks under mlx.launch (ring backend, on loopback): prompts shared out, the target
pipelined, and a rank that fails.

The reference is always one process: main.py's own output, or decoder.generate on the whole
target. Run as a script (`python tests/test_distributed.py TARGET DRAFT OUT`), this file is
also the rank program of the pipeline sweep.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cpu_blas  # noqa: E402,F401  (before anything imports MLX)

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import decoder  # noqa: E402
import distributed  # noqa: E402
import drafters  # noqa: E402
import model  # noqa: E402
from models.base import Part  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = shutil.which("mlx.launch")
needs_launch = pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed")
PROMPTS = ["Return the number of items.", "Open the file and read it.", "", "A list of values",
           "Compute the sum of two numbers in the list and return it.", "x", "Raise an error when the value is wrong."]
MAX_TOKENS = 12


def free_ports(count):
    """`count` consecutive TCP ports free on loopback now (the ring backend listens on them)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()


def launch(*args, ranks=2, timeout=120):
    """`mlx.launch -n ranks --backend ring -- python ARGS` from the project's folder, finished."""
    command = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--starting-port", str(free_ports(ranks)), "--",
               sys.executable, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_main(*args, ranks=1):
    """main.py's finished process: one process, or `ranks` ranks under mlx.launch."""
    if ranks == 1:
        return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    return launch("main.py", *args, ranks=ranks)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def pairs(pair_dirs):
    """family -> ["--model", target, "--draft-model", draft] of the tests' tiny pairs."""
    return {family: ["--model", target, "--draft-model", draft]
            for family in ("t5", "llama") for target, draft in [pair_dirs(0.05, family=family)]}


SUMMARY = re.compile(r"\[(\d+) tokens, ")


def outputs(result):
    """(records without their timings, or the text lines without the summaries) of a finished main.py."""
    assert result.returncode == 0 and "Traceback" not in result.stderr and "WARN" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    if lines and lines[0].startswith("{"):
        return [{k: v for k, v in json.loads(line).items() if k != "stats"} for line in lines]
    return [line for line in lines if not SUMMARY.match(line)]


def summed(result):
    """The token counts of a finished main.py's summary lines, per prompt and for the run, in order."""
    return [int(m[1]) for line in (result.stdout + result.stderr).splitlines() for m in [SUMMARY.match(line)] if m]


# ----- data parallel -------------------------------------------------------------------------

SHARDED = [
    ("t5", ["--batch-size", "1"]),  # text, streamed by one process, gathered by two
    ("t5", ["--batch-size", "2", "--prompt-lookup", "--json"]),
    ("llama", ["--batch-size", "2", "--draft-schedule", "constant", "--num-draft", "3", "--json"]),
    # Sampling: each prompt samples from a seed of its own, wherever it is decoded.
    ("llama", ["--batch-size", "1", "--draft-schedule", "constant", "--temperature", "1", "--top-p", "0.9",
               "--seed", "7", "--json"]),
]


@needs_launch
@pytest.mark.parametrize("family, flags", SHARDED, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_sharded_prompts_print_what_one_process_prints(pairs, prompt_file, family, flags):
    args = [*pairs[family], "--prompt-file", prompt_file, "--max-tokens", MAX_TOKENS, *flags]
    one, two = run_main(*args), run_main(*args, ranks=2)
    assert outputs(two) == outputs(one)
    if "--json" in flags:
        assert len(outputs(one)) == len(PROMPTS)
    # The statistics count every prompt's tokens, printed by rank 0 alone.
    assert summed(two) == summed(one) and len(summed(one)) == (1 if "--json" in flags else len(PROMPTS) + 1)


# ----- pipeline ------------------------------------------------------------------------------


def sweep(target_dir, draft_dir, out):
    """The rank program of test_pipeline_sweep: rank 0 decodes through the pipelined target
    with every schedule, k and batch size, and writes what differed from the whole target's
    greedy output; the other ranks serve their parts."""
    group = distributed.init()
    if group.rank > 0:
        distributed.serve_target(target_dir, group)
        return
    pipelined, tokenizer = distributed.load_target(target_dir, group)
    whole, draft = model.load(target_dir)[0], model.load(draft_dir)[0]
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:5]]
    expected = [list(decoder.generate(whole, ids, MAX_TOKENS)) for ids in prompts]
    found = {"plain": [list(decoder.generate(pipelined, ids, MAX_TOKENS)) for ids in prompts]}
    # Every k, each batch size (3 refills rows: replace_rows and keep_rows run on every rank).
    runs = [("constant", k, draft, batch) for k, batch in zip(range(1, 6), (1, 3, 2, 3, 1))]
    runs += [("adaptive", 5, draft, 1), ("adaptive", 5, draft, 3), ("constant", 3, drafters.PromptLookupDrafter(), 2)]
    for schedule, k, drafter, batch in runs:
        tokens = [[] for _ in prompts]
        for i, token in decoder.speculative_batch(pipelined, drafter, prompts, MAX_TOKENS, k, batch_size=batch,
                                                  schedule=schedule):
            tokens[i].append(token)
        found[f"{schedule} k {k} batch {batch}{' lookup' if drafter is not draft else ''}"] = tokens
    Path(out).write_text(json.dumps({"differ": [name for name, tokens in found.items() if tokens != expected],
                                     "runs": len(found), "passes": pipelined.passes, "sent": pipelined.link.sent}))
    distributed.finish(pipelined, group)


@needs_launch
@pytest.mark.parametrize("family", ["t5", "llama"])
def test_pipeline_sweep_equals_the_whole_target(pairs, family, tmp_path):
    out = tmp_path / "sweep.json"
    result = launch(__file__, pairs[family][1], pairs[family][3], out)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "WARN" not in result.stderr, result.stderr
    found = json.loads(out.read_text())
    assert found["differ"] == [] and found["runs"] == 9 and found["passes"] > 0


@needs_launch
@pytest.mark.parametrize("family, flags", [
    ("t5", ["--json"]),
    ("llama", ["--batch-size", "2", "--draft-schedule", "constant", "--temperature", "0.8", "--seed", "3", "--json"]),
], ids=["t5 greedy", "llama sampled batch 2"])
def test_pipeline_prints_what_one_process_prints(pairs, prompt_file, family, flags):
    args = [*pairs[family], "--prompt-file", prompt_file, "--max-tokens", MAX_TOKENS, *flags]
    assert outputs(run_main(*args, "--pipeline", ranks=2)) == outputs(run_main(*args))


# ----- failure -------------------------------------------------------------------------------


def start_ranks(tmp_path, args, ranks=2, started=None, env=None):
    """Start the ranks of main.py ourselves, as mlx.launch does (MLX_RANK, MLX_HOSTFILE), but
    without its habit of killing the rest: each rank's own exit shows. `started`: which ranks."""
    port = free_ports(ranks)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(ranks)]))
    processes = {}
    for rank in started if started is not None else range(ranks):
        rank_env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), **(env or {}))
        processes[rank] = subprocess.Popen([sys.executable, "main.py", *map(str, args)], cwd=ROOT, env=rank_env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return processes


def many_prompts(folder):
    """A prompt file long enough to be decoding still when a rank is killed."""
    path = folder / "many.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Return item {i} of the list."}) + "\n" for i in range(400)))
    return path


def one_line_within(process, seconds):
    """The finished process's exit code and its single stderr line; it must end within `seconds`."""
    began = time.monotonic()
    out, err = process.communicate(timeout=seconds)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return process.returncode, lines[0], time.monotonic() - began


@pytest.mark.skipif(not mx.distributed.is_available(), reason="MLX was built without distributed support")
@pytest.mark.parametrize("mode, killed", [("--pipeline", 1), ("--pipeline", 0), ("--json", 1)],
                         ids=["pipeline, rank 1 killed", "pipeline, rank 0 killed", "shared prompts, rank 1 killed"])
def test_a_killed_rank_ends_the_job_with_one_line(pairs, tmp_path, mode, killed):
    processes = start_ranks(tmp_path, [*pairs["llama"], "--prompt-file", many_prompts(tmp_path), "--max-tokens", 60,
                                       "--json", mode, "--batch-size", 2])
    survivor = processes[1 - killed]
    if mode == "--pipeline":  # wait for rank 0 to print a result: decoding is under way
        assert processes[0].stdout.readline().startswith("{")
    else:
        time.sleep(8)
    assert survivor.poll() is None, survivor.stderr.read()
    processes[killed].send_signal(signal.SIGKILL)
    code, line, seconds = one_line_within(survivor, 60)
    assert code != 0 and line == f"error: rank {killed} stopped (it exited or was killed)"
    processes[killed].wait()


@pytest.mark.skipif(not mx.distributed.is_available(), reason="MLX was built without distributed support")
def test_a_stopped_rank_ends_the_job_with_one_line(pairs, tmp_path):
    """A rank whose process stops (SIGSTOP: alive, its sockets open, silent) ends the job too."""
    processes = start_ranks(tmp_path, [*pairs["llama"], "--prompt-file", many_prompts(tmp_path), "--max-tokens", 60,
                                       "--pipeline", "--json"], env={"MLX_SPEC_HEARTBEAT_TIMEOUT": "3"})
    assert processes[0].stdout.readline().startswith("{")  # decoding is under way
    processes[1].send_signal(signal.SIGSTOP)
    code, line, seconds = one_line_within(processes[0], 60)
    assert code != 0 and line == "error: rank 1 stopped (it exited or was killed)"
    assert processes[1].wait(timeout=10) == -signal.SIGKILL  # its own watchdog ended it


@pytest.mark.skipif(not mx.distributed.is_available(), reason="MLX was built without distributed support")
def test_a_rank_that_never_connects_ends_the_others_with_one_line(pairs, tmp_path):
    (rank0,) = start_ranks(tmp_path, [*pairs["llama"], "--prompt", "x"], started=[0],
                           env={"MLX_SPEC_CONNECT_TIMEOUT": "3"}).values()
    code, line, seconds = one_line_within(rank0, 60)
    assert code != 0 and line.startswith("error: rank 0 waited 3 s for the other ranks to connect") and seconds < 30


# ----- parts of a stack, in one process --------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 10**6), min_size=1, max_size=40), ranks=st.integers(1, 8))
def test_split_cuts_the_stack_into_contiguous_parts_one_per_rank(sizes, ranks):
    if ranks > len(sizes):
        with pytest.raises(ValueError):
            distributed.split(sizes, ranks)
        return
    parts = distributed.split(sizes, ranks)
    assert len(parts) == ranks and parts[0].start == 0 and parts[-1].stop == len(sizes)
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:])) and all(p.start < p.stop for p in parts)


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 40), ranks=st.integers(1, 6), seed=st.integers(0, 2**64 - 1))
def test_shares_cover_every_prompt_once_and_seeds_do_not_depend_on_ranks(count, ranks, seed):
    groups = [distributed.Group() for _ in range(ranks)]
    for rank, group in enumerate(groups):
        group.rank, group.size = rank, ranks
    shares = [list(distributed.share(count, group)) for group in groups]
    assert sorted(i for share in shares for i in share) == list(range(count))
    assert distributed.prompt_seed(seed, 0) == seed  # one prompt samples as it did before ranks existed
    assert len({distributed.prompt_seed(seed, i) for i in range(count)}) == count


@settings(max_examples=20, deadline=None)
@given(data=st.data(), family=st.sampled_from(["t5", "llama", "gpt2"]), ranks=st.integers(1, 3),
       lengths=st.lists(st.integers(0, 6), min_size=1, max_size=3), new=st.integers(1, 4))
def test_parts_run_in_sequence_give_the_whole_models_logits(pair_dirs, data, family, ranks, lengths, new):
    """Any contiguous cut of the stack (drawn), each part loaded alone from the folder: its start
    and decode passes chained compute the whole model's logits."""
    target_dir = pair_dirs(0.05, family=family)[0]
    whole = model.load(target_dir)[0]
    units = sum(count for _, count in whole.stack())
    ranks = min(ranks, units)
    cuts = sorted(data.draw(st.sets(st.integers(1, units - 1), min_size=ranks - 1, max_size=ranks - 1)))
    bounds = [0, *cuts, units]
    parts = [model.load_model(target_dir, None, Part(a, b, units)) for a, b in zip(bounds, bounds[1:])]
    prompts = [list(range(5, 5 + n)) for n in lengths]
    cache, firsts = whole.start(prompts)
    tokens = mx.array([[first] + list(range(20, 20 + new - 1)) for first in firsts])
    expected = whole.decode(tokens, cache)
    x, caches = None, []
    for part in parts:
        part_cache, part_firsts, x = part.start_part(prompts, x)
        caches.append(part_cache)
        assert part_firsts == firsts
    x = tokens
    for part, part_cache in zip(parts, caches):
        x = part.decode(x, part_cache)
    assert mx.array_equal(x, expected).item()


def test_a_part_holds_only_its_layers(pair_dirs):
    """Rank 1 of 2 loads its run of the stack alone: fewer parameters than the whole, and no embedding."""
    target_dir = pair_dirs(0.05, family="llama")[0]
    whole = model.load(target_dir)[0]
    parts = distributed.split(distributed.unit_bytes(model.read_config(Path(target_dir))), 2)
    second = model.load_model(target_dir, None, parts[1])

    def count(m):
        return sum(v.size for _, v in tree_flatten(m.parameters()))

    assert "embed_tokens" not in second and count(second) < count(whole)
    assert len(second.layers) == parts[1].stop - parts[1].start


@pytest.mark.parametrize("name", sorted(distributed.CHECKPOINTS))
def test_a_rank_holds_about_its_share_of_a_large_target(name):
    """The README's memory table: over 2 and 4 ranks the fullest rank holds little more than
    1/n of the target, and the parts together hold it all once (but a tied embedding, on the
    first part and the last as the head: 0.3% of T5-11B; T5's position biases, a few KB)."""
    config = distributed.CHECKPOINTS[name][0]()
    whole = model.weight_bytes(config, 2)
    for ranks in (2, 4):
        sizes = [model.weight_bytes(config, 2, None, part)
                 for part in distributed.split(distributed.unit_bytes(config), ranks)]
        assert whole <= sum(sizes) < whole * 1.004 and max(sizes) < whole / ranks * 1.1


if __name__ == "__main__":
    sweep(*sys.argv[1:])
