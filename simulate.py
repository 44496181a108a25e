"""Replay step policies against a recorded trace: compare schedules without the machine's noise.

A trace holds what a greedy run of a draft/target pair decides, independently of any
schedule: for each prompt, whether the draft's greedy token agrees with the target's at
each position of the target's own output (the draft teacher-forced on it), and samples of
what a step with k drafts costs on the machine that recorded it (k 0: plain decoding's
seconds per token; k >= 1: whole speculative steps, timed by the loop). Under greedy
decoding that is everything a schedule changes: a step at position t with k drafts
accepts the run of agreements starting at t (at most k) and emits one token more.

`replay` runs any decoder.StepPolicy on a trace, deterministically for a seed (each step's
seconds are drawn from the recorded samples of its k), and returns tokens per second.

    python simulate.py record --model M --draft-model D [--prompt-file F] --out trace.json
    python simulate.py replay trace.json [--num-draft 4] [--seeds 20]
"""

import cpu_blas  # noqa: F401, I001  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
import random
import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
from tabulate import tabulate

import calibration
import cli
import decoder
import drafters
import files
import policy


@dataclass
class Trace:
    """agreement: per prompt, 0/1 per output position (the draft's greedy token equals the
    target's there); costs: {k: seconds of a step with k drafts, several samples}."""

    agreement: list
    costs: dict

    @classmethod
    def from_json(cls, data):
        """A Trace from its JSON object; ValueError naming what is wrong."""
        try:
            agreement = [[int(bool(flag)) for flag in row] for row in data["agreement"]]
            costs = {int(k): [float(s) for s in samples] for k, samples in data["costs"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a trace ({type(error).__name__}: {error})") from None
        if 0 not in costs or not all(samples and min(samples) > 0 for samples in costs.values()):
            raise ValueError("a trace needs positive step costs for k 0 and for each k it lists")
        return cls(agreement, costs)

    def as_json(self):
        return {"agreement": self.agreement, "costs": {str(k): v for k, v in sorted(self.costs.items())}}


def accepted_run(agreement, position, k):
    """Drafts a k-draft step at `position` accepts: the agreements in a row from there, at most k."""
    count = 0
    while count < k and position + count < len(agreement) and agreement[position + count]:
        count += 1
    return count


def replay(chosen, trace, seed=0):
    """Tokens per second of StepPolicy `chosen` decoding the trace's prompts one at a time (batch 1).

    A k the trace has no costs for is refused (ValueError): record the trace with that k.
    """
    rng = random.Random(seed)
    tokens = seconds = 0.0
    for index, agreement in enumerate(trace.agreement):
        position = 0
        while position < len(agreement):
            left = len(agreement) - position
            k = chosen.choose([index], min(chosen.num_draft, left - 1))
            if k not in trace.costs:
                raise ValueError(f"the trace has no step costs for k {k}")
            accepted = accepted_run(agreement, position, k)
            step = rng.choice(trace.costs[k])
            chosen.observe([index], k, [k], [accepted], step)
            position += accepted + 1
            tokens += accepted + 1
            seconds += step
        chosen.forget(index)
    return tokens / seconds


def agreement(target, draft, prompt_ids, max_tokens):
    """Per prompt: the target's greedy output, and 0/1 per position, whether the draft's greedy
    token (teacher-forced on that output, one pass) is the target's."""
    rows = []
    for ids in prompt_ids:
        output = list(decoder.generate(target, ids, max_tokens))
        cache, (first,) = draft.start([ids])
        logits = draft.decode(mx.array([[first] + output[:-1]], mx.int32), cache)
        guesses = mx.argmax(logits[0], axis=-1).tolist()
        rows.append([int(guess == token) for guess, token in zip(guesses, output)])
    return rows


def step_costs(target, draft, prompt_ids, max_tokens, num_draft):
    """{k: samples of seconds}: k 0 as plain decoding's seconds per token (one sample per prompt,
    its queued passes averaged out), k >= 1 as each step of a constant-k run."""
    costs = {k: [] for k in range(num_draft + 1)}
    for _ in range(2):  # the first round warms every shape up; only the second is kept
        costs = {k: [] for k in range(num_draft + 1)}
        for ids in prompt_ids:
            began = time.perf_counter()
            count = len(list(decoder.generate(target, ids, max_tokens)))
            costs[0].append((time.perf_counter() - began) / count)
            for k in range(1, num_draft + 1):
                steps = list(decoder.speculative_steps(target, drafters.ModelDrafter(draft), [ids], max_tokens,
                                                       policy.ConstantPolicy(k)))
                # A run's first step pays one-off allocations: left out, as StepCosts leaves it out.
                costs[k] += [step.seconds for step in steps[1:] if step.num_draft == k]
    return {k: samples for k, samples in costs.items() if samples}


def record(target, draft, prompt_ids, max_tokens, num_draft):
    """The Trace of a pair on this machine (greedy)."""
    return Trace(agreement(target, draft, prompt_ids, max_tokens),
                 step_costs(target, draft, prompt_ids, max_tokens, num_draft))


SEEDS_APART = 10_000  # a later run draws other step times than the first


def later_run(trace, num_draft, seed):
    """Tokens per second of the adaptive schedule on a user's second run: it starts from what a first
    run on the trace kept (calibration.learned: its step costs and pooled acceptance), as main.py does."""
    first = policy.AdaptivePolicy(num_draft)
    replay(first, trace, seed)
    costs, pooled = calibration.learned(first, 1)
    second = calibration.starting_from(num_draft, 1, costs, pooled) if costs else policy.AdaptivePolicy(num_draft)
    return replay(second, trace, seed + SEEDS_APART)


def compare(trace, num_draft, seeds=20):
    """[(setting, median tok/s over seeds, / plain, / best constant)] for plain, each constant k and
    the adaptive schedule, on a first run (nothing kept) and on a later one (`later_run`)."""
    settings = [("plain", lambda seed: replay(policy.ConstantPolicy(0), trace, seed))]
    settings += [(f"g {k}", lambda seed, k=k: replay(policy.ConstantPolicy(k), trace, seed))
                 for k in range(1, num_draft + 1) if k in trace.costs]
    settings += [("adaptive", lambda seed: replay(policy.AdaptivePolicy(num_draft), trace, seed)),
                 ("adaptive, later run", lambda seed: later_run(trace, num_draft, seed))]
    rates = {name: statistics.median(run(seed) for seed in range(seeds)) for name, run in settings}
    best = max(rate for name, rate in rates.items() if name.startswith("g "))
    return [(name, rate, rate / rates["plain"], rate / best) for name, rate in rates.items()]


def build_parser():
    parser = cli.ArgumentParser(description="Record a pair's trace, or replay step policies on one.")
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="time a pair and write its trace")
    rec.add_argument("--model", required=True, help="target: converted or mlx-lm folder, or a name")
    rec.add_argument("--draft-model", required=True, help="draft: converted or mlx-lm folder, or a name")
    rec.add_argument("--prompt-file", help="JSON lines with a \"prompt\" field (default: main.py's prompt)")
    rec.add_argument("--max-tokens", type=int, default=48, help="tokens per prompt")
    rec.add_argument("--num-draft", type=int, default=4, help="time k 1 .. this")
    rec.add_argument("--out", required=True, help="the trace's JSON file")
    play = commands.add_parser("replay", help="compare plain, each constant k and the adaptive schedule")
    play.add_argument("trace", help="a trace written by `record`")
    play.add_argument("--num-draft", type=int, default=4, help="the adaptive schedule's cap")
    play.add_argument("--seeds", type=int, default=20, help="replays per setting (their median is printed)")
    return parser


def main(argv=None):
    import api
    import main as cli_main

    args = build_parser().parse_args(argv)
    if args.command == "record":
        if args.max_tokens < 1 or args.num_draft < 1:
            cli.fail("--max-tokens and --num-draft must be at least 1")
        try:
            texts = cli_main.read_prompt_file(args.prompt_file) if args.prompt_file else [cli_main.DEFAULT_PROMPT]
            target, draft, tokenizer = api.load_models(args.model, args.draft_model)
            prompt_ids = [api.encode_text(tokenizer, text) for text in texts]
        except api.UsageError as error:
            cli.fail(error)
        trace = record(target, draft, prompt_ids, args.max_tokens, args.num_draft)
        files.write_atomically(args.out, "w", lambda f: json.dump(trace.as_json(), f))
        print(f"wrote {args.out}: {sum(map(len, trace.agreement))} positions, "
              f"agreement {statistics.mean(f for row in trace.agreement for f in row):.2f}")
        return
    try:
        with open(args.trace) as handle:
            trace = Trace.from_json(json.load(handle))
    except (OSError, json.JSONDecodeError, ValueError) as error:
        cli.fail(f"{args.trace}: {error}")
    most = max(k for k in trace.costs)
    if args.seeds < 1 or not 1 <= args.num_draft <= most:
        cli.fail(f"--seeds must be at least 1 and --num-draft in [1, {most}] (the ks the trace timed)")
    rows = compare(trace, args.num_draft, args.seeds)
    print(tabulate([(n, f"{r:.1f}", f"{p:.2f}x", f"{b:.2f}x") for n, r, p, b in rows],
                   headers=["setting", "tok/s", "/ plain", "/ best constant"], disable_numparse=True))


if __name__ == "__main__":
    main()
