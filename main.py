"""Generate with speculative decoding from the command line.

    python main.py --num-draft 5 --delta 0.1 --prompt "translate English to German: ..."
    python main.py --model gpt2-xl --draft-model gpt2 --prompt "The meaning of life is"
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import dataclasses
import json
import os
import sys
import time

import mlx.core as mx

import api
import calibration
import cli
import decoder
import distributed
import drafters
import files
import model
import policy
from api import UsageError, check_lengths, load_models, require_models  # noqa: F401  (one way to load and check)
from textstream import TextStream, text_of

DEFAULT_PROMPT = "translate English to German: A small model drafts the words and a large model checks them."
OFFLINE = ("or see it work offline first: python benchmark.py builds a small synthetic pair (a few minutes "
           "the first time) and ends with the main.py command that runs on it")


def require(rules):
    """Raise UsageError with the message of the first (ok, message) rule that fails."""
    for ok, message in rules:
        if not ok:
            raise UsageError(message)


def guarded(run, args):
    """run(args), with a UsageError printed as one line and exit code 2, never a traceback."""
    try:
        run(args)
    except UsageError as error:
        cli.fail(error)
    except KeyboardInterrupt:
        cli.fail("interrupted")
    except RuntimeError as error:
        if not distributed.ring_failure(error):
            raise
        distributed.await_watchdog(distributed.init())  # it names the rank that failed and ends this one
    except BrokenPipeError:
        # The reader stopped early (`| head`). Point stdout at /dev/null so the flush at
        # exit cannot fail again, and stop quietly, as Python's documentation advises.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def parse_args(argv=None):
    """The command-line arguments; values are checked later, by check()."""
    return build_parser().parse_args(argv)


def build_parser():
    """main.py's flags, each with its help and default."""
    parser = cli.ArgumentParser(
        description="Speculative decoding on MLX: a small draft model proposes tokens, a large target checks them. "
                    "Models of one family and one tokenizer: T5 (encoder-decoder), or causal GPT-2 and "
                    "Llama-family models (TinyLlama, Llama 3.x, Qwen2.5, DeepSeek-Coder). No models yet? "
                    "python benchmark.py builds a synthetic pair offline and prints the main.py command for it.")
    parser.add_argument("--model", default="t5-11b", metavar="NAME_OR_DIR",
                        help="target: converted folder or name under mlx_models/")
    parser.add_argument("--draft-model", default="t5-small", metavar="NAME_OR_DIR",
                        help="draft: converted folder or name under mlx_models/")
    parser.add_argument("--prompt", metavar="TEXT", help=f"the input text (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--prompt-file", metavar="FILE.jsonl",
                        help='JSON lines, each an object with a "prompt" field (not with --prompt)')
    cli.add_drafting_flags(parser, "draft tokens per step: the cap of the adaptive schedule, the count of the "
                                   "constant one")
    parser.add_argument("--delta", type=float, default=0.0, help="acceptance relaxation in [0, 1]; 0 is exact")
    parser.add_argument("--max-tokens", type=int, default=100, help="tokens generated per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set of mass top-p")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="then keep the tokens at least min-p times as likely as the most likely one")
    parser.add_argument("--seed", type=int, default=0, help="random seed: sampling reproduces with --draft-schedule constant")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together")
    parser.add_argument("--regular-decode", action="store_true", help="plain decoding with the target only")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt instead of text")
    parser.add_argument("--pipeline", action="store_true",
                        help="under mlx.launch: split the target's layers over the ranks (default: share the prompts)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the step costs of these models, --num-draft and --batch-size on this machine, "
                             "keep them for the adaptive schedule's later runs, print them and exit")
    return parser


def decoding_settings(args):
    """The api.Settings the flags give (checked as the server checks a request's)."""
    return api.Settings(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, seed=args.seed, delta=args.delta,
                        num_draft=args.num_draft, schedule=args.draft_schedule)


