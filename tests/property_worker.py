"""Runs drawn decoding examples in a process of its own, so a native crash cannot take pytest down.

    python tests/property_worker.py PAIRS_JSON

PAIRS_JSON maps a family name to [target folder, draft folder]. The worker reads one
JSON example per line on stdin and answers one JSON line on stdout: what decoding the
example emitted (tokens, Step sums, stats, streamed text, target passes) and the
references to hold it against (each prompt's plain greedy decoding alone, the target's
filtered support of each sampled token). test_properties.py draws the examples and
asserts the invariants; a worker that dies answers nothing, and the test names the
example that killed it.
"""

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cpu_blas  # noqa: E402,F401  (before MLX loads)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import decoder  # noqa: E402
import drafters  # noqa: E402
import model  # noqa: E402
import policy  # noqa: E402
from textstream import TextStream, text_of  # noqa: E402

# How far a sampled token may sit outside the filter's edge, in logits and in mass, and still
# count as inside it: the incremental pass and the full forward round differently.
EDGE = 1e-4


class CountingTarget:
    """The target, counting the rows of every decode call the loop makes (its verify passes)."""

    def __init__(self, target):
        self.target, self.passes = target, 0
        self.vocab_size, self.eos_token_id, self.eos_token_ids = target.vocab_size, target.eos_token_id, target.eos_token_ids

    def start(self, prompts):
        return self.target.start(prompts)

    def decode(self, tokens, cache, padding=None):
        self.passes += tokens.shape[0]
        return self.target.decode(tokens, cache, padding)


class RandomK:
    """A step policy drawing k in 0..cap at random each step (k 0 included)."""

    def __init__(self, num_draft, seed):
        self.num_draft, self.rng = num_draft, random.Random(seed)

    def choose(self, rows, cap):
        return self.rng.randint(0, min(cap, self.num_draft))

    def observe(self, rows, k, drafted, accepted, seconds):
        pass

    def forget(self, row):
        pass


