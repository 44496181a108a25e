"""Measure speculative decoding against plain decoding, theory, and transformers.

    python benchmark.py                       # offline synthetic pair, built in seconds
    python benchmark.py --compare-hf --plot bench.png --json bench.json
    python benchmark.py --eps 0.02 0.05 0.2 0.5 --delta 0 0.1 0.3 --prompt-lookup
    python benchmark.py --model t5-11b --draft-model t5-small \\
        --compare-hf --hf-model t5-11b --hf-draft-model t5-small

g (num-draft) is the number of tokens the draft proposes per step. For each g, and for
the adaptive schedule (which picks 0..max g before every step), it reports in one
warmed-up process with medians of several repeats: the speedup in wall time and in
target forward passes, the acceptance, tokens per second, and the speedup theory
predicts (Leviathan et al. 2023), (1 - a**(g+1)) / ((1 - a) * (g*c + 1)), with a the
per-token acceptance and c the cost ratio (draft step / target step), both measured
here; and the prediction from the costs measured on this machine, where the target's
pass over g + 1 tokens costs verify(g + 1) target steps rather than one. Host ms is
the loop's own work per step, timed inside the loop. Plain and speculative runs take
turns (one round of every setting, then the next round), so a slow spell of the
machine hits them all alike.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import mlx.core as mx
from tabulate import tabulate
from tqdm import tqdm

import calibration
import cli
import decoder
import drafters
import model
import policy
import quality
import simulate
import synthetic
from files import write_atomically
from main import UsageError, guarded, load_models, read_prompt_file, require, require_models, text_of

# Two prompts x 128 tokens x 3 repeats keep the full run (--full) within a few minutes here.
PROMPTS = [
    "Return a new dictionary initialized from an optional positional argument and keyword arguments.",
    "Create a new parser object with the given description, then add the arguments the program accepts.",
]
# The default pair: a 24-layer, d_model 512 target holding a 2-layer draft plus 22
# layers whose attention-output and feed-forward-output weights are scaled by EPS.
# Tuned by counting greedy acceptance at 128 tokens on these prompts and a third
# ("Write the rows to the file object, formatted as comma separated values with the
# given dialect."), without timing:
#   eps   0.03  0.04  0.05  0.06
#   a     0.79  0.72  0.69  0.59   (per-token acceptance, the a of the theory; g 1, 3, 5 agree within 0.02)
# 0.05 lands in the 0.6-0.7 the issue asks for. (accepted / drafted is lower for larger
# g, since drafts after a rejection count as drafted: 0.69 at g 1, 0.48 at g 3.)
# Every prompt runs the full 128 tokens: none of them meets EOS early.
EPS = 0.05
PAIR = dict(draft_layers=2, target_layers=24, d_model=512, eps=EPS, seed=0)
# Per --family: the synthetic pair's other shapes (GPT-2 and Llama keep their own
# feed-forward widths, 4x and 3x d_model).
FAMILY_SHAPES = {"t5": dict(d_ff=1024, gated=True), "gpt2": {}, "llama": {}}
# Decode calls per step-time measurement (the median is kept), and the tokens the
# cache holds while they run: about the middle of a default 128-token generation.
STEP_CALLS = 21
STEP_CONTEXT = 64
# The default run shows plain, a few g, adaptive and the verdict in under two minutes on a
# 2-core CPU, the pair's build included; --full sweeps g 1..8 over twice the tokens.
QUICK = dict(num_draft=[1, 2, 4], max_tokens=48, repeats=3)
FULL = dict(num_draft=list(range(1, 9)), max_tokens=128, repeats=3)
# Past these the machine was too busy, or the repeats too scattered, for a verdict.
BUSY_SHARE = 0.25  # of the machine's CPU time, taken by other processes during the run
NOISY_SPREAD = 0.15  # half the range of the repeats, relative to their median


def parse_args(argv=None):
    parser = cli.ArgumentParser(
        description="Benchmark speculative decoding on MLX (T5, GPT-2, Llama) against plain decoding, theory and "
                    "transformers. g (num-draft) is the number of tokens drafted per step.",
    )
    parser.add_argument("--model", help="target (converted folder or name); default: the synthetic pair")
    parser.add_argument("--draft-model", help="draft (converted folder or name)")
    parser.add_argument("--prompt-file", help='JSON lines with a "prompt" field; default: two built-in prompts')
    parser.add_argument("--eval", metavar="FILE.jsonl|xsum|humaneval",
                        help='also score every setting\'s output: JSON lines with a "prompt" and a "reference" '
                             '(ROUGE-1/2/L F1) or "tests" (pass@1, HumanEval style; the programs run on this '
                             'machine); xsum or humaneval fetch those sets (needs the datasets package and a network)')
    parser.add_argument("--eval-limit", type=int, help="--eval: score only the first N prompts")
    parser.add_argument("--samples", type=int, default=3,
                        help="--eval with --temperature above 0: seeds per setting for the quality's mean and spread")
    parser.add_argument("--full", action="store_true",
                        help=f"the full sweep: --num-draft 1 .. 8 --max-tokens {FULL['max_tokens']} "
                             f"(default: a quick run, --num-draft {' '.join(map(str, QUICK['num_draft']))} "
                             f"--max-tokens {QUICK['max_tokens']})")
    parser.add_argument("--num-draft", type=int, nargs="+",
                        help="g values: drafts per step for the constant schedule; the largest caps the adaptive one "
                             f"(default: {' '.join(map(str, QUICK['num_draft']))}; with --full 1 .. 8)")
    parser.add_argument("--max-tokens", type=int,
                        help=f"tokens per prompt (default: {QUICK['max_tokens']}; with --full {FULL['max_tokens']})")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--delta", type=float, nargs="+", default=[0.0],
                        help="acceptance relaxations: each value above 0 adds an adaptive row and says how far "
                             "its output departs from the exact (delta 0) output")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="add a row drafting by prompt lookup (no draft model), adaptive up to the largest g")
    parser.add_argument("--repeats", type=int, help=f"timed runs per setting; medians are reported (default: "
                                                      f"{QUICK['repeats']})")
    parser.add_argument("--uncalibrated", action="store_true",
                        help="add a row for the adaptive schedule starting each run from no measured step costs "
                             "(as on a machine without main.py --calibrate)")
    parser.add_argument("--batch-size", type=int, nargs="+", help="also time batched decoding at these sizes")
    parser.add_argument("--compare-hf", action="store_true",
                        help="also time transformers' greedy and assisted generation (needs torch)")
    parser.add_argument("--hf-model", help="with --model and --compare-hf: the Hugging Face checkpoint of the target")
    parser.add_argument("--hf-draft-model", help="with --draft-model and --compare-hf: that of the draft")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", metavar="FILE.md",
                        help="also write the report with every column and the legend, as markdown tables")
    parser.add_argument("--plot", help="draw speedup and acceptance against g into this PNG (matplotlib)")
    parser.add_argument("--trace", metavar="FILE.json",
                        help="also record the pair's trace for simulate.py replay (per-position agreement, step "
                             "costs of k 0 .. the largest --num-draft); with several --eps, one file each")
    parser.add_argument("--eps", type=float, nargs="+",
                        help="synthetic pair: how far the target strays from the draft (the scale of its extra "
                             "layers; 0 is the draft's own function); several values sweep them "
                             f"(default: {PAIR['eps']}; with --preset: {synthetic.PRESET_EPS})")
    parser.add_argument("--layers", type=int, default=PAIR["target_layers"], help="synthetic pair: target layers")
    parser.add_argument("--d-model", type=int, default=PAIR["d_model"], help="synthetic pair: d_model")
    parser.add_argument("--preset", nargs="?", const="",
                        help="a pair with real checkpoints' shapes, built offline (t5-3b; --eps applies); "
                             "no value lists them")
    parser.add_argument("--family", choices=sorted(FAMILY_SHAPES), default="t5", help="synthetic pair: model family")
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)  # internal: the transformers child process
    args = parser.parse_args(argv)
    for name, value in (FULL if args.full else QUICK).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.eps is None:  # the preset's target is wider: the same eps strays much further there
        args.eps = [synthetic.PRESET_EPS if args.preset else PAIR["eps"]]
    return args


def writable(path):
    return path is None or Path(path).resolve().parent.is_dir()


def check(args):
    """Raise UsageError for the first bad value, before anything slow starts."""
    require([
        (all(g >= 1 for g in args.num_draft), "--num-draft values must be at least 1"),
        (args.max_tokens >= 1, "--max-tokens must be at least 1"),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (args.temperature >= 0, "--temperature must not be negative"),
        (all(0 <= d <= 1 for d in args.delta), "--delta values must lie in [0, 1]"),
        (not args.batch_size or all(b >= 1 for b in args.batch_size), "--batch-size values must be at least 1"),
        ((args.model is None) == (args.draft_model is None), "give both --model and --draft-model, or neither"),
        ((args.hf_model is None) == (args.hf_draft_model is None), "give both --hf-model and --hf-draft-model, or neither"),
        (args.preset in (None, "") or args.preset in synthetic.PRESETS,
         f"unknown --preset '{args.preset}'; choose one of {', '.join(synthetic.PRESETS)}"),
        (args.preset is None or args.model is None, "--preset and --model exclude each other"),
        (args.hf_model is None or args.model is not None, "--hf-model goes with --model; the synthetic pair has its own"),
        (args.hf_model is None or args.compare_hf, "--hf-model and --hf-draft-model need --compare-hf"),
        (not (args.compare_hf and args.model and not args.hf_model),
         "--compare-hf with --model needs --hf-model and --hf-draft-model (the Hugging Face checkpoints)"),
        (args.model is None or len(args.eps) == 1, "--eps shapes the synthetic pair; it does not go with --model"),
        (args.eval is None or args.prompt_file is None, "give --eval or --prompt-file, not both"),
        (args.eval_limit is None or args.eval is not None, "--eval-limit goes with --eval"),
        (args.eval_limit is None or args.eval_limit >= 1, "--eval-limit must be at least 1"),
        (args.samples >= 1, "--samples must be at least 1"),
        (args.layers > PAIR["draft_layers"], f"--layers must exceed the draft's {PAIR['draft_layers']}"),
        (args.d_model >= 8 and args.d_model % 8 == 0, "--d-model must be a positive multiple of 8 (8 heads)"),
        (all(e >= 0 for e in args.eps), "--eps values must not be negative"),
        (writable(args.json), f"--json: no folder for {args.json}"),
        (writable(args.plot), f"--plot: no folder for {args.plot}"),
        (writable(args.markdown), f"--markdown: no folder for {args.markdown}"),
        (writable(args.trace), f"--trace: no folder for {args.trace}"),
    ])
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    # Not imported here: torch loaded into this process would share the CPU with MLX.
    if args.compare_hf and (find_spec("torch") is None or find_spec("transformers") is None):
        raise UsageError("--compare-hf needs torch and transformers: pip install torch transformers")


def synthetic_pair(eps, layers, d_model, family="t5"):
    """Folders of the synthetic pair, converted for MLX and as Hugging Face checkpoints.

    Built once per setting into the system's temporary folder; later runs reuse it.
    """
    import convert

    settings = dict(PAIR, eps=eps, target_layers=layers, d_model=d_model, **FAMILY_SHAPES[family])
    if family != "t5":  # the T5 pair's folder keeps its name
        settings["family"] = family
    root = synthetic.CACHE / ("pair-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())))
    if not (root / "mlx-draft" / "config.json").is_file():
        print(f"building the synthetic pair in {root} ...", file=sys.stderr)
        draft, target = synthetic.speculative_pair(root / "hf", **settings)
        for source in (target, draft):  # the draft last: its folder marks a finished build
            convert.convert(str(source), str(root / f"mlx-{source.name}"))
    return {"target": root / "mlx-target", "draft": root / "mlx-draft",
            "hf_target": root / "hf" / "target", "hf_draft": root / "hf" / "draft"}


def predicted_speedup(a, g, c, verify_cost=1.0):
    """Expected speedup of g drafts per step at per-token acceptance a and cost ratio c.

    verify_cost is the target's (g + 1)-token pass in single-token steps; the theory
    takes it as 1, which holds where that pass is bound by reading the weights.
    """
    return policy.expected_tokens(a, g) / (g * c + verify_cost)


@dataclass
class Run:
    """One timed pass over all prompts with one setting, and its steps' records."""

    seconds: float
    outputs: list
    stats: decoder.Stats
    steps: list = field(default_factory=list)  # one decoder.Step per step (batch 1)

    @property
    def tokens_per_second(self):
        return self.stats.generated / self.seconds

    @property
    def rejections(self):
        """Steps that ended at a rejected draft (it accepted fewer than it judged)."""
        return sum(step.accepted < step.drafted for step in self.steps)


