"""Plain and speculative decoding, as token generators, for any model family.

The decoder talks to a model only through `LanguageModel` below, and to its cache
only through `DecoderCache`.

Speculative decoding (Leviathan et al. 2023): each step the draft proposes up to
`num_draft` tokens, the target scores them all in one decode call, the longest accepted
prefix is kept and the target adds one token of its own. The host reads the result
once per step; the draft loop itself never waits on the device.
"""

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import mlx.core as mx

GREEDY_TEMPERATURE = 1e-6


class DecoderCache(Protocol):
    """Per-row decoding state of one batch (models/cache.py has the shared implementation)."""

    def trim(self, counts) -> None:
        """Forget the last `counts` tokens: one int for every row, or one per row."""

    def replace_rows(self, rows: list, fresh: "DecoderCache") -> None:
        """Put the prompts of `fresh` (a cache from `start`) in place of `rows`."""

    def keep_rows(self, rows: list) -> None:
        """Drop every row not in `rows`."""


class LanguageModel(Protocol):
    """What decoding needs of a model; every family in models/ provides it.

    `start` sets up the context of each prompt (an encoder-decoder encodes it; a causal
    model prefills it, left-padded, all but its last token) and says which token each
    row feeds first. `decode` returns logits (batch, n, vocab) for n new tokens per row
    and advances the cache past them; `padding` (batch,) counts leading filler tokens.
    """

    vocab_size: int
    eos_token_id: int

    def start(self, prompts: list) -> tuple:
        """(cache, first input token of each row) for prompts given as lists of token ids."""

    def decode(self, tokens: mx.array, cache: DecoderCache, padding=None) -> mx.array:
        """Logits for `tokens` (batch, n); the cache advances past them."""


@dataclass
class Sampling:
    """How a token is chosen from logits; temperature <= 1e-6 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self):
        return self.temperature <= GREEDY_TEMPERATURE


@dataclass
class Stats:
    """Counters of one generation, filled in by the generators as they run."""

    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self):
        return self.generated / self.seconds if self.seconds else 0.0

    def as_dict(self):
        return dict(asdict(self), acceptance_rate=self.acceptance_rate, tokens_per_second=self.tokens_per_second)


def distribution(logits, sampling: Sampling):
    """Probabilities after temperature, top-k and top-p, over the last axis."""
    logits = logits.astype(mx.float32) / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_largest = mx.topk(logits, sampling.top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth_largest, -mx.inf, logits)
    probs = mx.softmax(logits, axis=-1)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        descending = -mx.sort(-probs, axis=-1)
        mass_before = mx.cumsum(descending, axis=-1) - descending
        smallest_kept = mx.where(mass_before < sampling.top_p, descending, mx.inf).min(axis=-1, keepdims=True)
        probs = mx.where(probs < smallest_kept, 0.0, probs)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs, key=None):
    """One token index per row of `probs`."""
    return mx.random.categorical(mx.log(probs), key=key)


def choose(logits, sampling: Sampling):
    """The next token for each row of logits (..., vocab)."""
    if sampling.greedy:
        return mx.argmax(logits, axis=-1)
    return sample(distribution(logits, sampling))


def leading_true(flags):
    """How many entries at the start of the last axis of a boolean array are True."""
    return mx.cumprod(flags.astype(mx.int32), axis=-1).sum(axis=-1)


def greedy_accept(target_logits, drafts, delta):
    """Verify greedy drafts: (accepted count, target token after the accepted prefix).

    target_logits (..., k + 1, vocab) score the positions of drafts (..., k) and one
    beyond; leading axes are rows of a batch. A draft is accepted when it is the
    target's argmax, or when delta > 0 and its probability is at least (1 - delta)
    times the target's largest.
    """
    best = mx.argmax(target_logits, axis=-1)
    accept = drafts == best[..., :-1]
    if delta > 0:
        probs = mx.softmax(target_logits[..., :-1, :].astype(mx.float32), axis=-1)
        drafted = mx.take_along_axis(probs, drafts[..., None], axis=-1)[..., 0]
        accept = accept | (drafted >= (1 - delta) * probs.max(axis=-1))
    count = leading_true(accept)
    return count, mx.take_along_axis(best, count[..., None], axis=-1)[..., 0]


def sampled_accept(p, q, drafts, delta, key=None):
    """Verify sampled drafts: (accepted count, target token after the accepted prefix).

    p (k + 1, vocab) is the target's distribution at each draft position and one beyond,
    q (k, vocab) the draft's. Draft x is accepted with probability min(1, p(x)/q(x) +
    delta); at the first rejection the token comes from norm(max(0, p - q)), and when
    all pass from p at the last position. At delta 0 the result is distributed as p.
    """
    accept_key, residual_key = mx.random.split(key) if key is not None else (None, None)
    k = drafts.shape[0]
    p_draft = mx.take_along_axis(p[:k], drafts[:, None], axis=-1)[:, 0]
    q_draft = mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(k,), key=accept_key) < mx.minimum(1.0, p_draft / q_draft + delta)
    count = leading_true(accept)
    residual = mx.maximum(p - mx.concatenate([q, mx.zeros_like(p[:1])]), 0.0)[count]
    # A residual of zero mass (p == q) is never reached by a rejection; guard anyway.
    residual = mx.where(residual.sum() > 0, residual, p[count])
    return count, sample(residual / residual.sum(), residual_key)


def generate(model, prompt_ids, max_tokens, sampling=Sampling(), stats=None):
    """Plain decoding: yield the model's tokens one by one until EOS or max_tokens."""
    stats = stats if stats is not None else Stats()
    began = time.perf_counter() - stats.seconds  # stats accumulate across calls
    cache, (first,) = model.start([prompt_ids])

    def step(token):
        stats.target_calls += 1
        return choose(model.decode(token.reshape(1, 1), cache)[0, -1], sampling)

    token = step(mx.array(first))
    mx.async_eval(token)
    for n in range(max_tokens):
        # Queue the next step before reading this token, so the device never idles.
        upcoming = step(token) if n + 1 < max_tokens else None
        if upcoming is not None:
            mx.async_eval(upcoming)
        value = token.item()
        stats.generated += 1
        stats.seconds = time.perf_counter() - began
        yield value
        if value == model.eos_token_id:
            return
        token = upcoming


