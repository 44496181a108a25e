"""Quality beside speed: ROUGE against references, pass@1 over tests, agreement with plain decoding.

An eval file is JSON lines, each {"prompt", "reference"} (text to compare with, ROUGE-1/2/L
F1 through the `rouge-score` package) or {"prompt", "tests"} (Python that checks the
completion, HumanEval style: prompt + completion define a function, the tests call it).

pass@1 runs each program in a Python process of its own, in a temporary folder, under a
time and a memory limit, with the calls that remove files, spawn processes or change
directories replaced by ones that end the program as a failure (the idea of HumanEval's
harness). This guards against accidents, not attacks: it is no security sandbox.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Only the standard library at the top: the pass@1 child runs this file with `python -I`,
# which leaves the project's folder off its path. The project's modules are imported where used.

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
TIME_LIMIT = 10.0  # seconds of wall time per program
MEMORY_LIMIT = 1 << 30  # bytes of address space per program
FILE_LIMIT = 64 << 20  # bytes any one file the program writes (its stdout included) may reach
# A base model runs on past the function it was asked for; the Codex paper's stop
# sequences cut the completion where the next top-level statement begins.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
# Where the named sets come from (Hugging Face datasets), and which split is scored.
DATASETS = {"xsum": ("EdinburghNLP/xsum", "test"), "humaneval": ("openai/openai_humaneval", "test")}
# T5 was trained to summarise after this prefix; write your own file for another template.
XSUM_PROMPT = "summarize: {document}"
FETCHED = Path(tempfile.gettempdir()) / "t5-speculative-eval"

# The child's exit codes besides 0 (passed) and 1 (an exception).
REFUSED, OUT_OF_MEMORY = 3, 4


class EvalError(ValueError):
    """A bad eval file or a set that cannot be fetched; the message is one line."""


@dataclass
class Example:
    """One eval item: a prompt and either a reference text or HumanEval-style tests."""

    prompt: str
    reference: str = None
    tests: str = None

    @property
    def kind(self):
        return "tests" if self.tests is not None else "reference"


def read_eval_file(path, limit=None):
    """The first `limit` (all if None) examples of a JSON-lines eval file; EvalError if malformed.

    Every line must hold a "prompt" string and exactly one of "reference" or "tests",
    the same one on every line.
    """
    import files  # here, not at the top: the pass@1 child imports this module without the project

    examples = []
    for number, item in files.json_lines(path, "--eval", EvalError):
        fields = [key for key in ("reference", "tests") if isinstance(item, dict) and isinstance(item.get(key), str)]
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or len(fields) != 1:
            raise EvalError(f'{path} line {number} is not a JSON object with a "prompt" string and one '
                            f'"reference" or "tests" string')
        examples.append(Example(item["prompt"], **{fields[0]: item[fields[0]]}))
        if examples[-1].kind != examples[0].kind:
            raise EvalError(f"{path} line {number} has {examples[-1].kind}, the first line {examples[0].kind}: "
                            f"one kind per file")
        if limit is not None and len(examples) == limit:
            break
    if not examples:
        raise EvalError(f"{path} holds no examples")
    return examples


def write_eval_file(path, examples):
    """Write examples as JSON lines: to a temporary file beside path, renamed at the end."""
    import files

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, e.kind: e.tests if e.kind == "tests" else e.reference}) for e in examples]
    files.write_atomically(path, "w", lambda f: f.write("".join(line + "\n" for line in lines)))
    return path


def from_dataset(name, row):
    """An Example from one row of the named Hugging Face set."""
    if name == "xsum":
        return Example(XSUM_PROMPT.format(document=row["document"].strip()), reference=row["summary"])
    # HumanEval's `test` defines check(candidate); calling it on the entry point runs the tests.
    return Example(row["prompt"], tests=f"{row['test']}\n\ncheck({row['entry_point']})\n")


def fetch(name, limit=None):
    """Examples of `xsum` or `humaneval` through the `datasets` package, kept as JSON lines once fetched.

    Returns (examples, path of the JSON-lines file). EvalError when the package or the
    network is missing.
    """
    path = FETCHED / f"{name}-{limit or 'all'}.jsonl"
    if path.is_file():
        return read_eval_file(path, limit), path
    hint = "pass a local JSON-lines file instead (--eval FILE.jsonl)"
    try:
        import datasets
    except ImportError:
        raise EvalError(f"--eval {name} needs the datasets package and a network; {hint}") from None
    import cli

    repo, split = DATASETS[name]
    try:
        rows = datasets.load_dataset(repo, split=split if limit is None else f"{split}[:{limit}]")
        examples = [from_dataset(name, row) for row in rows]
    except Exception as error:  # no network, a moved set: any failure of the download
        raise EvalError(f"--eval {name}: could not fetch {repo} ({cli.first_line(error)}); {hint}") from None
    return examples, write_eval_file(path, examples)


def load(source, limit=None):
    """(examples, file) from a JSON-lines path, or from `xsum` / `humaneval` when no such file exists."""
    if source in DATASETS and not Path(source).exists():
        return fetch(source, limit)
    return read_eval_file(source, limit), Path(source)


def rouge(predictions, references):
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over pairs, from `rouge-score` (Porter stemming on)."""
    from rouge_score import rouge_scorer  # imported here: it loads nltk, which a pass@1 child need not

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {name: statistics.fmean(s[name].fmeasure for s in scores) for name in ROUGE_TYPES}