def run_plain(target, prompt_ids, max_tokens, sampling):
    stats = decoder.Stats()
    began = time.perf_counter()
    outputs = [list(decoder.generate(target, ids, max_tokens, sampling, stats)) for ids in prompt_ids]
    return Run(time.perf_counter() - began, outputs, stats)


@dataclass
class Setting:
    """Plain decoding (g 0), or speculative decoding with a schedule, a drafter and a delta."""

    label: str
    g: int
    schedule: str = "constant"
    lookup: bool = False
    delta: float = 0.0
    runs: list = field(default_factory=list)
    # Adaptive: each run starts from kept step costs and acceptance, as main.py's runs do on a calibrated
    # machine: `costs` measured before the rounds, then both as the previous run left them.
    calibrated: bool = False
    costs: object = None  # policy.Components at batch size 1
    pooled: list = None  # [accepted, judged]

    def new_policy(self):
        """A fresh step policy for each run, as each new process starts one."""
        if self.calibrated and self.costs is not None:
            return calibration.starting_from(self.g, 1, self.costs, self.pooled)
        return policy.make_policy(self.schedule, self.g)

    def run(self, target, draft, prompt_ids, max_tokens, sampling):
        if self.g == 0:
            self.runs.append(run_plain(target, prompt_ids, max_tokens, sampling))
            return
        chosen = self.new_policy()
        stats, outputs, steps = decoder.Stats(), [], []
        began = time.perf_counter()
        for ids in prompt_ids:
            drafter = drafters.PromptLookupDrafter() if self.lookup else drafters.ModelDrafter(draft)
            records = list(decoder.speculative_steps(target, drafter, [ids], max_tokens, chosen, self.delta,
                                                     sampling, 1, [stats]))
            outputs.append([token for record in records for token in record.tokens])
            steps.extend(records)
        self.runs.append(Run(time.perf_counter() - began, outputs, stats, steps))
        if self.calibrated:
            costs, pooled = calibration.learned(chosen, 1)
            self.costs, self.pooled = costs or self.costs, pooled or self.pooled