@dataclass
class Row:
    """One prompt being decoded: what both models still have to see, and its counters."""

    index: int
    newest: int
    stats: Stats
    began: float
    key: mx.array
    unseen_by_draft: list = field(default_factory=list)
    generated: int = 0

    def next_key(self):
        self.key, key = mx.random.split(self.key)
        return key


def sample_rows(probs, rows):
    """One token per row of probs (batch, vocab), each from its row's own random stream."""
    return mx.stack([sample(p, row.next_key()) for p, row in zip(probs, rows)])


def left_padded(sequences):
    """(tokens (batch, width), padding (batch,)) with each sequence right-aligned."""
    width = max(len(s) for s in sequences)
    return mx.array([[0] * (width - len(s)) + s for s in sequences]), [width - len(s) for s in sequences]


def propose(draft, cache, inputs, padding, count, sampling, rows):
    """Let the draft propose `count` tokens per row after `inputs`: (tokens, q or None).

    Nothing here waits on the device: each proposal feeds the next as a lazy array.
    """
    tokens, dists = [], []
    for _ in range(count):
        logits = draft.decode(inputs, cache, padding)[:, -1]
        padding = None
        if sampling.greedy:
            token = mx.argmax(logits, axis=-1)
        else:
            dists.append(distribution(logits, sampling))
            token = sample_rows(dists[-1], rows)
        token = token.astype(mx.int32)
        mx.async_eval(token)
        tokens.append(token)
        inputs = token[:, None]
    return mx.stack(tokens, axis=1), (mx.stack(dists, axis=1) if dists else None)


def verify(logits, drafts, q, delta, sampling, rows):
    """(accepted count, target token) per row, from the target's logits over the drafts."""
    if sampling.greedy:
        return greedy_accept(logits, drafts, delta)
    p = distribution(logits, sampling)
    q = q if q is not None else mx.zeros((len(rows), 0, p.shape[-1]))
    verdicts = [sampled_accept(p[i], q[i], drafts[i], delta, row.next_key()) for i, row in enumerate(rows)]
    return mx.stack([c for c, _ in verdicts]), mx.stack([t for _, t in verdicts])