def truncate(completion):
    """The completion up to the first stop sequence: the function body the prompt asked for."""
    ends = [i for i in (completion.find(stop) for stop in STOP_SEQUENCES) if i >= 0]
    return completion[: min(ends)] if ends else completion


@dataclass
class Verdict:
    """How one program ended: passed, or why not (failed, timed out, out of memory, refused, killed)."""

    passed: bool
    outcome: str
    detail: str = ""
    seconds: float = 0.0


def run_program(source, time_limit=TIME_LIMIT, memory_limit=MEMORY_LIMIT):
    """Run Python source in a child process of its own; a Verdict, never an exception.

    The child works in a fresh temporary folder (removed afterwards), with its address
    space capped at memory_limit bytes, CPU time and wall time at time_limit seconds, and
    the calls that delete, rename or overwrite files outside its folder, spawn
    processes or change directories refused (the program ends as a failure).
    """
    with tempfile.TemporaryDirectory(prefix="pass-at-1-") as folder, open(Path(folder) / "output", "w+b") as out:
        work = Path(folder) / "work"
        work.mkdir()
        began = time.perf_counter()
        # The limits are set in the child itself: a preexec_fn is unsafe in a process with threads (MLX's).
        child = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--run-program", str(time_limit), str(memory_limit)],
            cwd=work, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LC_ALL": "C.UTF-8"},
        )
        try:
            child.communicate(source.encode("utf-8"), timeout=time_limit)
        except subprocess.TimeoutExpired:
            # Its own session's group, killed before the child is reaped (so its id cannot have been reused).
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return Verdict(False, "timed out", f"after {time_limit:g} s", time.perf_counter() - began)
        seconds = time.perf_counter() - began
        out.seek(0)
        lines = out.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
    return verdict(child.returncode, lines[-1] if lines else "", seconds)


def verdict(code, last_line, seconds):
    """The Verdict of a child's exit code (negative: the signal that ended it) and last line of output."""
    if code == 0:
        return Verdict(True, "passed", "", seconds)
    if code in (REFUSED, OUT_OF_MEMORY):
        return Verdict(False, "refused" if code == REFUSED else "out of memory", last_line, seconds)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        outcome = {"SIGXCPU": "timed out", "SIGKILL": "out of memory", "SIGSEGV": "crashed"}.get(name, "killed")
        return Verdict(False, outcome, f"by {name}", seconds)
    return Verdict(False, "failed", last_line, seconds)