def measure_steps(target, draft, prompt_ids, most, calls=STEP_CALLS):
    """Step costs as main.py --calibrate measures them (policy.Components, batch size 1): the draft's
    one-token call, the target's pass over 1 .. most + 1 tokens, the loop's host work."""
    return calibration.measure(target, draft, prompt_ids, most, 1, calls, STEP_CONTEXT)


def median_costs(measured):
    """Each component's median over several measurements (policy.Components)."""
    return policy.Components(statistics.median(c.host for c in measured), statistics.median(c.draft for c in measured),
                             {n: statistics.median(c.verify[n] for c in measured) for n in measured[0].verify})


def per_token_acceptance(runs):
    """Maximum-likelihood per-token acceptance a over speculative runs.

    Each step accepts drafts until its first rejection, so a = accepted / (accepted +
    rejections). accepted / drafted undercounts it: drafts after a rejection are never judged.
    """
    accepted = sum(r.stats.accepted for r in runs)
    rejections = sum(r.rejections for r in runs)
    return accepted / (accepted + rejections) if accepted + rejections else None  # undefined: nothing judged


def spread(values):
    """(median, relative half-range) of repeated measurements: how far apart the repeats lie
    (None for a single measurement, which has no spread)."""
    middle = statistics.median(values)
    return middle, (max(values) - min(values)) / 2 / middle if middle and len(values) > 1 else None

def summarize(setting, plain, steps, greedy, exact_outputs):
    """One row of the table: medians of the runs, the theory, the measured-cost prediction, host work."""
    g, runs = setting.g, setting.runs
    target_ms = steps["verify"][1]
    c = 0.0 if setting.lookup else steps["draft"] / target_ms
    accepted = sum(r.stats.accepted for r in runs)
    drafted = sum(r.stats.drafted for r in runs)
    a = per_token_acceptance(runs)
    known = a or 0.0  # nothing judged: predict no gain from drafting
    tokens_per_second, noise = spread([r.tokens_per_second for r in runs])
    plain_tokens_per_second = statistics.median(r.tokens_per_second for r in plain.runs)
    wall = tokens_per_second / plain_tokens_per_second
    calls = sum(r.stats.target_calls for r in runs)
    generated = sum(r.stats.generated for r in runs)
    plain_per_call = sum(r.stats.generated for r in plain.runs) / sum(r.stats.target_calls for r in plain.runs)

    def verify_cost(k):
        return steps["verify"][k + 1] / target_ms

    # A constant schedule drafts g; an adaptive one may draft any k up to g, or none (a plain
    # step, speedup 1), so its predictions are the best over those k (what the right constant,
    # or plain decoding, would reach).
    ks = range(0, g + 1) if setting.schedule == "adaptive" else [g]
    predicted = max(predicted_speedup(known, k, c) for k in ks)
    predicted_measured = max(predicted_speedup(known, k, c, verify_cost(k)) for k in ks)
    all_steps = [s for r in runs for s in r.steps]
    step_ms = statistics.median(r.seconds / r.stats.target_calls for r in runs) * 1e3
    draft_ms = sum(r.stats.draft_calls for r in runs) / calls * steps["draft"] * 1e3 if not setting.lookup else 0.0
    mean_k = statistics.mean(s.num_draft for s in all_steps)
    outputs_same = [r.outputs == exact_outputs for r in runs]
    return dict(
        label=setting.label, num_draft=g, schedule=setting.schedule, drafter="lookup" if setting.lookup else "model",
        delta=setting.delta, acceptance_rate=accepted / drafted if drafted else None, alpha=a,
        tokens=runs[0].stats.generated, tokens_per_second=tokens_per_second, tokens_per_second_spread=noise,
        wall_speedup=wall, target_pass_speedup=generated / calls / plain_per_call, tokens_per_call=generated / calls,
        predicted_speedup=predicted, efficiency=wall / predicted,
        predicted_with_verify_cost=predicted_measured, efficiency_with_verify_cost=wall / predicted_measured,
        step_ms=step_ms, draft_ms=draft_ms, mean_num_draft=mean_k,
        verify_cost=verify_cost(round(mean_k)) if setting.schedule == "adaptive" else verify_cost(g),
        host_ms=statistics.median(s.host_seconds for s in all_steps) * 1e3,
        # Only exact greedy rows must equal plain greedy; a relaxed row reports its departure instead.
        identical=all(outputs_same) if greedy and setting.delta == 0 else None,
        departure=departure(runs[0].outputs, exact_outputs),
        seconds=[r.seconds for r in runs],
    )


def departure(outputs, exact):
    """How far outputs depart from the exact ones: prompts identical, earliest differing token."""
    firsts = [next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
              for mine, theirs in zip(outputs, exact) if mine != theirs]
    return dict(identical_prompts=len(outputs) - len(firsts), prompts=len(outputs),
                first_difference=min(firsts) if firsts else None)


def batch_tokens_per_second(target, draft, prompt_ids, args, batch_size, g, sampling, schedule="constant"):
    """Median tokens per second of decoding all prompts, batch_size at a time."""
    rates = []
    chosen = policy.make_policy(schedule, g)
    for _ in range(args.repeats):
        stats = [decoder.Stats() for _ in prompt_ids]
        began = time.perf_counter()
        list(decoder.speculative_batch(target, draft, prompt_ids, args.max_tokens, g, 0.0, sampling, batch_size, stats,
                                       chosen))
        rates.append(sum(s.generated for s in stats) / (time.perf_counter() - began))
    return statistics.median(rates)