def check(args):
    """Raise UsageError for the first value out of range."""
    problem = decoding_settings(args).problem(lambda name: "--" + name.replace("_", "-"))
    require([
        (args.prompt is None or args.prompt_file is None, "give --prompt or --prompt-file, not both"),
        (args.model.strip() and args.draft_model.strip(), "--model and --draft-model must not be empty"),
        *cli.drafting_problems(args),
        (problem is None, problem),  # the decoding settings, checked as the server checks them
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (not (args.prompt_lookup and args.regular_decode), "--prompt-lookup and --regular-decode exclude each other"),
        (not (args.calibrate and (args.prompt_lookup or args.regular_decode)),
         "--calibrate measures a draft model's steps: not with --prompt-lookup or --regular-decode"),
    ])


def read_prompt_file(path):
    """The "prompt" fields of a JSON-lines file."""
    prompts = []
    for number, item in files.json_lines(path, "--prompt-file", UsageError):
        prompt = item.get("prompt") if isinstance(item, dict) else None
        if not isinstance(prompt, str):
            raise UsageError(f'{path} line {number} is not a JSON object with a "prompt" string')
        prompts.append(prompt)
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def require_default_models(args):
    """With main.py's default target not converted: one line that also shows the offline way in."""
    if args.model != build_parser().get_default("model") or model.find(args.model) is not None:
        return
    wanted = [args.model] + ([] if args.regular_decode or args.prompt_lookup else [args.draft_model])
    raise UsageError(f"{model.not_found([name for name in wanted if model.find(name) is None])}; {OFFLINE}")


def step_events(args, target, draft, prompt_ids, stats, chosen, indices):
    """decoder.Step records (prompt index, tokens, finished, ...) as decided by the step policy `chosen`,
    for the prompts `indices` (all of them, or this rank's share under mlx.launch)."""
    sampling = decoding_settings(args).sampling
    drafter = decoder.as_drafter(draft)
    if args.batch_size == 1:
        # One prompt at a time, each from a seed of its own: a prompt's sample does not depend
        # on the prompts decoded before it (here, or on another rank).
        for i in indices:
            mx.random.seed(distributed.prompt_seed(args.seed, i))
            if draft is None:
                yield from decoder.plain_steps(target, prompt_ids[i], args.max_tokens, sampling, stats[i], i)
                continue
            for step in decoder.speculative_steps(target, drafter, [prompt_ids[i]], args.max_tokens, chosen,
                                                  args.delta, sampling, 1, [stats[i]]):
                yield dataclasses.replace(step, index=i)
        return
    for step in decoder.speculative_steps(target, drafter, [prompt_ids[i] for i in indices], args.max_tokens, chosen,
                                          args.delta, sampling, args.batch_size, [stats[i] for i in indices]):
        yield dataclasses.replace(step, index=indices[step.index])


def kept_costs(args, group):
    """The identity of this run's step costs kept by calibration.py, or None where none apply
    (plain decoding, prompt lookup, the constant schedule). Ranks under mlx.launch keep their own."""
    if args.regular_decode or args.prompt_lookup or (args.draft_schedule != "adaptive" and not args.calibrate):
        return None
    fields = calibration.identity(args.model, args.draft_model, args.batch_size)
    return fields if group.size == 1 else dict(fields, ranks=group.size, pipeline=args.pipeline)


def calibrate(args, target, draft, prompt_ids, group):
    """Measure and keep this machine's step costs for the models, --num-draft and --batch-size; print them."""
    costs = calibration.measure(target, draft, prompt_ids[0], args.num_draft, args.batch_size)
    try:
        calibration.store(kept_costs(args, group), costs)
    except OSError as error:
        raise UsageError(f"cannot keep the step costs in {calibration.path()}: {error.strerror or error}") from None
    print(calibration.describe(costs, args.batch_size))
    print(f"kept in {calibration.path()}")


def summary(stats, seconds, speculative):
    """One line: tokens, tokens per second, acceptance, target calls."""
    tokens = sum(s.generated for s in stats)
    drafted = sum(s.drafted for s in stats)
    calls = sum(s.target_calls for s in stats)
    # A zero denominator leaves a ratio undefined (nothing drafted: no acceptance), not 0.
    parts = [f"{tokens} tokens", f"{tokens / seconds:.1f} tok/s" if seconds else "n/a tok/s"]
    if speculative:
        parts.append(f"acceptance {sum(s.accepted for s in stats) / drafted:.2f}" if drafted else "acceptance n/a")
    parts.append(f"{calls} target calls ({calls / tokens:.2f} per token)" if tokens else f"{calls} target calls")
    return "[" + ", ".join(parts) + "]"