def program(example, completion):
    """The source pass@1 runs: prompt, the completion cut at a stop sequence, the tests."""
    return f"{example.prompt}{truncate(completion)}\n\n{example.tests}\n"


class Scorer:
    """Scores completions of one eval set; pass@1 verdicts are kept per program source.

    A program's verdict depends on its source alone (short of timing near the limit), and
    at delta 0 every setting writes the same programs, so each distinct one runs once.
    """

    def __init__(self, examples, time_limit=TIME_LIMIT, memory_limit=MEMORY_LIMIT):
        self.examples, self.time_limit, self.memory_limit = examples, time_limit, memory_limit
        self.kind = examples[0].kind
        self.verdicts = {}

    def verdict(self, source):
        if source not in self.verdicts:
            self.verdicts[source] = run_program(source, self.time_limit, self.memory_limit)
        return self.verdicts[source]

    def score(self, completions):
        """{"rouge1", "rouge2", "rougeL"} or {"pass_at_1"} for one completion per example."""
        if self.kind == "reference":
            return rouge(completions, [e.reference for e in self.examples])
        passed = [self.verdict(program(e, c)).passed for e, c in zip(self.examples, completions)]
        return {"pass_at_1": sum(passed) / len(passed)}

    def score_samples(self, samples, plain_samples, decode):
        """Mean and spread over samples of one setting, with the share identical to plain decoding.

        samples, plain_samples: lists (one per sample) of token lists (one per example);
        sample i is compared with plain decoding's sample i. decode: tokens -> text.
        """
        scores = [dict(self.score([decode(tokens) for tokens in outputs]), identical_share=identical_share(outputs, plain))
                  for outputs, plain in zip(samples, plain_samples)]
        return aggregate(scores)


def identical_share(outputs, plain_outputs):
    """The share of prompts whose tokens equal plain decoding's."""
    return sum(mine == theirs for mine, theirs in zip(outputs, plain_outputs)) / len(outputs)


def aggregate(scores):
    """{metric: {"mean", "sd"}} over a list of {metric: value}, plus "samples"; sd 0 for one sample."""
    summary = {name: {"mean": statistics.fmean(s[name] for s in scores),
                      "sd": statistics.stdev(s[name] for s in scores) if len(scores) > 1 else 0.0}
               for name in scores[0]}
    return dict(summary, samples=len(scores))


def metrics(quality):
    """The metric names of a quality summary, in table order."""
    return [name for name in (*ROUGE_TYPES, "pass_at_1", "identical_share") if name in quality]


HEADERS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "pass_at_1": "pass@1",
           "identical_share": "identical"}


def table(results):
    """(caption, headers, rows) of the quality table: per setting tokens/s, speedup and each metric.

    A metric's cell is its mean, with +- its standard deviation over samples where that is not 0.
    """
    info, plain = results["eval"], results["plain"]
    names = metrics(plain["quality"])

    def cell(q, name):
        return f"{q[name]['mean']:.3f}" + (f"+-{q[name]['sd']:.3f}" if q[name]["sd"] > 0 else "")

    caption = (f"Quality on {info['source']} ({info['prompts']} prompts; identical = share of prompts whose tokens "
               f"equal plain decoding's; +- = sd over "
               + (f"{info['samples']} seeds per setting)" if info["samples_are_seeds"] else
                  f"each setting's {info['samples']} timed runs, greedy)") + ":")
    rows = [[r["label"], f"{r['tokens_per_second']:.1f}", f"{r['wall_speedup']:.2f}x",
             *(cell(r["quality"], n) for n in names)]
            for r in [dict(plain, label="plain", wall_speedup=1.0)] + results["speculative"]]
    return caption, ["setting", "tok/s", "speedup", *(HEADERS[n] for n in names)], rows