def early_eos(target, draft, prompt_count=8, length=12):
    """Make EOS a token the pair emits early for some prompts but not all: the token whose
    first appearance in greedy outputs of random prompts falls inside `length` most often,
    among those that do not open most outputs. Returns the chosen id."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, target.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(prompt_count)]
    target.args.eos_token_id = draft.args.eos_token_id = -1  # nothing stops early while choosing
    outputs = [list(decoder.generate(target, ids, length)) for ids in prompts]
    firsts = [out[0] for out in outputs]
    candidates = {}
    for out in outputs:
        for token in set(out):
            candidates[token] = candidates.get(token, 0) + 1
    allowed = [t for t in candidates if firsts.count(t) <= prompt_count // 2 and candidates[t] < prompt_count]
    eos = max(allowed or candidates, key=lambda t: (candidates[t], -t))
    target.args.eos_token_id = draft.args.eos_token_id = eos
    return eos


class Worker:
    def __init__(self, pairs):
        self.pairs = pairs
        self.loaded = {}
        self.plain = {}

    def pair(self, family):
        if family not in self.loaded:
            target_dir, draft_dir = self.pairs[family]
            target, tokenizer = model.load(target_dir)
            draft = model.load(draft_dir)[0]
            early_eos(target, draft)
            self.loaded[family] = (target, draft, tokenizer)
        return self.loaded[family]

    def alone(self, family, target, ids, max_tokens):
        """Plain greedy decoding of one prompt by itself (the reference)."""
        key = (family, tuple(ids), max_tokens)
        if key not in self.plain:
            self.plain[key] = list(decoder.generate(target, ids, max_tokens))
        return self.plain[key]

    @staticmethod
    def steps(example, target, drafter, sampling, stats):
        """The Step records of the example's run, by the path main.py takes for its settings
        (or the server's, a queue of requests with settings of their own, when rows are drawn)."""
        prompts, max_tokens = example["prompts"], example["max_tokens"]
        num_draft = example["num_draft"]
        chosen = (RandomK(num_draft, example["seed"]) if example["schedule"] == "random"
                  else policy.make_policy(example["schedule"], num_draft))
        if example.get("rows"):
            queue = decoder.RequestQueue(
                decoder.Request(ids, row["max_tokens"], row_sampling(row), 0.0, row["num_draft"], row["seed"], stats=s)
                for ids, row, s in zip(prompts, example["rows"], stats))
            yield from decoder.speculative_steps(target, decoder.as_drafter(drafter), queue, None, chosen,
                                                 batch_size=example["batch_size"])
            return
        if drafter is None and example["batch_size"] == 1:
            for i, ids in enumerate(prompts):
                yield from decoder.plain_steps(target, ids, max_tokens, sampling, stats[i], i)
            return
        yield from decoder.speculative_steps(target, decoder.as_drafter(drafter), prompts, max_tokens, chosen, 0.0,
                                             sampling, example["batch_size"], stats)

    def run(self, example):
        target, draft, tokenizer = self.pair(example["family"])
        prompts, max_tokens = example["prompts"], example["max_tokens"]
        sampling = row_sampling(example["sampling"])
        counting = CountingTarget(target)
        drafter = {"model": draft, "lookup": drafters.PromptLookupDrafter(example["ngram_max"]), "none": None}[
            example["drafter"]]
        stats = [decoder.Stats() for _ in prompts]
        mx.random.seed(example["seed"])
        steps = self.steps(example, counting, drafter, sampling, stats)
        rows = [dict(tokens=[], steps=0, drafted=0, accepted=0, finished=0, empty_steps=0, unaccounted=0,
                     streamed="") for _ in prompts]
        streams = [TextStream(tokenizer) for _ in prompts]
        for step in steps:
            row = rows[step.index]
            row["tokens"] += step.tokens
            row["steps"] += 1
            row["drafted"] += step.drafted
            row["accepted"] += step.accepted
            row["finished"] += step.finished
            row["empty_steps"] += not step.tokens
            row["unaccounted"] += (len(step.tokens) - step.accepted not in (0, 1))
            row["streamed"] += streams[step.index].add(step.tokens)
            if step.finished:
                row["streamed"] += streams[step.index].finish()
        for row, s in zip(rows, stats):
            row["stats"] = {k: v for k, v in s.as_dict().items() if k not in ("seconds", "tokens_per_second")}
            row["text"] = text_of(tokenizer, row["tokens"])
        answer = dict(rows=rows, passes=counting.passes, eos=target.eos_token_id, alone=[], outside=[])
        settings = example.get("rows") or [dict(example["sampling"], max_tokens=max_tokens)] * len(prompts)
        for ids, row, setting in zip(prompts, rows, settings):
            row["max_tokens"] = setting["max_tokens"]
            chosen = row_sampling(setting)
            # Greedy rows: plain greedy decoding of the prompt alone; sampled rows: its support.
            answer["alone"].append(self.alone(example["family"], target, ids, setting["max_tokens"])
                                   if chosen.greedy else None)
            answer["outside"].append([] if chosen.greedy else outside_support(target, ids, row["tokens"], chosen))
        return answer


def row_sampling(setting):
    """A Sampling from a drawn setting's temperature, top_k and top_p."""
    return decoder.Sampling(setting["temperature"], setting["top_k"], setting["top_p"])


def outside_support(target, prompt, tokens, sampling):
    """Positions of `tokens` that the target's filtered distribution gives no mass, from one full forward."""
    if not tokens:
        return []
    cache, firsts = target.start([prompt])
    inputs = mx.array([firsts + tokens[:-1]])
    logits = np.array(target.decode(inputs, cache)[0].astype(mx.float32)) / sampling.temperature
    outside = []
    for position, (row, token) in enumerate(zip(logits, tokens)):
        if 0 < sampling.top_k < len(row) and row[token] < np.sort(row)[-sampling.top_k] - EDGE:
            outside.append(position)
            continue
        if sampling.top_k and 0 < sampling.top_k < len(row):
            row = np.where(row < np.sort(row)[-sampling.top_k], -np.inf, row)
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        mass_before = probs[probs > probs[token]].sum()
        if sampling.top_p < 1.0 and mass_before >= sampling.top_p + EDGE:
            outside.append(position)
    return outside


def serve():
    worker = Worker(json.loads(sys.argv[1]))
    for line in sys.stdin:
        try:
            answer = worker.run(json.loads(line))
        except Exception as error:  # an exception is a finding too: report it, keep serving
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
