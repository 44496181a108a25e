"""Benchmark one Llama pair three ways: the project's own family, the same weights as an
mlx-lm folder through models/mlxlm.py, and mlx-lm's own decoding (plain and speculative).

    python mlx_lm_benchmark.py [--eps 0.05] [--layers 24] [--d-model 512] [--max-tokens 48]
        [--rounds 3] [--num-draft-tokens 3] [--json FILE]

The pair is benchmark.py's synthetic Llama pair (built once, kept in the system's temporary
folder), written as Hugging Face checkpoints, converted once by convert.py and once by
`mlx_lm.convert` (float32). Every setting decodes the same prompts greedily, in rounds that
interleave the settings (each round in another order), and the table gives the median
tokens/s over rounds and the ratio to the project's default. Every setting's tokens must equal
plain decoding's (mlx-lm's own stop at the first EOS, as the project's do), or the run fails.
The project's default is main.py's: the adaptive schedule starting from the step costs an
earlier run kept (here the warm-up's, in a file of this run's own); "nothing kept" is a user's
very first run.
"""

import cpu_blas  # noqa: I001  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from tabulate import tabulate

import api
import benchmark
import calibration
import cli
import decoder
import files
import policy


def build_parser():
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, default=benchmark.EPS, help="the pair's disagreement (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=benchmark.PAIR["target_layers"], help="target layers")
    parser.add_argument("--d-model", type=int, default=benchmark.PAIR["d_model"], help="model width")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--num-draft-tokens", type=int, default=3,
                        help="mlx-lm's num_draft_tokens, and the project's constant k (default: %(default)s)")
    parser.add_argument("--side", choices=["both", "project", "mlx-lm"], default="both",
                        help="time only the project's rows or only mlx-lm's: after mlx-lm's speculative decoding has "
                             "run in a process, the project's multi-token passes there ran 1.5-2x slower (seen on "
                             "MLX 0.32.4's CPU backend), so each side is best timed in a process of its own")
    parser.add_argument("--json", help="also write the rows to this file")
    return parser


def mlx_lm_folders(pair):
    """The pair's Hugging Face checkpoints converted by mlx-lm itself (float32), once."""
    from mlx_lm import convert

    made = {}
    for role in ("target", "draft"):
        folder = pair[f"hf_{role}"].parent.parent / f"mlx-lm-{role}"
        if not (folder / "config.json").is_file():
            convert(str(pair[f"hf_{role}"]), str(folder), dtype="float32")
        made[role] = folder
    return made


def mlx_lm_tokens(steps, eos_token_ids, max_tokens):
    """mlx-lm's (token, ...) generator as a list, cut after the first EOS, as a chat client stops."""
    tokens = []
    for token, *_ in steps:
        tokens.append(int(token))
        if tokens[-1] in eos_token_ids or len(tokens) == max_tokens:
            break
    return tokens


def default_schedule(target, draft, n, fields, costs_file):
    """main.py's default on these folders, as a function(prompts) -> tokens per prompt: the adaptive
    schedule (cap 5), one policy over the run's prompts, starting from the step costs kept for them in
    `costs_file` and writing back what it measured; with `fields` None, a first run (nothing kept)."""

    def run(prompts):
        chosen = (calibration.adaptive_policy(5, fields, costs_file) if fields is not None
                  else policy.AdaptivePolicy(5))
        outputs = [list(decoder.speculative_generate(target, draft, ids, n, schedule=chosen)) for ids in prompts]
        if fields is not None:
            calibration.remember(chosen, fields, costs_file)
        return outputs

    return run