def plot_panel(axes, results):
    """Quality against wall speedup, one point per setting (error bars: sd over samples)."""
    name = metrics(results["plain"]["quality"])[0 if results["eval"]["kind"] == "tests" else 2]
    rows = [dict(results["plain"], label="plain", wall_speedup=1.0)] + results["speculative"]
    for r in rows:
        q = r["quality"][name]
        axes.errorbar(r["wall_speedup"], q["mean"], yerr=q["sd"], fmt="o", capsize=3)
        axes.annotate(r["label"], (r["wall_speedup"], q["mean"]), fontsize=7, xytext=(4, 4),
                      textcoords="offset points")
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("wall speedup over plain decoding")
    axes.set_ylabel(HEADERS[name])
    axes.set_title(f"Quality beside speed ({results['eval']['prompts']} prompts)")


# ---- the pass@1 child: runs as `python -I quality.py --run-program SECONDS BYTES`, program on stdin ----

DISABLED = {
    "os": ["remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chdir", "fchdir",
           "chroot", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "link", "symlink", "mkfifo", "mknod",
           "kill", "killpg", "fork", "forkpty", "system", "popen", "execl", "execle", "execlp", "execlpe", "execv",
           "execve", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
           "spawnvpe", "posix_spawn", "posix_spawnp", "putenv", "unsetenv", "setuid", "setgid", "seteuid", "setegid",
           "setreuid", "setregid", "setresuid", "setresgid", "_exit", "abort", "startfile"],
    "shutil": ["rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile"],
    "subprocess": ["Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"],
}


def disable_destructive_calls(folder, leave):
    """Replace the calls named in DISABLED (and their posix twins), and writes outside folder.

    A replaced call writes "refused: NAME" and ends the process with code REFUSED through
    `leave` (the real os._exit), so a program cannot catch the refusal and pass.
    """
    import builtins
    import io
    import posix
    import shutil

    def refuse(name):
        def refused(*args, **kwargs):
            sys.stderr.write(f"refused: {name}\n")
            sys.stderr.flush()
            leave(REFUSED)
        return refused

    for module in (os, shutil, subprocess):
        for name in DISABLED[module.__name__]:
            if hasattr(module, name):
                setattr(module, name, refuse(f"{module.__name__}.{name}"))
                if module is os and hasattr(posix, name):
                    setattr(posix, name, refuse(f"os.{name}"))
    inside = os.path.realpath(folder) + os.sep

    def outside(path):
        return isinstance(path, (str, bytes, os.PathLike)) and not os.path.realpath(os.fsdecode(path)).startswith(inside)

    real_open, real_os_open = builtins.open, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and outside(file):
            refuse(f"open({file!r}, {mode!r})")()
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & writing and outside(path):
            refuse(f"os.open({path!r})")()
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing"):
        sys.modules[name] = None  # importing them now fails


def child(time_limit, memory_limit):
    """Set the limits, read the program from stdin, disable destructive calls, run it; exit with a code."""
    import resource
    import traceback

    seconds = int(time_limit) + 1  # CPU seconds: a backstop for the parent's wall-clock limit
    for limit, value in ((resource.RLIMIT_AS, memory_limit), (resource.RLIMIT_CPU, seconds),
                         (resource.RLIMIT_FSIZE, FILE_LIMIT), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # a lower limit set outside stays
        try:
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):  # a system that refuses one (macOS and RLIMIT_AS) goes without it
            pass
    source = sys.stdin.buffer.read().decode("utf-8")
    sys.stdin.close()
    leave = os._exit
    disable_destructive_calls(os.getcwd(), leave)
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except MemoryError:
        print("MemoryError", file=sys.stderr)
        code = OUT_OF_MEMORY
    except BaseException:  # an exception, SystemExit included, is a failure, as in HumanEval's harness
        traceback.print_exc(limit=-1)
        code = 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    leave(code)  # no atexit handlers or lingering threads of the program's


if __name__ == "__main__" and sys.argv[1:2] == ["--run-program"]:
    child(float(sys.argv[2]), int(sys.argv[3]))