def benchmark_batches(args, target, draft, prompt_ids, best, sampling, progress):
    """Plain, constant and adaptive speculative tokens per second at each batch size, over 16 prompts.

    More rows per verify pass make it dearer, so a batch may want fewer drafts than one
    prompt does: the constant schedule is timed at every g up to the best one at batch
    size 1, and each batch size reports its fastest; the adaptive one is capped at the largest g.
    """
    many = [prompt_ids[i % len(prompt_ids)] for i in range(16)]
    candidates = [g for g in sorted(set(args.num_draft)) if g <= best]
    rows = []
    for size in args.batch_size:
        progress.set_postfix_str(f"batch size {size}")
        plain = batch_tokens_per_second(target, None, many, args, size, 0, sampling)
        by_g = {g: batch_tokens_per_second(target, draft, many, args, size, g, sampling) for g in candidates}
        adaptive = batch_tokens_per_second(target, draft, many, args, size, max(args.num_draft), sampling, "adaptive")
        fastest = max(by_g, key=by_g.get)
        rows.append(dict(batch_size=size, plain_tokens_per_second=plain, num_draft=fastest,
                         speculative_tokens_per_second=by_g[fastest], speculative_by_num_draft=by_g,
                         adaptive_tokens_per_second=adaptive))
        progress.update(1)
    return rows


def hf_worker(spec_path):
    """The child process that times transformers; prints one JSON line per task.

    It runs apart from MLX, with no BLAS bound globally by cpu_blas (see benchmark_hf), with
    torch at its default threads, as a transformers user would run it.
    """
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = json.loads(Path(spec_path).read_text())
    seq2seq = transformers.AutoConfig.from_pretrained(spec["target"]).is_encoder_decoder
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    target = auto.from_pretrained(spec["target"], dtype=torch.float32).eval()
    draft = auto.from_pretrained(spec["draft"], dtype=torch.float32).eval()
    inputs = [torch.tensor([ids]) for ids in spec["prompt_ids"]]
    n = spec["max_tokens"]

    options = {
        "greedy": lambda g: {},
        "assisted": lambda g: dict(assistant_model=draft, num_assistant_tokens=g, num_assistant_tokens_schedule="constant"),
        "assisted_default": lambda g: dict(assistant_model=draft),  # transformers' own schedule
        "prompt_lookup": lambda g: dict(prompt_lookup_num_tokens=g),
    }

    def run(task, g, tokens):
        # min_new_tokens: every prompt decodes exactly max_tokens, like ours without EOS.
        with torch.inference_mode():
            # An encoder-decoder's output starts with the decoder start token, a causal one's with the prompt.
            return [target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                                    min_new_tokens=tokens, pad_token_id=target.generation_config.eos_token_id,
                                    **options[task](g))[0, 1 if seq2seq else ids.shape[1] :].tolist() for ids in inputs]

    for task, g in spec["tasks"]:
        try:
            run(task, g, 8)  # warm-up
        except Exception as error:  # a mode transformers lacks for this model: say so, go on
            print(json.dumps(dict(task=task, num_draft=g, error=str(error).splitlines()[0])), flush=True)
            continue
        times, outputs = [], None
        for _ in range(spec["repeats"]):
            began = time.perf_counter()
            outputs = run(task, g, n)
            times.append(time.perf_counter() - began)
        tokens = sum(map(len, outputs))
        print(json.dumps(dict(task=task, num_draft=g, tokens=tokens, seconds=times, outputs=outputs,
                              tokens_per_second=statistics.median(tokens / t for t in times))), flush=True)


def hf_tasks(args, best_g):
    """(task, g) pairs for transformers: greedy, assisted at our best g and at its default schedule, lookup."""
    tasks = [("greedy", 0), ("assisted", best_g), ("assisted_default", 0)]
    return tasks + ([("prompt_lookup", max(args.num_draft))] if args.prompt_lookup else [])