def stream(steps, tokenizer, stats, speculative):
    """Print each prompt's text as its tokens are decided (batch size 1: one prompt at a time), then its summary.

    Ctrl-C ends the text printed so far with its newline and its summary, then goes on as KeyboardInterrupt.
    """
    text, current = TextStream(tokenizer), None
    try:
        for step in steps:
            current = step.index
            print(text.add(step.tokens), end="", flush=True)
            if step.finished:
                print(text.finish() + "\n" + summary([stats[current]], stats[current].seconds, speculative), flush=True)
                text, current = TextStream(tokenizer), None
    except KeyboardInterrupt:
        if current is not None:
            print(text.finish() + "\n" + summary([stats[current]], stats[current].seconds, speculative), flush=True)
        raise


def print_json(steps, tokenizer, prompts, stats):
    """Print one JSON object per prompt, in the prompts' order, as soon as each is complete."""
    tokens = [[] for _ in prompts]
    finished = [False] * len(prompts)
    following = 0
    for step in steps:
        tokens[step.index] += step.tokens
        finished[step.index] = step.finished
        while following < len(prompts) and finished[following]:
            record = {
                "prompt": prompts[following],
                "text": text_of(tokenizer, tokens[following]),
                "tokens": tokens[following],
                "stats": stats[following].as_dict(),
            }
            print(json.dumps(record), flush=True)
            following += 1


def run(args):
    """Check the arguments, load the models once, and decode every prompt."""
    check(args)
    require_default_models(args)
    prompts = (read_prompt_file(args.prompt_file) if args.prompt_file
               else [DEFAULT_PROMPT if args.prompt is None else args.prompt])  # "" is a prompt too
    group = distributed.init()  # one process, or one rank of several under mlx.launch
    if args.pipeline and group.rank > 0:
        try:
            return distributed.serve_target(args.model, group)
        except model.LoadError as error:  # this rank's part would not load: one line, exit 2
            raise UsageError(str(error)) from None
    own_draft = not (args.regular_decode or args.prompt_lookup)
    target, draft, tokenizer = load_models(args.model, args.draft_model if own_draft else None,
                                           group if args.pipeline else None)
    prompt_ids = [api.encode_text(tokenizer, prompt) for prompt in prompts]
    check_lengths(prompt_ids, args.max_tokens, [m for m in (target, draft) if m is not None])
    if args.calibrate:
        calibrate(args, target, draft, prompt_ids, group)
        return distributed.finish(target, group)
    if args.prompt_lookup:
        draft = drafters.PromptLookupDrafter(args.ngram_max)
    mx.random.seed(args.seed)
    stats = [decoder.Stats() for _ in prompts]
    costs = kept_costs(args, group)
    # The adaptive schedule starts from this machine's kept step costs, if measured, and updates them.
    chosen = (calibration.adaptive_policy(args.num_draft, costs) if costs is not None
              else policy.make_policy(args.draft_schedule, args.num_draft))
    began = time.perf_counter()
    # Prompts are shared over the ranks unless they pipeline the target; rank 0 prints them all.
    sharing = distributed.ALONE if args.pipeline else group
    steps = step_events(args, target, draft, prompt_ids, stats, chosen, distributed.share(len(prompts), sharing))
    steps = distributed.gathered(steps, stats, sharing)
    if group.rank > 0:
        return group.close()
    speculative = draft is not None
    if args.json or args.batch_size > 1:
        print_json(steps, tokenizer, prompts, stats)
        # stdout stays pure JSON lines; the whole run's summary goes to stderr.
        print(summary(stats, time.perf_counter() - began, speculative), file=sys.stderr)
    else:
        stream(steps, tokenizer, stats, speculative)
        if len(prompts) > 1:
            print(summary(stats, time.perf_counter() - began, speculative))
    if costs is not None:
        calibration.remember(chosen, costs)
    distributed.finish(target, group)


def main(argv=None):
    """Entry point: parse, run, and turn bad values into one-line errors."""
    guarded(run, parse_args(argv))


if __name__ == "__main__":
    main()
