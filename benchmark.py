"""Measure speculative decoding against plain decoding, theory, and transformers.

    python benchmark.py                       # offline synthetic pair, built in seconds
    python benchmark.py --model t5-11b --draft-model t5-small --compare-hf

For each number of draft tokens g it reports, in one warmed-up process with medians of
several repeats: the speedup in wall time and in target forward passes, the acceptance
rate, tokens per second, and the speedup theory predicts (Leviathan et al. 2023):
(1 - a**(g+1)) / ((1 - a) * (g*c + 1)), with a the per-token acceptance probability and
c the cost ratio (draft step time / target step time), both measured here.
"""

import cpu_blas  # noqa: F401  (binds OpenBLAS before MLX loads on Linux)

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

import decoder
import model
import synthetic
from main import UsageError, guarded, read_prompt_file, require

PROMPTS = [
    "Return a new dictionary initialized from an optional positional argument and keyword arguments.",
    "Create a new parser object with the given description, then add the arguments the program accepts.",
    "Write the rows to the file object, formatted as comma separated values with the given dialect.",
]
# The default pair: a 24-layer, d_model 512 target holding a 2-layer draft plus 22
# layers whose output projections are scaled by EPS. EPS was tuned by running this
# benchmark at several values: at 0.03 the greedy acceptance rate (accepted / drafted)
# lies between 0.6 and 0.75 for num-draft 2 to 4 (per-token alpha about 0.8).
PAIR = dict(draft_layers=2, target_layers=24, d_model=512, d_ff=1024, gated=True, eps=0.03, seed=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Benchmark speculative decoding of T5 on MLX.")
    parser.add_argument("--model", help="target (converted folder or name); default: the synthetic pair")
    parser.add_argument("--draft-model", help="draft (converted folder or name)")
    parser.add_argument("--prompt-file", help='JSON lines with a "prompt" field; default: built-in prompts')
    parser.add_argument("--num-draft", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; medians are reported")
    parser.add_argument("--batch-size", type=int, nargs="+", help="also time batched decoding at these sizes")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers (needs torch)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--plot", help="draw speedup and acceptance against num-draft to this PNG")
    parser.add_argument("--eps", type=float, default=PAIR["eps"], help="synthetic pair's eps")
    parser.add_argument("--layers", type=int, default=PAIR["target_layers"], help="synthetic target's layers")
    parser.add_argument("--d-model", type=int, default=PAIR["d_model"], help="synthetic pair's d_model")
    return parser.parse_args(argv)


def check(args):
    require([
        (all(g >= 1 for g in args.num_draft), "--num-draft values must be at least 1"),
        (args.max_tokens >= 1, "--max-tokens must be at least 1"),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (args.temperature >= 0, "--temperature must not be negative"),
        (not args.batch_size or all(b >= 1 for b in args.batch_size), "--batch-size values must be at least 1"),
        ((args.model is None) == (args.draft_model is None), "give both --model and --draft-model, or neither"),
        (args.layers > PAIR["draft_layers"], f"--layers must exceed the draft's {PAIR['draft_layers']}"),
    ])
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    if args.compare_hf:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UsageError("--compare-hf needs torch: pip install torch") from None


def synthetic_pair(eps, layers, d_model):
    """(target, draft) folders of the synthetic pair, as converted MLX and as Hugging Face checkpoints."""
    import convert

    settings = dict(PAIR, eps=eps, target_layers=layers, d_model=d_model)
    root = synthetic.CACHE / ("pair-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())))
    if not (root / "mlx-draft" / "config.json").is_file():
        print(f"building the synthetic pair in {root} ...", file=sys.stderr)
        draft, target = synthetic.speculative_pair(root / "hf", **settings)
        for source in (target, draft):
            convert.convert(str(source), str(root / f"mlx-{source.name}"))
    return {"target": root / "mlx-target", "draft": root / "mlx-draft",
            "hf_target": root / "hf" / "target", "hf_draft": root / "hf" / "draft"}


def median_seconds(run, repeats):
    """Median wall time of `repeats` calls of run()."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def step_time(m, prompt_ids, tokens=1, count=20):
    """Median seconds of one decode call over `tokens` new tokens, on a warmed cache."""
    cache = decoder.start(m, [prompt_ids])
    mx.eval(m.decode(mx.zeros((1, 16), mx.int32), cache))
    new = mx.zeros((1, tokens), mx.int32)

    def one():
        mx.eval(m.decode(new, cache))
        cache.trim(tokens)

    one()
    return median_seconds(one, count)


def speculative_counts(target, draft, prompt_ids, max_tokens, g, sampling):
    """Outputs and counters of one untimed run, with the rejection count a's estimate needs."""
    outputs, stats, rejections = [], decoder.Stats(), 0
    for ids in prompt_ids:
        tokens, calls, accepted, drafted = [], stats.target_calls, stats.accepted, stats.drafted
        for token in decoder.speculative_generate(target, draft, ids, max_tokens, g, sampling=sampling, stats=stats):
            tokens.append(token)
            if stats.target_calls != calls:  # a new step: did it stop at a rejection?
                rejections += (stats.accepted - accepted) < (stats.drafted - drafted)
                calls, accepted, drafted = stats.target_calls, stats.accepted, stats.drafted
        outputs.append(tokens)
    return outputs, stats, rejections


def predicted_speedup(a, g, c, verify_cost=1.0):
    """Expected speedup of g drafts per step at per-token acceptance a and cost ratio c.

    verify_cost is the target's (g + 1)-token pass in single-token steps; the theory
    takes it as 1, which holds where that pass is bound by reading the weights.
    """
    tokens_per_step = g + 1 if a >= 1 else (1 - a ** (g + 1)) / (1 - a)
    return tokens_per_step / (g * c + verify_cost)


def benchmark_num_draft(args, target, draft, prompt_ids, plain, sampling, c, target_step, progress):
    """One table row per num-draft."""
    rows = []
    for g in args.num_draft:
        verify_cost = step_time(target, prompt_ids[0], tokens=g + 1) / target_step
        outputs, stats, rejections = speculative_counts(target, draft, prompt_ids, args.max_tokens, g, sampling)
        seconds = median_seconds(
            lambda: [list(decoder.speculative_generate(target, draft, ids, args.max_tokens, g, sampling=sampling))
                     for ids in prompt_ids],
            args.repeats,
        )
        # Maximum-likelihood per-token acceptance: accepted drafts over drafts judged.
        a = stats.accepted / (stats.accepted + rejections) if stats.accepted + rejections else 0.0
        wall = plain["seconds"] / seconds * stats.generated / plain["tokens"]
        predicted = predicted_speedup(a, g, c)
        predicted_verify = predicted_speedup(a, g, c, verify_cost)
        rows.append(dict(
            num_draft=g, acceptance_rate=stats.acceptance_rate, alpha=a, tokens=stats.generated,
            tokens_per_second=stats.generated / seconds, wall_speedup=wall,
            target_pass_speedup=stats.generated / stats.target_calls * plain["calls"] / plain["tokens"],
            predicted_speedup=predicted, efficiency=wall / predicted, verify_cost=verify_cost,
            predicted_with_verify_cost=predicted_verify, efficiency_with_verify_cost=wall / predicted_verify,
            identical=outputs == plain["outputs"] if sampling.greedy else None,
        ))
        progress.update(1)
    return rows


def benchmark_plain(args, target, prompt_ids, sampling):
    stats = decoder.Stats()
    outputs = [list(decoder.generate(target, ids, args.max_tokens, sampling, stats)) for ids in prompt_ids]
    seconds = median_seconds(
        lambda: [list(decoder.generate(target, ids, args.max_tokens, sampling)) for ids in prompt_ids], args.repeats
    )
    return dict(outputs=outputs, seconds=seconds, tokens=stats.generated, calls=stats.target_calls,
                tokens_per_second=stats.generated / seconds)


def batch_tokens_per_second(target, draft, prompt_ids, args, batch_size, g, sampling):
    """Median tokens per second of decoding all prompts, batch_size at a time."""
    generated = []

    def run():
        stats = [decoder.Stats() for _ in prompt_ids]
        list(decoder.speculative_batch(target, draft, prompt_ids, args.max_tokens, g, 0.0, sampling, batch_size, stats))
        generated.append(sum(s.generated for s in stats))

    seconds = median_seconds(run, args.repeats)
    return statistics.median(generated) / seconds


def benchmark_batches(args, target, draft, prompt_ids, g, sampling, progress):
    """Plain and speculative tokens per second at each batch size, over 16 prompts."""
    many = [prompt_ids[i % len(prompt_ids)] for i in range(16)]
    rows = []
    for size in args.batch_size:
        plain = batch_tokens_per_second(target, None, many, args, size, 0, sampling)
        fast = batch_tokens_per_second(target, draft, many, args, size, g, sampling)
        rows.append(dict(batch_size=size, plain_tokens_per_second=plain, speculative_tokens_per_second=fast))
        progress.update(1)
    return rows


def benchmark_hf(args, folders, prompts, plain, best_g, progress):
    """transformers' greedy and assisted generation on the same checkpoints, same prompts."""
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    target = T5ForConditionalGeneration.from_pretrained(folders["hf_target"]).eval()
    draft = T5ForConditionalGeneration.from_pretrained(folders["hf_draft"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["hf_target"])
    inputs = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]
    budget = dict(max_new_tokens=args.max_tokens, do_sample=False)

    def run(**extra):
        with torch.no_grad():
            return [target.generate(ids, **budget, **extra)[0, 1:].tolist() for ids in inputs]

    def timed(**extra):
        outputs = run(**extra)
        return sum(map(len, outputs)) / median_seconds(lambda: run(**extra), args.repeats), outputs

    greedy, outputs = timed()
    result = dict(greedy_tokens_per_second=greedy, ours_plain_vs_hf_greedy=plain["tokens_per_second"] / greedy,
                  hf_greedy_matches_ours=outputs == plain["outputs"], assisted={})
    progress.update(1)
    # Assisted generation is slow here; time it at our best num-draft only.
    assisted, _ = timed(assistant_model=draft, num_assistant_tokens=best_g, num_assistant_tokens_schedule="constant")
    result["assisted"][best_g] = assisted
    progress.update(1)
    return result


def machine():
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), device=str(mx.default_device()), dtype=str(model.default_dtype()),
                mlx=mx.__version__, openblas=cpu_blas.LOADED)


def table(results):
    """The results as markdown, the way speculative decoding papers print them."""
    p, info = results["plain"], results["machine"]
    lines = [
        f"Machine: {info['platform']}, {info['cpus']} CPUs, MLX {info['mlx']} on {info['device']}, "
        f"{info['dtype']}, BLAS: {info['openblas'] or 'reference'}",
        f"Target step {results['target_step_ms']:.2f} ms, draft step {results['draft_step_ms']:.2f} ms, "
        f"cost ratio c = {results['cost_ratio']:.3f}. Plain decoding: {p['tokens_per_second']:.1f} tok/s "
        f"({p['tokens']} tokens, {results['prompts']} prompts, median of {results['repeats']}).",
        "",
        "| num_draft | acceptance | alpha | tokens/s | wall speedup | target-pass speedup | predicted | "
        "efficiency | verify cost | predicted (verify cost) | efficiency (verify cost) | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["speculative"]:
        lines.append(
            f"| {r['num_draft']} | {r['acceptance_rate']:.2f} | {r['alpha']:.2f} | {r['tokens_per_second']:.1f} | "
            f"{r['wall_speedup']:.2f}x | {r['target_pass_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
            f"{r['efficiency']:.2f} | {r['verify_cost']:.2f} | {r['predicted_with_verify_cost']:.2f}x | "
            f"{r['efficiency_with_verify_cost']:.2f} | "
            f"{'n/a' if r['identical'] is None else 'yes' if r['identical'] else 'NO'} |"
        )
    lines.append("")
    lines.append("acceptance = accepted / drafted; alpha = per-token acceptance probability "
                 "(accepted / (accepted + rejections)), the a of the predicted speedup; verify cost = the "
                 "target's (g+1)-token pass in single-token steps (theory assumes 1).")
    if results.get("batches"):
        lines += ["", "| batch size | plain tok/s | speculative tok/s | speculative vs plain |", "|---|---|---|---|"]
        for b in results["batches"]:
            ratio = b["speculative_tokens_per_second"] / b["plain_tokens_per_second"]
            lines.append(f"| {b['batch_size']} | {b['plain_tokens_per_second']:.1f} | "
                         f"{b['speculative_tokens_per_second']:.1f} | {ratio:.2f}x |")
    if results.get("hf"):
        hf = results["hf"]
        lines += ["", f"transformers (PyTorch) greedy: {hf['greedy_tokens_per_second']:.1f} tok/s; ours plain is "
                  f"{hf['ours_plain_vs_hf_greedy']:.2f}x that; same tokens: {hf['hf_greedy_matches_ours']}.",
                  "", "| num_draft | transformers assisted tok/s | ours speculative tok/s | ours / theirs |",
                  "|---|---|---|---|"]
        ours = {r["num_draft"]: r["tokens_per_second"] for r in results["speculative"]}
        for g, theirs in hf["assisted"].items():
            lines.append(f"| {g} | {theirs:.1f} | {ours[g]:.1f} | {ours[g] / theirs:.2f}x |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["speculative"]
    g = [r["num_draft"] for r in rows]
    fig, speed = plt.subplots(figsize=(7, 4.5))
    speed.plot(g, [r["wall_speedup"] for r in rows], "o-", label="measured wall speedup")
    speed.plot(g, [r["target_pass_speedup"] for r in rows], "s--", label="target-pass speedup")
    speed.plot(g, [r["predicted_speedup"] for r in rows], "k:", label="theory (measured alpha, c)")
    speed.set_xlabel("num_draft (g)")
    speed.set_ylabel("speedup over plain decoding")
    accept = speed.twinx()
    accept.plot(g, [r["alpha"] for r in rows], "^-", color="tab:green", alpha=0.6, label="alpha")
    accept.set_ylim(0, 1)
    accept.set_ylabel("per-token acceptance")
    lines = speed.get_legend_handles_labels()
    extra = accept.get_legend_handles_labels()
    speed.legend(lines[0] + extra[0], lines[1] + extra[1], loc="lower right")
    speed.set_title(f"Speculative decoding, c = {results['cost_ratio']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(results, path):
    """Write via a temporary file, so a failed run leaves no half-written file."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent or ".", delete=False, suffix=".tmp") as f:
        json.dump(results, f, indent=2)
    os.replace(f.name, path)


def run(args):
    check(args)
    prompts = read_prompt_file(args.prompt_file) if args.prompt_file else PROMPTS
    folders = {"target": args.model, "draft": args.draft_model}
    if args.model is None:
        folders = synthetic_pair(args.eps, args.layers, args.d_model)
    try:
        target, tokenizer = model.load(folders["target"])
        draft = model.load(folders["draft"])[0]
    except model.LoadError as error:
        raise UsageError(str(error)) from None
    mx.random.seed(0)
    sampling = decoder.Sampling(args.temperature)
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    units = 1 + len(args.num_draft) + len(args.batch_size or []) + 2 * args.compare_hf
    with tqdm(total=units, desc="benchmark", file=sys.stderr) as progress:
        list(decoder.speculative_generate(target, draft, prompt_ids[0], 8, 2))  # warm-up
        plain = benchmark_plain(args, target, prompt_ids, sampling)
        progress.update(1)
        target_step, draft_step = step_time(target, prompt_ids[0]), step_time(draft, prompt_ids[0])
        c = draft_step / target_step
        rows = benchmark_num_draft(args, target, draft, prompt_ids, plain, sampling, c, target_step, progress)
        best = max(rows, key=lambda r: r["wall_speedup"])["num_draft"]
        results = dict(machine=machine(), prompts=len(prompts), repeats=args.repeats, max_tokens=args.max_tokens,
                       target_step_ms=target_step * 1e3, draft_step_ms=draft_step * 1e3, cost_ratio=c,
                       plain={k: v for k, v in plain.items() if k != "outputs"}, speculative=rows,
                       best_num_draft=best)
        if args.batch_size:
            results["batches"] = benchmark_batches(args, target, draft, prompt_ids, best, sampling, progress)
        if args.compare_hf:
            if "hf_target" not in folders:
                raise UsageError("--compare-hf needs the Hugging Face checkpoints: use the synthetic pair")
            results["hf"] = benchmark_hf(args, folders, prompts, plain, best, progress)
    print(table(results))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        plot(results, args.plot)


def main(argv=None):
    guarded(run, parse_args(argv))


if __name__ == "__main__":
    main()