def benchmark_hf(args, sources, prompt_ids, best_g, progress):
    """transformers' greedy, assisted generation (at our best g, and its own schedule) and prompt lookup.

    They run in a child process: with OpenBLAS bound globally into this one, torch's
    assisted generation ran 2.6x slower here (4.6 instead of 12 tokens/s), which would
    flatter us. Assisted generation is slow, so it is timed at our best g only.
    """
    tasks = hf_tasks(args, best_g)
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "spec.json"
        spec.write_text(json.dumps(dict(target=str(sources["hf_target"]), draft=str(sources["hf_draft"]),
                                        prompt_ids=prompt_ids, max_tokens=args.max_tokens,
                                        repeats=args.repeats, tasks=tasks)))
        env = dict(os.environ, MLX_T5_BLAS="reference", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
        progress.set_postfix_str("transformers greedy")
        child = subprocess.Popen([sys.executable, __file__, "--hf-worker", str(spec)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        results = {}
        for line in child.stdout:
            result = json.loads(line)
            task = result.pop("task")
            if "error" in result:
                print(f"warning: transformers {task}: {result['error']}", file=sys.stderr)
            else:
                results[task] = result
            progress.update(1)
            progress.set_postfix_str("transformers")
        errors = child.stderr.read()
        if child.wait() != 0 or "greedy" not in results:
            last = [line for line in errors.splitlines() if line.strip()][-1:] or ["no output"]
            return dict(error=f"the transformers run failed: {last[0]}")
    return results


def machine():
    return dict(platform=platform.platform(), processor=calibration.processor(), cpus=os.cpu_count(),
                device=str(mx.default_device()), dtype=str(model.default_dtype()).replace("mlx.core.", ""),
                mlx=mx.__version__, blas=cpu_blas.LOADED)


def plural(count, word):
    return f"{count} {word}" + ("" if count == 1 else "s")


def identical_line(results):
    rows = [r for r in results["speculative"] if r["delta"] == 0]
    if not results["greedy"]:
        return "Output check: sampling (temperature > 0), so outputs are not compared token for token."
    wrong = [r["label"] for r in rows if not r["identical"]]
    if wrong:
        return f"Output check: MISMATCH - speculative output differs from plain greedy for {', '.join(wrong)}."
    return (f"Output check: OK - at delta 0 speculative output is identical to plain greedy for all "
            f"{plural(results['prompts'], 'prompt')}, in every setting and every repeat.")


def best_line(results):
    """Which setting was fastest, and whether the runner-up lies within the repeats' spread;
    or, when the timings cannot be trusted, why, and no verdict."""
    reasons = results["trust"]["reasons"]
    if reasons:
        return ("No verdict: these timings cannot be trusted, because " + "; ".join(reasons)
                + ". Rerun on a quiet machine.")
    rows = sorted((r for r in results["speculative"] if r["delta"] == 0), key=lambda r: -r["tokens_per_second"])
    best = rows[0]
    line = f"Fastest: {best['label']} at {best['tokens_per_second']:.1f} tok/s"
    if len(rows) > 1:
        runner = rows[1]
        gap = best["tokens_per_second"] / runner["tokens_per_second"] - 1
        line += f"; next {runner['label']} at {runner['tokens_per_second']:.1f} ({gap:.1%} slower, "
        if results["repeats"] == 1:
            return line + "one repeat: no spread to weigh it against)."
        noise = max(best["tokens_per_second_spread"], runner["tokens_per_second_spread"])
        line += f"{'within' if gap <= noise else 'beyond'} the repeats' spread of +-{noise:.1%})"
    return line + "."


def cpu_times():
    """(wall s, this process's CPU s, the machine's busy CPU s or None, CPUs counted, 1-minute load average)."""
    busy, cpus = None, os.cpu_count()
    try:  # Linux: every CPU's time since boot, in clock ticks; steal is time a hypervisor gave others
        lines = Path("/proc/stat").read_text().splitlines()
        user, nice, system, _, _, irq, softirq, steal = map(int, lines[0].split()[1:9])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        cpus = sum(1 for line in lines if re.match(r"cpu\d", line))
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), time.process_time(), busy, cpus, os.getloadavg()[0]


def machine_load(start, end):
    """What the run shared the machine with, between two cpu_times(): other processes' share
    of its CPU time (None where the system does not say) and the load averages."""
    wall, own = end[0] - start[0], end[1] - start[1]
    others = None
    if start[2] is not None and end[2] is not None and wall > 0:
        others = max(0.0, end[2] - start[2] - own) / (wall * end[3])
    return dict(cpus=end[3], others_cpu_share=others, load_average=[start[4], end[4]])


def distrust(results):
    """Why these timings cannot be trusted: a busy machine, scattered repeats, impossible step costs."""
    reasons = []
    load = results["load"]
    if load["others_cpu_share"] is not None and load["others_cpu_share"] > BUSY_SHARE:
        reasons.append(f"other processes took {load['others_cpu_share']:.0%} of the machine's CPU time during the "
                       f"run (load average {load['load_average'][1]:.1f} on {load['cpus']} CPUs)")
    elif load["others_cpu_share"] is None and min(load["load_average"]) - 1 > BUSY_SHARE * load["cpus"]:
        reasons.append(f"the load average stayed at {min(load['load_average']):.1f} on {load['cpus']} CPUs")
    plain = [results["plain"]["tokens"] / s for s in results["plain"]["seconds"]]
    spreads = [("plain", spread(plain)[1])] + [(r["label"], r["tokens_per_second_spread"]) for r in results["speculative"]]
    label, worst = max(((k, v) for k, v in spreads if v is not None), key=lambda kv: kv[1], default=(None, None))
    if worst is not None and worst > NOISY_SPREAD:
        reasons.append(f"repeats of one setting scatter by +-{worst:.0%} ({label}; a quiet machine stays within "
                       f"+-{NOISY_SPREAD:.0%})")
    one = results["verify_ms"]["1"]
    dear = [(int(n), ms / one) for n, ms in results["verify_ms"].items() if ms / one > int(n)]
    if dear:
        n, cost = max(dear, key=lambda nc: nc[1] / nc[0])  # the most impossible one
        reasons.append(f"a target pass over {n} tokens measured {cost:.1f} one-token steps (a pass over n tokens "
                       f"costs at most n)")
    return reasons


def ratio(value):
    """A ratio as text; n/a where it is undefined (a zero denominator: nothing drafted or judged)."""
    return "n/a" if value is None else f"{value:.2f}"


def plus_minus(spread):
    """The repeats' spread as text; n/a for one repeat."""
    return "n/a" if spread is None else f"+-{spread:.0%}"


def grid(headers, rows, markdown):
    """A table: markdown pipes for --markdown, aligned columns for a terminal."""
    return tabulate(rows, headers, tablefmt="github" if markdown else "simple", disable_numparse=True).splitlines()


def settings_table(results, markdown):
    """The settings' rows: every column for --markdown; those that fit 100 columns for a terminal."""
    rows = results["speculative"]
    if markdown:
        headers = ["setting", "acceptance", "a", "tokens/s (+-)", "wall speedup", "target-pass speedup", "theory",
                   "efficiency", "measured-cost prediction", "efficiency", "host ms", "identical"]
        return grid(headers, [[r["label"], ratio(r["acceptance_rate"]), ratio(r["alpha"]),
                               f"{r['tokens_per_second']:.1f} ({plus_minus(r['tokens_per_second_spread'])})",
                               f"{r['wall_speedup']:.2f}x", f"{r['target_pass_speedup']:.2f}x",
                               f"{r['predicted_speedup']:.2f}x", f"{r['efficiency']:.2f}",
                               f"{r['predicted_with_verify_cost']:.2f}x", f"{r['efficiency_with_verify_cost']:.2f}",
                               f"{r['host_ms']:.2f}", identical(r)] for r in rows], True)
    headers = ["setting", "a", "tok/s", "+-", "speedup", "passes", "predicted", "efficiency", "exact"]
    return grid(headers, [[r["label"], ratio(r["alpha"]), f"{r['tokens_per_second']:.1f}",
                           plus_minus(r["tokens_per_second_spread"]), f"{r['wall_speedup']:.2f}x",
                           f"{r['target_pass_speedup']:.2f}x", f"{r['predicted_with_verify_cost']:.2f}x",
                           f"{r['efficiency_with_verify_cost']:.2f}", identical(r)] for r in rows], False)


def identical(row):
    return "n/a" if row["identical"] is None else "yes" if row["identical"] else "NO"


def table(results, markdown=False):
    """The results as text: tables that fit a terminal, or (markdown) every column as markdown tables with the legend."""
    p, info, rows = results["plain"], results["machine"], results["speculative"]
    steps = results["verify_ms"]
    lines = [
        f"Machine: {info['platform']}, {info['processor']}, {info['cpus']} CPUs; MLX {info['mlx']} on "
        f"{info['device']}, {info['dtype']}, BLAS: {info['blas'] or 'reference'}.",
        f"Workload: {plural(results['prompts'], 'prompt')} x {results['max_tokens']} tokens, temperature "
        f"{results['temperature']}, {plural(results['repeats'], 'repeat')} (medians), {results['pair']}.",
        f"Plain decoding: {p['tokens_per_second']:.1f} tok/s ({p['tokens']} tokens per run"
        f"{'' if p['tokens'] == results['prompts'] * results['max_tokens'] else ', some prompts ended at EOS'}). "
        f"Step time: target {results['target_step_ms']:.2f} ms, draft {results['draft_step_ms']:.2f} ms, "
        f"cost ratio c = {results['cost_ratio']:.3f}.",
        "Target pass over n tokens, in target steps: "
        + ", ".join(f"n {n}: {ms / steps['1']:.2f}" for n, ms in steps.items()) + ".",
        "",
        *settings_table(results, markdown),
        "",
    ]
    if markdown:
        lines.append(
            "acceptance = accepted / drafted; a = per-token acceptance, accepted / (accepted + rejections); "
            "wall speedup = tokens/s against plain; target-pass speedup = tokens per target pass against plain; "
            "theory = (1 - a**(g+1)) / ((1 - a) * (g*c + 1)); measured-cost prediction = the same with the measured "
            "verify(g+1) in place of 1 (adaptive rows: the best k in 0..g); efficiency = wall speedup / prediction; "
            "host ms = the loop's own work per step (median), timed inside it; (+-) = half the range of the repeats; "
            "n/a = undefined (nothing drafted, or one repeat).")
    else:
        lines += ["a = per-token acceptance; speedup = tok/s against plain; passes = fewer target passes; predicted",
                  "= from the costs measured here; +- = half the repeats' range. --markdown FILE: every column."]
    lines += [
        best_line(results),
        identical_line(results),
    ]
    adaptive = [r for r in rows if r["schedule"] == "adaptive"]
    if adaptive:
        constant = [r for r in rows if r["schedule"] == "constant" and r["delta"] == 0]
        best = max(constant, key=lambda r: r["tokens_per_second"]) if constant else None
        for r in adaptive:
            versus = f", {r['tokens_per_second'] / best['tokens_per_second']:.2f}x the best constant ({best['label']})" \
                if best and r["drafter"] == "model" else ""
            lines.append(f"{r['label']}: mean k {r['mean_num_draft']:.2f}, {r['wall_speedup']:.2f}x plain{versus}.")
    relaxed = [r for r in rows if r["delta"] > 0]
    if relaxed:
        lines += ["", "| delta | wall speedup | acceptance | prompts identical to delta 0 | first differing token |",
                  "|---|---|---|---|---|"]
        for r in relaxed:
            d = r["departure"]
            lines.append(f"| {r['delta']} | {r['wall_speedup']:.2f}x | {ratio(r['acceptance_rate'])} | "
                         f"{d['identical_prompts']} of {d['prompts']} | {d['first_difference']} |")
    if "eval" in results:
        caption, headers, rows = quality.table(results)
        lines += ["", caption, "", *grid(headers, rows, markdown)]
    if results.get("batches"):
        lines += ["", *batch_table(results, markdown)]
    if results.get("hf"):
        lines += ["", *hf_table(results)]
    return "\n".join(lines if markdown else fit(lines))


def fit(lines, width=100):
    """Lines of prose wrapped to a terminal's width (tables' rows, with "|" or column gaps, stay whole)."""
    return [part for line in lines
            for part in (textwrap.wrap(line, width) if len(line) > width and not table_row(line) else [line])]


def table_row(line):
    return "|" in line or "  " in line


def batch_table(results, markdown=True):
    headers = (["batch size", "plain tok/s", "g", "constant tok/s", "adaptive tok/s", "constant vs plain",
                "adaptive vs plain", "constant vs its batch size 1"] if markdown else
               ["batch", "plain", "g", "constant", "adaptive", "constant/plain", "adaptive/plain", "vs batch 1"])
    single = results["batches"][0]["speculative_tokens_per_second"]
    rows = []
    for b in results["batches"]:
        fast, plain, adaptive = b["speculative_tokens_per_second"], b["plain_tokens_per_second"], b["adaptive_tokens_per_second"]
        rows.append([b["batch_size"], f"{plain:.1f}", b["num_draft"], f"{fast:.1f}", f"{adaptive:.1f}",
                     f"{fast / plain:.2f}x", f"{adaptive / plain:.2f}x", f"{fast / single:.2f}x"])
    return ["Batched decoding, tokens/s (16 prompts; constant schedule at its fastest g for each batch size):", "",
            *grid(headers, rows, markdown)]


def hf_table(results):
    hf = results["hf"]
    if "error" in hf:
        return [f"transformers comparison: {hf['error']}"]
    ours = {r["label"]: r["tokens_per_second"] for r in results["speculative"]}
    plain = results["plain"]["tokens_per_second"]
    same = "same tokens as ours" if hf["greedy"]["outputs"] == results["plain_outputs"] else "tokens differ from ours"
    lines = [
        "Against Hugging Face transformers (PyTorch, float32, same checkpoints, its own process, "
        f"medians of {plural(results['repeats'], 'repeat')}):",
        "",
        "| decoding | transformers tok/s | ours | ours tok/s | ours / transformers |",
        "|---|---|---|---|---|",
        f"| greedy ({same}) | {hf['greedy']['tokens_per_second']:.1f} | plain | {plain:.1f} | "
        f"{plain / hf['greedy']['tokens_per_second']:.2f}x |",
    ]
    labels = {"assisted": ("assisted, g {g}", "g {g}"), "assisted_default": ("assisted, its default schedule", "adaptive"),
              "prompt_lookup": ("prompt lookup, up to {g} tokens", "prompt lookup")}
    for task, (theirs, mine) in labels.items():
        if task in hf and mine.format(g=hf[task]["num_draft"]) in ours:
            rate, g = hf[task]["tokens_per_second"], hf[task]["num_draft"]
            mine = mine.format(g=g)
            lines.append(f"| {theirs.format(g=g)} | {rate:.1f} | {mine} | {ours[mine]:.1f} | {ours[mine] / rate:.2f}x |")
    return lines


def sweep_table(sweep):
    """One line per eps: acceptance, the best constant g, and the adaptive schedule against both."""
    lines = ["Sweep over eps (the synthetic target's distance from its draft):", "",
             "| eps | a (adaptive) | plain tok/s | best constant | its speedup | adaptive speedup | "
             "adaptive / best constant |", "|---|---|---|---|---|---|---|"]
    for eps, results in sweep:
        rows = results["speculative"]
        constant = max((r for r in rows if r["schedule"] == "constant"), key=lambda r: r["tokens_per_second"])
        adaptive = next(r for r in rows if r["label"] == "adaptive")
        lines.append(f"| {eps} | {ratio(adaptive['alpha'])} | {results['plain']['tokens_per_second']:.1f} | "
                     f"{constant['label']} | {constant['wall_speedup']:.2f}x | {adaptive['wall_speedup']:.2f}x | "
                     f"{adaptive['tokens_per_second'] / constant['tokens_per_second']:.2f}x |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [r for r in results["speculative"] if r["delta"] == 0]
    rows = [r for r in everything if r["schedule"] == "constant"]
    g = [r["num_draft"] for r in rows]
    c = results["cost_ratio"]
    scored = "eval" in results  # a second panel: quality against speed
    fig, axes = plt.subplots(1, 1 + scored, figsize=(7.5 * (1 + scored), 4.8), squeeze=False)
    speed = axes[0][0]
    if scored:
        quality.plot_panel(axes[0][1], results)
    speed.plot(g, [r["wall_speedup"] for r in rows], "o-", color="tab:blue", label="measured wall speedup")
    speed.plot(g, [r["target_pass_speedup"] for r in rows], "s--", color="tab:orange", alpha=0.7,
               label="target-pass speedup")
    speed.plot(g, [r["predicted_speedup"] for r in rows], "kx", label="theory at each g's measured a")
    # The theory curve at the acceptance pooled over all g.
    a = results["alpha_pooled"] or 0.0  # None: no draft was judged
    dense = [1 + i * (max(g) - 1 + 1e-9) / 100 for i in range(101)] if max(g) > 1 else [1]
    speed.plot(dense, [predicted_speedup(a, x, c) for x in dense], "k:", label=f"theory, a = {a:.2f}, c = {c:.3f}")
    speed.plot(g, [r["predicted_with_verify_cost"] for r in rows], "+", color="tab:red",
               label="prediction from the measured verify cost")
    # Schedules that choose k themselves: a level line each.
    for r, color in zip((r for r in everything if r["schedule"] == "adaptive"), ("tab:purple", "tab:brown")):
        speed.axhline(r["wall_speedup"], color=color, linestyle="-.", label=f"{r['label']} (wall)")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_xticks(g)
    speed.set_ylim(bottom=0)
    speed.set_xlabel("g, drafts per step (constant schedule)")
    speed.set_ylabel("speedup over plain decoding")
    accept = speed.twinx()
    accept.plot(g, [r["alpha"] for r in rows], "^-", color="tab:green", alpha=0.6, label="a (per-token acceptance)")
    accept.plot(g, [r["acceptance_rate"] for r in rows], "v:", color="tab:green", alpha=0.6,
                label="accepted / drafted")
    accept.set_ylim(0, 1.05)
    accept.set_ylabel("acceptance")
    handles, labels = speed.get_legend_handles_labels()
    more = accept.get_legend_handles_labels()
    speed.legend(handles + more[0], labels + more[1], loc="lower right", fontsize=8)
    speed.set_title("Speculative decoding: measured against theory")
    fig.tight_layout()
    write_atomically(path, "wb", lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def load_pair(args, eps):
    """(sources, target, draft, tokenizer, description of the pair)."""
    if args.preset:
        sources = synthetic.preset_pair(args.preset, eps, keep_hf=args.compare_hf)
        target_shape, draft_shape = synthetic.PRESETS[args.preset]
        pair = f"preset {args.preset}: {target_shape}'s shapes holding a {draft_shape}-shaped draft, eps {eps}"
    elif args.model is None:
        sources = synthetic_pair(eps, args.layers, args.d_model, args.family)
        pair = (f"synthetic {args.family} pair: {args.layers}-layer target holding a {PAIR['draft_layers']}-layer "
                f"draft, d_model {args.d_model}, eps {eps}")
    else:
        sources = {"target": args.model, "draft": args.draft_model,
                   "hf_target": args.hf_model, "hf_draft": args.hf_draft_model}
        pair = f"target {args.model}, draft {args.draft_model}"
    target, draft, tokenizer = load_models(sources["target"], sources["draft"])
    return sources, target, draft, tokenizer, pair


def settings_for(args):
    """Plain, every constant g, the adaptive schedule, each relaxed delta, and prompt lookup."""
    gs, most = sorted(set(args.num_draft)), max(args.num_draft)
    settings = [Setting("plain", 0)] + [Setting(f"g {g}", g) for g in gs]
    settings.append(Setting("adaptive", most, "adaptive", calibrated=True))
    if args.uncalibrated:
        settings.append(Setting("adaptive, uncalibrated", most, "adaptive"))
    settings += [Setting(f"adaptive, delta {d}", most, "adaptive", delta=d, calibrated=True)
                 for d in sorted(set(args.delta)) if d > 0]
    if args.prompt_lookup:
        settings.append(Setting("prompt lookup", most, "adaptive", lookup=True))
    return settings


def quality_samples(args, setting, target, draft, prompt_ids, sampling):
    """Outputs to score: greedy, those of every timed run; sampled, an untimed run per seed 0 .. samples - 1."""
    if sampling.greedy:
        return [run.outputs for run in setting.runs]
    samples = []
    for seed in range(args.samples):
        mx.random.seed(seed)
        setting.run(target, draft, prompt_ids, args.max_tokens, sampling)
        samples.append(setting.runs.pop().outputs)
    return samples


def benchmark_pair(args, target, draft, prompt_ids, sampling, progress, scorer=None, decode=None):
    """Warm up, measure step costs, time every setting round by round; the results without the HF part.

    With a quality.Scorer, also each setting's quality (after all timing, so scoring does not disturb it).
    """
    settings = settings_for(args)
    progress.set_postfix_str("warm-up")
    for setting in settings:
        setting.run(target, draft, prompt_ids[:1], min(args.max_tokens, 32), sampling)
        setting.runs.clear()
    progress.update(1)
    progress.set_postfix_str("step costs")
    # What a calibrated machine's adaptive runs start from (each run starts afresh, as a new process would).
    calibrated = measure_steps(target, draft, prompt_ids[0], max(args.num_draft))
    for setting in settings:
        setting.costs = calibrated
    progress.update(1)
    # Rounds: every setting once per round, so drifts of the machine hit all alike; the step
    # costs that predict the runs' speed are measured in every round too, for the same reason.
    measured = []
    for round_ in range(args.repeats):
        for setting in settings:
            progress.set_postfix_str(f"round {round_ + 1}: {setting.label}")
            setting.run(target, draft, prompt_ids, args.max_tokens, sampling)
            progress.update(1)
        progress.set_postfix_str(f"round {round_ + 1}: step costs")
        measured.append(measure_steps(target, draft, prompt_ids[0], max(args.num_draft),
                                      max(3, STEP_CALLS // args.repeats)))
    costs = median_costs(measured)
    steps = dict(draft=costs.draft, verify=costs.verify)
    plain = settings[0]
    exact = plain.runs[0].outputs
    rows = [summarize(s, plain, steps, sampling.greedy, exact) for s in settings[1:]]
    constant = [r for r in rows if r["schedule"] == "constant"]
    results = dict(
        greedy=sampling.greedy, target_step_ms=steps["verify"][1] * 1e3, draft_step_ms=steps["draft"] * 1e3,
        cost_ratio=steps["draft"] / steps["verify"][1],
        verify_ms={str(n): seconds * 1e3 for n, seconds in steps["verify"].items()},
        plain=dict(tokens=plain.runs[0].stats.generated, target_calls=plain.runs[0].stats.target_calls,
                   tokens_per_second=statistics.median(r.tokens_per_second for r in plain.runs),
                   seconds=[r.seconds for r in plain.runs]),
        speculative=rows, best_num_draft=max(constant, key=lambda r: r["wall_speedup"])["num_draft"],
        alpha_pooled=per_token_acceptance([r for s in settings[1:] if s.schedule == "constant" for r in s.runs]),
        outputs_identical=all(r["identical"] for r in rows if r["delta"] == 0) if sampling.greedy else None,
        plain_outputs=exact,
    )
    if scorer is not None:
        progress.set_postfix_str("quality")
        samples = [quality_samples(args, s, target, draft, prompt_ids, sampling) for s in settings]
        for summary, outputs in zip([results["plain"], *rows], samples):
            summary["quality"] = scorer.score_samples(outputs, samples[0], decode)
        progress.update(1)
    return results


def run_one(args, prompts, eps, progress, evaluation=None):
    """The whole benchmark on one pair: its results dict. evaluation: (examples, file) for --eval."""
    sources, target, draft, tokenizer, pair = load_pair(args, eps)
    mx.random.seed(0)
    sampling = decoder.Sampling(args.temperature)
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    began = time.perf_counter()
    start = cpu_times()
    results = dict(machine=machine(), pair=pair, eps=eps if args.model is None else None,
                   target_parameters=parameters(sources["target"]), draft_parameters=parameters(sources["draft"]),
                   prompts=len(prompts),
                   max_tokens=args.max_tokens, temperature=args.temperature, repeats=args.repeats)
    scorer = None
    if evaluation:
        scorer = quality.Scorer(evaluation[0])
        results["eval"] = dict(source=str(evaluation[1]), prompts=len(prompts), kind=scorer.kind,
                               samples=args.repeats if sampling.greedy else args.samples,
                               samples_are_seeds=not sampling.greedy, time_limit_s=scorer.time_limit,
                               memory_limit_bytes=scorer.memory_limit)
    results.update(benchmark_pair(args, target, draft, prompt_ids, sampling, progress, scorer,
                                  lambda tokens: text_of(tokenizer, tokens)))
    if args.trace:
        write_trace(args, eps, simulate.record(target, draft, prompt_ids, args.max_tokens, max(args.num_draft)))
    if args.batch_size:
        results["batches"] = benchmark_batches(args, target, draft, prompt_ids, results["best_num_draft"], sampling,
                                               progress)
    results["seconds"] = time.perf_counter() - began
    results["load"] = machine_load(start, cpu_times())  # the transformers child below is not timed against it
    results["trust"] = dict(reasons=distrust(results))
    results["trust"]["trusted"] = not results["trust"]["reasons"]
    if args.compare_hf:
        results["hf"] = benchmark_hf(args, sources, prompt_ids, results["best_num_draft"], progress)
        results["seconds_with_hf"] = time.perf_counter() - began
    return results


def write_trace(args, eps, trace):
    """Write a pair's simulate.Trace to --trace's file (its name gains -eps<eps> where --eps names several)."""
    path = Path(args.trace)
    if len(args.eps) > 1:
        path = path.with_name(f"{path.stem}-eps{eps}{path.suffix}")
    write_atomically(path, "w", lambda f: json.dump(trace.as_json(), f))


def parameters(folder):
    """The parameter count of a converted model (from its config: packed weights would miscount)."""
    return model.parameter_count(json.loads((model.resolve(folder) / "config.json").read_text()))


def run(args):
    if args.preset == "":
        print("presets: " + ", ".join(f"{name} (target shaped as {t}, draft as {d})"
                                      for name, (t, d) in synthetic.PRESETS.items()))
        return
    check(args)
    # Bad input is one line before the progress bar starts.
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else PROMPTS
    evaluation = read_eval(args)
    if evaluation:
        prompts = [example.prompt for example in evaluation[0]]
    require_models(args.model, args.draft_model)
    pairs = []  # built before the progress bar, each message on its own line
    if args.model is None:
        pairs = [synthetic.preset_pair(args.preset, eps, keep_hf=args.compare_hf) if args.preset
                 else synthetic_pair(eps, args.layers, args.d_model, args.family) for eps in args.eps]
    settings = len(settings_for(args))
    units = len(args.eps) * (2 + args.repeats * settings + len(args.batch_size or [])
                             + len(hf_tasks(args, 1)) * args.compare_hf + bool(args.eval))
    with tqdm(total=units, desc="benchmark", file=sys.stderr, dynamic_ncols=True) as progress:
        sweep = [(eps, run_one(args, prompts, eps, progress, evaluation)) for eps in args.eps]
    print("\n\n".join(table(results) for _, results in sweep))
    if args.markdown:
        report = "\n\n".join(table(results, markdown=True) for _, results in sweep)
        report += "\n\n" + sweep_table(sweep) + "\n" if len(sweep) > 1 else "\n"
        write_atomically(args.markdown, "w", lambda f: f.write(report))
    if len(sweep) > 1:
        print("\n" + sweep_table(sweep))
    if pairs:
        print(f"\nmain.py on this pair (random weights: the text is nonsense, the speed and exactness are real):\n"
              f"python main.py --model {pairs[0]['target']} --draft-model {pairs[0]['draft']} --prompt \"{PROMPTS[0]}\"")
    output = sweep[0][1] if len(sweep) == 1 else dict(sweep=[results for _, results in sweep])
    if args.json:
        write_atomically(args.json, "w", lambda f: json.dump(output, f, indent=2))
    if args.plot:
        plot(sweep[0][1], args.plot)
    if any("error" in results.get("hf", {}) for _, results in sweep):
        print(f"error: {sweep[0][1]['hf'].get('error', 'the transformers run failed')}", file=sys.stderr)
        sys.exit(1)


def read_eval(args):
    """(examples, file) of --eval, or None; a bad file or an unfetchable set is a UsageError."""
    if args.eval is None:
        return None
    try:
        return quality.load(args.eval, args.eval_limit)
    except quality.EvalError as error:
        raise UsageError(str(error)) from None


def main(argv=None):
    args = parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return
    guarded(run, args)


if __name__ == "__main__":
    main()