def speculative_batch(
    target, draft, prompts, max_tokens, num_draft=5, delta=0.0, sampling=Sampling(), batch_size=1, stats=None
):
    """Decode many prompts, `batch_size` at a time, each at its own pace: yield (prompt index, token).

    Each step the draft proposes k tokens for every row, the target scores them in one
    call, and every row keeps its own accepted prefix plus one target token. After a
    step both caches hold, for each row, exactly its emitted tokens except the newest,
    which is the next step's input; when a row accepted every draft, the draft has not
    seen its own last proposal, so it is fed that one too. A finished row (EOS or
    max_tokens) makes room for the next prompt. With draft None this is plain decoding.
    """
    stats = stats if stats is not None else [Stats() for _ in prompts]
    waiting = iter(range(len(prompts)))
    models = [target] if draft is None else [target, draft]

    def admit(count):
        """Rows and fresh caches (one per model) for up to `count` waiting prompts."""
        indices = [i for _, i in zip(range(count), waiting)]
        if not indices:
            return [], None
        now = time.perf_counter()
        started = [m.start([prompts[i] for i in indices]) for m in models]
        rows = []
        for i, first in zip(indices, started[0][1]):
            seed = mx.random.randint(0, 2**31 - 1, ()).item()
            # Stats accumulate across calls: time counts on from what they hold.
            began = now - stats[i].seconds
            rows.append(Row(i, first, stats[i], began, mx.random.key(seed)))
        return rows, [cache for cache, _ in started]

    rows, caches = admit(batch_size)
    while rows:
        remaining = [max_tokens - row.generated for row in rows]
        k = 0 if draft is None else min(num_draft, max(remaining) - 1)
        newest = mx.array([[row.newest] for row in rows])
        drafts, q = mx.zeros((len(rows), 0), mx.int32), None
        if k > 0:
            inputs, padding = left_padded([row.unseen_by_draft + [row.newest] for row in rows])
            drafts, q = propose(draft, caches[1], inputs, padding, k, sampling, rows)
        logits = target.decode(mx.concatenate([newest, drafts], axis=1), caches[0])
        counts, tokens = verify(logits, drafts, q, delta, sampling, rows)
        table = mx.concatenate([counts[:, None], drafts, tokens[:, None]], axis=1).astype(mx.int32).tolist()

        finished = []
        for slot, (row, (accepted, *proposed), left) in enumerate(zip(rows, table, remaining)):
            useful = min(k, left - 1)
            row.stats.target_calls += 1
            row.stats.draft_calls += useful
            row.stats.drafted += useful
            row.stats.accepted += min(accepted, useful)
            row.unseen_by_draft = proposed[k - 1 : k] if accepted == k else []
            emitted = proposed[:accepted] + proposed[-1:]
            row.newest = emitted[-1]
            done = len(emitted) >= left
            for value in emitted[:left]:
                row.generated += 1
                row.stats.generated += 1
                row.stats.seconds = time.perf_counter() - row.began
                yield row.index, value
                if value == target.eos_token_id:
                    done = True
                    break
            if done:
                finished.append(slot)
        caches[0].trim([k - accepted for accepted, *_ in table])
        if k > 0:
            caches[1].trim([k - 1 - accepted if accepted < k else 0 for accepted, *_ in table])
        rows, caches = refill(rows, caches, finished, admit)


def refill(rows, caches, finished, admit):
    """Replace finished rows with waiting prompts; drop the rest of the finished rows."""
    if not finished:
        return rows, caches
    newcomers, fresh = admit(len(finished))
    for slot, row in zip(finished, newcomers):
        rows[slot] = row
    if fresh is not None:
        for cache, new in zip(caches, fresh):
            cache.replace_rows(finished[: len(newcomers)], new)
    keep = [slot for slot in range(len(rows)) if slot not in finished[len(newcomers) :]]
    if not keep:
        return [], caches
    if len(keep) < len(rows):
        rows = [rows[slot] for slot in keep]
        for cache in caches:
            cache.keep_rows(keep)
    return rows, caches


def speculative_generate(
    target, draft, prompt_ids, max_tokens, num_draft=5, delta=0.0, sampling=Sampling(), stats=None
):
    """Speculative decoding of one prompt: yield the target's tokens, several per target call."""
    stats = stats if stats is not None else Stats()
    for _, token in speculative_batch(target, draft, [prompt_ids], max_tokens, num_draft, delta, sampling, 1, [stats]):
        yield token