def settings(args, pair, costs_file):
    """name -> function(prompts) -> tokens per prompt, for every setting timed. The project's default
    keeps its step costs in `costs_file` (the warm-up's run keeps them for the rounds, as a user's
    first run does for the next), never in the user's own file."""
    from mlx_lm.generate import generate_step, speculative_generate_step
    from mlx_lm.utils import load_model

    own = api.load_models(pair["target"], pair["draft"])
    folders = mlx_lm_folders(pair)
    wrapped = api.load_models(folders["target"], folders["draft"])
    theirs = [load_model(folders[role])[0] for role in ("target", "draft")]
    n, k, eos = args.max_tokens, args.num_draft_tokens, own[0].eos_token_ids
    greedy = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731
    rows = {}
    each = lambda one: lambda prompts: [one(ids) for ids in prompts]  # noqa: E731
    for label, (target, draft, _), where in (("own family", own, (pair["target"], pair["draft"])),
                                             ("mlx-lm folder", wrapped, (folders["target"], folders["draft"]))):
        fields = calibration.identity(*where, 1)
        rows[f"{label}: plain"] = each(lambda ids, t=target: list(decoder.generate(t, ids, n)))
        rows[f"{label}: speculative, default"] = default_schedule(target, draft, n, fields, costs_file)
        rows[f"{label}: speculative, default, nothing kept"] = default_schedule(target, draft, n, None, costs_file)
        rows[f"{label}: speculative, constant k {k}"] = each(lambda ids, t=target, d=draft: list(
            decoder.speculative_generate(t, d, ids, n, num_draft=k, schedule="constant")))
    rows["mlx_lm: plain"] = each(lambda ids: mlx_lm_tokens(
        generate_step(mx.array(ids), theirs[0], max_tokens=n, sampler=greedy), eos, n))
    rows[f"mlx_lm: speculative, num_draft_tokens {k}"] = each(lambda ids: mlx_lm_tokens(
        speculative_generate_step(mx.array(ids), theirs[0], theirs[1], num_draft_tokens=k, max_tokens=n,
                                  sampler=greedy), eos, n))
    return rows, own[2]


def timed(run, prompts):
    """(tokens/s, the tokens) of decoding the prompts."""
    began, outputs = time.perf_counter(), run(prompts)
    return sum(map(len, outputs)) / (time.perf_counter() - began), outputs


def measure(rows, prompts, rounds):
    """name -> tokens/s per round; each round runs every setting, in an order that rotates."""
    names = list(rows)
    speeds, reference = {name: [] for name in names}, None
    for name in names:  # warm-up: compile and page in every path once (the default keeps its step costs)
        rows[name](prompts)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            speed, outputs = timed(rows[name], prompts)
            reference = reference or outputs
            if outputs != reference:
                raise SystemExit(f"error: {name} gave other tokens than {names[0]}: greedy outputs must agree")
            speeds[name].append(speed)
    return speeds


def table(speeds):
    base = statistics.median(speeds.get("own family: speculative, default") or next(iter(speeds.values())))
    lines = [(name, f"{statistics.median(s):.1f}", f"{min(s):.1f}-{max(s):.1f}", f"{statistics.median(s) / base:.2f}x")
             for name, s in speeds.items()]
    label = "/ own default" if "own family: speculative, default" in speeds else f"/ {next(iter(speeds))}"
    return tabulate(lines, ["setting", "tokens/s (median)", "range", label], disable_numparse=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if min(args.max_tokens, args.rounds, args.num_draft_tokens, args.layers) < 1:
        cli.fail("--max-tokens, --rounds, --num-draft-tokens and --layers must each be at least 1")
    pair = benchmark.synthetic_pair(args.eps, args.layers, args.d_model, "llama")
    with tempfile.TemporaryDirectory() as kept:
        rows, tokenizer = settings(args, pair, Path(kept) / "step-costs.json")
        rows = {name: run for name, run in rows.items() if args.side == "both" or name.startswith("mlx_lm") ==
                (args.side == "mlx-lm")}
        prompts = [tokenizer(p).input_ids for p in benchmark.PROMPTS]
        speeds = measure(rows, prompts, args.rounds)
    print(f"Llama pair eps {args.eps}, {args.layers} target layers, d_model {args.d_model}; {len(prompts)} prompts x "
          f"{args.max_tokens} tokens, greedy, {args.rounds} interleaved rounds, BLAS {cpu_blas.LOADED}")
    print(table(speeds))
    if args.json:
        files.write_atomically(args.json, "w", lambda f: json.dump(speeds, f, indent=1))


if __name__ == "__main__":
    sys.exit(main())
