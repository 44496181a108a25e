"""Plain and speculative decoding, as token generators, for any model family.

The decoder talks to a model only through `LanguageModel` below, and to its cache
only through `DecoderCache`.

Speculative decoding (Leviathan et al. 2023): each step the draft proposes up to
`num_draft` tokens, the target scores them all in one decode call, the longest accepted
prefix is kept and the target adds one token of its own. The host reads the result
once per step; the draft loop itself never waits on the device.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import mlx.core as mx
import numpy as np

from drafters import ModelDrafter
from policy import make_policy
from sampling import (  # noqa: F401  (part of this module's interface)
    Sampling, adjusted, choose, distribution, sample, split_rows, uniform)


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
    eos_token_id: int  # the model's first EOS id (what T5 feeds an empty prompt)
    eos_token_ids: frozenset  # every id that ends a row (config.json and generation_config.json)

    def start(self, prompts: list) -> tuple:
        """(cache, first input token of each row) for prompts given as lists of token ids."""

    def decode(self, tokens: mx.array, cache: DecoderCache, padding=None) -> mx.array:
        """Logits for `tokens` (batch, n); the cache advances past them."""


class Drafter(Protocol):
    """Who proposes the drafts (drafters.py: a draft model, or prompt lookup).

    reads_the_text: whether its proposals depend on the tokens the host read last step (then no
    plain step is queued ahead of the read; a drafter that does not say is taken to).
    """

    reads_the_text: bool

    def start(self, prompts: list, firsts: list) -> None: ...

    def replace_rows(self, slots: list, prompts: list, firsts: list) -> None: ...

    def keep_rows(self, slots: list) -> None: ...

    def available(self, cap: int) -> int:
        """How many tokens, at most `cap`, it could propose for some row this step."""

    def propose(self, newest: list, k: int, sampling: Sampling) -> tuple:
        """(drafts (batch, k), q (batch, k, vocab) or None for a point mass, real drafts per row or None)."""

    def settle(self, newest: list, k: int, accepted: list, proposed: list, verdicts: list) -> None:
        """Learn the step's outcome: accepted count, the k drafts and the target's token, per row."""


class StepPolicy(Protocol):
    """How many tokens to draft each step (policy.py: constant or adaptive)."""

    num_draft: int  # the most it ever asks for

    def choose(self, rows: list, cap: int) -> int:
        """k in 0..cap for the rows (prompt indices) of the coming step."""

    def observe(self, rows: list, k: int, drafted: list, accepted: list, seconds: float) -> None: ...

    def forget(self, row: int) -> None: ...


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
        """accepted / drafted; None (undefined, null in JSON) when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_second(self):
        """generated / seconds; None (undefined) before any time was counted."""
        return self.generated / self.seconds if self.seconds else None

    def as_dict(self):
        return dict(asdict(self), acceptance_rate=self.acceptance_rate, tokens_per_second=self.tokens_per_second)


@dataclass
class Step:
    """What one step decided for one row; the loop yields one per row per step."""

    index: int  # the prompt's index
    tokens: list  # emitted this step: accepted drafts, then the target's own (cut at EOS or max_tokens)
    num_draft: int  # k, drafts asked of the drafter for the whole batch this step
    drafted: int  # drafts judged useful for this row (real ones, within max_tokens)
    accepted: int  # of them, accepted
    finished: bool  # the row met EOS or max_tokens
    seconds: float  # the step's wall time, shared by its rows
    host_seconds: float  # of it, the loop's own work on the host (not drafting, verifying or waiting)
    # Where the row's request asked for them, per emitted token: (the token, its log-probability under
    # the target, [(token, log-probability)] of the target's most likely tokens there, most likely first).
    logprobs: list = None


def leading_true(flags):
    """How many entries at the start of the last axis of a boolean array are True."""
    return mx.cumprod(flags.astype(mx.int32), axis=-1).sum(axis=-1)


def per_row_delta(delta):
    """delta as a number, or a list of one per row as an array (batch, 1) against (batch, k)."""
    return mx.array(delta, mx.float32)[:, None] if isinstance(delta, (list, tuple)) else delta


def greedy_accept(target_logits, drafts, delta, limit=None):
    """Verify greedy drafts: (accepted count, target token after the accepted prefix), per row.

    target_logits (batch, k + 1, vocab) score the positions of drafts (batch, k) and one
    beyond. A draft is accepted when it is the target's argmax, or when delta > 0 and
    its probability is at least (1 - delta) times the target's largest. limit (batch,)
    caps each row's count (drafts past it are filler). delta: one value, or one per row.
    """
    best = mx.argmax(target_logits, axis=-1)
    accept = drafts == best[..., :-1]
    if np.any(np.asarray(delta) > 0):
        delta = per_row_delta(delta)
        probs = mx.softmax(target_logits[..., :-1, :].astype(mx.float32), axis=-1)
        drafted = mx.take_along_axis(probs, drafts[..., None], axis=-1)[..., 0]
        relaxed = drafted >= (1 - delta) * probs.max(axis=-1)
        if isinstance(delta, mx.array):
            relaxed = relaxed & (delta > 0)  # a delta-0 row keeps the argmax alone (ties included)
        accept = accept | relaxed
    count = leading_true(accept)
    if limit is not None:
        count = mx.minimum(count, limit)
    return count, mx.take_along_axis(best, count[..., None], axis=-1)[..., 0]


def sampled_accept(p, q, drafts, delta, limit=None, key=None):
    """Verify sampled drafts: (accepted count, target token after the accepted prefix), per row.

    p (batch, k + 1, vocab) is the target's distribution at each draft position and one
    beyond, q (batch, k, vocab) the drafter's (None: a point mass on each draft). Draft x
    is accepted with probability min(1, p(x)/q(x) + delta); at the first rejection the
    token comes from norm(max(0, p - q)). Where a row stops without a rejection (all k
    accepted, or its `limit` (batch,) reached: its own cap, a drafter with fewer real
    drafts, its budget) the token comes from p itself. At delta 0 the result is
    distributed as p. key: one, or one per row (batch, 2); delta: one value, or one per row.
    """
    if key is None:
        accept_key = residual_key = None
    elif key.ndim == 2:
        keys = split_rows(key)
        accept_key, residual_key = keys[:, 0], keys[:, 1]
    else:
        accept_key, residual_key = mx.random.split(key)
    delta = per_row_delta(delta)
    batch, k = drafts.shape
    if q is None:
        q = (mx.arange(p.shape[-1]) == drafts[..., None]).astype(p.dtype)
    p_draft = mx.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accept = uniform((batch, k), accept_key) < mx.minimum(1.0, p_draft / q_draft + delta)
    count = leading_true(accept)
    rejected = count < k
    if limit is not None:
        rejected = count < limit
        count = mx.minimum(count, limit)
    at = count[:, None, None]
    p_next = mx.take_along_axis(p, at, axis=1)[:, 0]
    q_next = mx.take_along_axis(mx.pad(q, [(0, 0), (0, 1), (0, 0)]), at, axis=1)[:, 0]
    residual = mx.maximum(p_next - q_next, 0.0)
    # A residual of zero mass (p == q) is never reached by a rejection; guard anyway.
    mass = residual.sum(axis=-1, keepdims=True)
    chosen = mx.where(rejected[:, None] & (mass > 0), residual / mx.maximum(mass, 1e-30), p_next)
    return count, sample(chosen, residual_key)


def verify(logits, drafts, q, limit, delta, sampling):
    """(accepted count, target token) per row, from the target's logits over the drafts.

    Greedy rows are verified greedily and sampled rows by sampling, in one batch.
    """
    limit = None if limit is None else mx.array(limit)
    logits = adjusted(logits, sampling, drafts)
    greedy = sampling.greedy_rows
    if np.all(greedy):
        return greedy_accept(logits, drafts, delta, limit)
    sampled = sampled_accept(distribution(logits, sampling), q, drafts, delta, limit, sampling.keys)
    if not np.any(greedy):
        return sampled
    exact = greedy_accept(logits, drafts, delta, limit)
    mask = mx.array(greedy)
    return mx.where(mask, exact[0], sampled[0]), mx.where(mask, exact[1], sampled[1])


def generate(model, prompt_ids, max_tokens, sampling=Sampling(), stats=None):
    """Plain decoding: yield the model's tokens one by one until EOS or max_tokens."""
    stats = stats if stats is not None else Stats()
    began = time.perf_counter() - stats.seconds  # stats accumulate across calls
    cache, (first,) = model.start([prompt_ids])

    def step(token):
        return choose(model.decode(token.reshape(1, 1), cache)[0, -1], sampling)

    token = step(mx.array(first))
    mx.async_eval(token)
    for n in range(max_tokens):
        # Queue the next step before reading this token, so the device never idles.
        upcoming = step(token) if n + 1 < max_tokens else None
        if upcoming is not None:
            mx.async_eval(upcoming)
        value = token.item()
        # A pass is counted when its token is read: the one queued past EOS is dropped unread.
        stats.target_calls += 1
        stats.generated += 1
        stats.seconds = time.perf_counter() - began
        yield value
        if value in model.eos_token_ids:
            return
        token = upcoming



def plain_steps(model, prompt_ids, max_tokens, sampling=Sampling(), stats=None, index=0):
    """`generate` as Step records, one per token, for callers that read records."""
    began = time.perf_counter()
    for count, token in enumerate(generate(model, prompt_ids, max_tokens, sampling, stats), 1):
        finished = token in model.eos_token_ids or count == max_tokens
        now = time.perf_counter()
        yield Step(index, [token], 0, 0, 0, finished, now - began, 0.0)
        began = now


@dataclass
class Request:
    """One prompt and its own settings: a row of a batch.

    num_draft caps the drafts judged for this row (None: the policy's cap); seed gives
    the row its own random stream (None: MLX's global generator). `index` is set by the
    RequestQueue and names the row in Step records.
    """

    ids: list
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    delta: float = 0.0
    num_draft: int = None
    seed: int = None
    stats: Stats = field(default_factory=Stats)
    index: int = -1
    logprobs: int = None  # None: no log-probabilities; n >= 0: each token's, and the n most likely


class RequestQueue:
    """Requests waiting for a row: any thread may `put` or `cancel`; the step loop `take`s.

    A cancelled request leaves the batch before the next step (or never joins it).
    """

    def __init__(self, requests=()):
        self.changed = threading.Condition()
        self.waiting = deque()
        self.cancelled = set()
        self.count = 0
        for request in requests:
            self.put(request)

    def put(self, request):
        """Queue a request; return its index."""
        with self.changed:
            request.index = self.count
            self.count += 1
            self.waiting.append(request)
            self.changed.notify_all()
            return request.index

    def put_back(self, requests):
        """Return taken requests to the front of the queue, in their order."""
        with self.changed:
            self.waiting.extendleft(reversed(requests))

    def take(self, count):
        """Up to `count` waiting requests, oldest first, without waiting."""
        with self.changed:
            taken = []
            while self.waiting and len(taken) < count:
                request = self.waiting.popleft()
                if request.index in self.cancelled:
                    self.cancelled.discard(request.index)
                else:
                    taken.append(request)
            return taken

    def cancel(self, index):
        """Drop request `index` wherever it is: waiting, or decoding (at the next step)."""
        with self.changed:
            self.cancelled.add(index)
            self.changed.notify_all()

    def leaving(self, indices):
        """Of the rows `indices`, those cancelled; they are forgotten here."""
        with self.changed:
            gone = [index for index in indices if index in self.cancelled]
            self.cancelled.difference_update(gone)
            return gone

    def wait(self, timeout=None):
        """Block until a request waits (or timeout seconds pass); True if one does."""
        with self.changed:
            return self.changed.wait_for(lambda: self.waiting, timeout)

    def __len__(self):
        return len(self.waiting)


@dataclass
class Row:
    """One request being decoded: its newest token (the next input), its counters, its random key."""

    request: Request
    newest: int
    began: float
    key: object = None
    generated: int = 0
    output: list = field(default_factory=list)  # its tokens so far (penalties count them)

    @property
    def index(self):
        return self.request.index

    @property
    def stats(self):
        return self.request.stats


class Batch:
    """The rows being decoded together, the target's cache and the drafter, refilled from a RequestQueue.

    Rows leave when they finish or are cancelled; waiting requests take free places up
    to `size` before every step, in the slots of leaving rows or in new ones.
    """

    # Prompt tokens a long prompt's prefill runs between two steps of the others: a chunk this size
    # takes a few steps' time, so the rows decoding beside it slow down but do not stall.
    interleaved_chunk = 128

    def __init__(self, target, drafter, queue, size):
        self.target, self.drafter, self.queue, self.size = target, drafter, queue, size
        self.rows, self.cache = [], None
        self.pending = None  # (request, its prefill generator): a long prompt, prefilled a chunk per step
        self.refill([])

    def long(self, request):
        """Whether a request's prompt is prefilled a chunk per step rather than in one go."""
        chunk = getattr(self.target, "prefill_chunk", None)
        return chunk is not None and len(request.ids) > min(chunk, self.interleaved_chunk)

    def admit(self, count):
        """(rows, target cache, first tokens) for up to `count` requests ready to join, or None.

        A long prompt is prefilled one chunk per call while the others decode (it holds one of
        the `count` places meanwhile): short requests that come after it join at once, so
        they do not wait for its whole prefill, and it joins alone when its prefill ends.
        """
        if self.pending is not None:
            request, prefill = self.pending
            try:
                if self.queue.leaving([request.index]):  # cancelled: its prefill stops here
                    self.pending = None
                    prefill.close()
                else:
                    next(prefill)
                    count -= 1
            except StopIteration as done:
                self.pending = None
                return self.rows_of([request], *done.value)
        taken = self.queue.take(count) if count > 0 else []
        requests, long = [r for r in taken if not self.long(r)], [r for r in taken if self.long(r)]
        if long and self.pending is None:
            first = long.pop(0)
            self.pending = (first, self.target.prefill([first.ids], self.interleaved_chunk))
        self.queue.put_back(long)  # one long prompt at a time
        if not requests:
            return None
        return self.rows_of(requests, *self.target.start([r.ids for r in requests]))

    def rows_of(self, requests, cache, firsts):
        """(rows, target cache, first tokens) of requests whose prefill just ended."""
        now = time.perf_counter()
        # Stats accumulate across calls: time counts on from what they hold.
        rows = [Row(r, first, now - r.stats.seconds, row_key(r.seed)) for r, first in zip(requests, firsts)]
        return rows, cache, firsts

    def plan(self, finished, wait=False):
        """What refill would do now: (slots leaving, their cancelled indices, newcomers or None).

        Newcomers are taken from the queue here, so the plan is what happens; with `wait`
        they are left waiting unless rows leave anyway.
        """
        cancelled = set(self.queue.leaving([row.index for row in self.rows]))
        leaving = sorted(set(finished) | {slot for slot, row in enumerate(self.rows) if row.index in cancelled})
        if wait and not leaving:
            return leaving, cancelled, None
        return leaving, cancelled, self.admit(self.size - len(self.rows) + len(leaving))

    def joining(self):
        """Whether waiting requests would join before the next step (the batch has room for them),
        or a long prompt's prefill goes on between steps."""
        return (self.pending is not None or len(self.queue) > 0) and len(self.rows) < self.size

    def refill(self, finished, plan=None):
        """Let finished and cancelled rows (slots) go; fill free places with waiting requests.

        Returns the indices of the cancelled rows that left.
        """
        leaving, cancelled, newcomers = plan or self.plan(finished)
        if newcomers is None:
            self.keep([slot for slot in range(len(self.rows)) if slot not in leaving])
            return cancelled
        rows, fresh, firsts = newcomers
        prompts = [row.request.ids for row in rows]
        if not self.rows or len(leaving) == len(self.rows) and len(rows) >= len(leaving):
            self.rows, self.cache = rows, fresh
            if self.drafter is not None:
                self.drafter.start(prompts, firsts)
            return cancelled
        if len(rows) > len(leaving):
            # More newcomers than free slots: grow by copies of row 0, replaced below.
            grown = len(self.rows)
            self.keep(list(range(grown)) + [0] * (len(rows) - len(leaving)))
            leaving = leaving + list(range(grown, len(self.rows)))
        slots = leaving[: len(rows)]
        for slot, row in zip(slots, rows):
            self.rows[slot] = row
        self.cache.replace_rows(slots, fresh)
        if self.drafter is not None:
            self.drafter.replace_rows(slots, prompts, firsts)
        self.keep([slot for slot in range(len(self.rows)) if slot not in leaving[len(rows):]])
        return cancelled

    def keep(self, slots):
        """Keep the rows in `slots`, in that order (a slot may repeat); no change if that is all of them."""
        if slots == list(range(len(self.rows))):
            return
        self.rows = [self.rows[slot] for slot in slots]
        if slots:
            self.cache.keep_rows(slots)
            if self.drafter is not None:
                self.drafter.keep_rows(slots)

    def limits(self, policy, remaining):
        """Each row's limit on drafts it may accept: its request's num_draft (else the policy's), and
        one less than the tokens it has `remaining` (the target adds one)."""
        return [min(policy.num_draft if row.request.num_draft is None else row.request.num_draft, left - 1)
                for row, left in zip(self.rows, remaining)]

    def penalised(self):
        """Whether a row has a presence or frequency penalty (its next step depends on this one's tokens)."""
        return any(row.request.sampling.presence_penalty or row.request.sampling.frequency_penalty
                   for row in self.rows)

    def logprobs(self):
        """The most likely tokens' count the rows ask log-probabilities of (None: no row asks)."""
        wanted = [row.request.logprobs for row in self.rows if row.request.logprobs is not None]
        return max(wanted) if wanted else None

    def deltas(self):
        """The rows' delta: one number when they share it, else a list."""
        deltas = [row.request.delta for row in self.rows]
        return deltas[0] if len(set(deltas)) == 1 else deltas

    def sampling(self):
        """(the drafter's, the verifier's) Sampling of this step, per row, with fresh random keys where rows have them."""
        settings = Sampling.of_rows([row.request.sampling for row in self.rows],
                                    outputs=[row.output for row in self.rows], vocab=self.target.vocab_size)
        if all(row.key is None for row in self.rows) or settings.greedy:
            return settings, settings
        for row in self.rows:
            if row.key is None:  # an unseeded row beside seeded ones: a key from the global generator
                row.key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        keys = split_rows(mx.stack([row.key for row in self.rows]), 3)
        for row, next_key in zip(self.rows, keys[:, 0]):
            row.key = next_key
        draft, verify_ = (replace(settings, keys=keys[:, i]) for i in (1, 2))
        return draft, verify_


def row_key(seed):
    """A row's own random key, or None for the global generator."""
    return None if seed is None else mx.random.key(seed)


def speculative_steps(
    target, drafter, prompts, max_tokens, policy, delta=0.0, sampling=Sampling(), batch_size=1, stats=None
):
    """Decode many prompts, `batch_size` at a time, each at its own pace: yield a Step per row per step.

    prompts: lists of token ids, all decoded with max_tokens, delta and sampling; or a
    RequestQueue of Requests, each with its own settings, that may grow while this runs
    (the generator ends when no row is left and none waits).

    Each step the policy picks k, the drafter proposes k tokens for every row, the target
    scores them in one call, and every row keeps its own accepted prefix plus one target
    token; the host reads the verdict once. After a step the target's cache holds, for
    each row, exactly its emitted tokens except the newest, which is the next step's
    input. A finished or cancelled row leaves; waiting prompts join before the next step.
    With drafter None this is plain decoding.
    """
    queue = prompts
    if not isinstance(prompts, RequestQueue):
        stats = stats if stats is not None else [Stats() for _ in prompts]
        queue = RequestQueue(Request(ids, max_tokens, sampling, delta, stats=s) for ids, s in zip(prompts, stats))
    batch = Batch(target, drafter, queue, batch_size)
    # A drafter that proposes from the text so far (prompt lookup) makes the next step wait for this one's read.
    pipelined = drafter is None or not getattr(drafter, "reads_the_text", True)
    queued = None  # (k, its launched pass or None): the step after a plain one, chosen before that one's read
    chain = PlainChain(policy if drafter is not None else None)
    while batch.rows or batch.pending:
        if not batch.rows:  # only a long prompt's prefill: its next chunk (and whoever comes meanwhile)
            batch.refill([])
            continue
        began = time.perf_counter()
        rows = batch.rows
        remaining = [row.request.max_tokens - row.generated for row in rows]
        limits, deltas, logprobs = batch.limits(policy, remaining), batch.deltas(), batch.logprobs()
        k, launched = queued or (choose_k(drafter, policy, rows, limits), None)
        newest = [row.newest for row in rows]
        drafting = time.perf_counter()
        if launched is None:
            draft_sampling, verify_sampling = batch.sampling()
            launched = draft_and_verify(target, drafter, batch.cache, newest, k, deltas, draft_sampling,
                                        verify_sampling, limits, logprobs)
        table, drafted, scores = launched
        queued = keys_before = None
        if (k == 0 and pipelined and min(remaining) > 1 and not batch.joining() and not chain.full(len(rows))
                and not batch.penalised()):
            # As plain decoding does: a plain step waits on no draft, so the next step is chosen now
            # and, if plain too, queued before this one is read, and the device never idles.
            upcoming = choose_k(drafter, policy, rows, batch.limits(policy, [left - 1 for left in remaining]))
            queued = (upcoming, None)
            if upcoming == 0:
                keys_before = [row.key for row in rows]
                _, verify_sampling = batch.sampling()
                queued = (0, draft_and_verify(target, drafter, batch.cache, table[:, -1], 0, deltas, verify_sampling,
                                              logprobs=logprobs))
                mx.async_eval(queued[1][0], queued[1][2])
        mx.eval(table, scores)  # one host read: the verdicts and, if asked, their log-probabilities
        table, scores = table.tolist(), scores and [part.tolist() for part in scores]
        verified = time.perf_counter()
        accepted = [row[0] for row in table]
        proposed = [row[1 : k + 1] for row in table]
        verdicts = [row[k + 1] for row in table]
        batch.cache.trim([k - count for count in accepted])
        if drafter is not None:
            drafter.settle(newest, k, accepted, proposed, verdicts)
        records = [settle_row(row, entry, k, useful, left, target.eos_token_ids,
                              scores and [part[slot] for part in scores])
                   for slot, (row, entry, useful, left) in enumerate(zip(rows, table, drafted, remaining))]
        seconds = time.perf_counter() - began
        host = seconds - (verified - drafting)
        chain.add(([row.index for row in rows], k, [r.drafted for r in records], [r.accepted for r in records],
                   seconds), ends=queued is None or queued[1] is None)
        finished = []
        for slot, (row, record) in enumerate(zip(rows, records)):
            record.seconds, record.host_seconds = seconds, host
            row.stats.seconds = time.perf_counter() - row.began
            if record.finished:
                finished.append(slot)
                policy.forget(row.index)
            yield record
        # A queued pass is undone if the rows change: a newcomer that came after it was queued waits
        # one step (none is queued while newcomers wait), unless rows leave anyway.
        plan = batch.plan(finished, wait=queued is not None and queued[1] is not None)
        if queued is not None and (plan[0] or plan[2] is not None):
            if queued[1] is not None:
                batch.cache.trim(1)  # the queued plain pass fed rows that are leaving or gaining company: undo it
                for row, key in zip(rows, keys_before):
                    row.key = key  # and its draws: a row's random stream does not depend on its company
                chain.end()
            queued = None
        for index in batch.refill(finished, plan):
            policy.forget(index)


class PlainChain:
    """Tells the policy of each step, timing plain steps that ran queued one after another as a chain.

    A plain pass queued behind another shares the device with it while the host reads the
    first, and where the one the host reads ends is the backend's business (MLX's CPU
    backend makes queueing wait for nearly all of the pass before): one step may be timed
    at two passes and the next at none. Their sum is right, so each step of a chain is
    told the chain's mean. At each batch size the first plain step is a chain of its own (it pays
    one-off allocations, which the policy leaves out), and the chains after it may run 2, 4, 8,
    then at most `longest` steps (the last one not queued behind): the policy soon learns what a
    plain step costs, and keeps learning while it chooses them.
    """

    longest = 16

    def __init__(self, policy):
        self.policy, self.steps, self.chains = policy, [], {}  # batch size -> chains told

    def add(self, observation, ends):
        """One step's (rows, k, drafted, accepted, seconds); `ends`: no plain pass was queued behind it."""
        self.steps.append(observation)
        if ends:
            self.end()

    def full(self, batch):
        """Whether the coming step (of `batch` rows) ends the chain."""
        return len(self.steps) + 1 >= min(self.longest, 2 ** self.chains.get(batch, 0))

    def end(self):
        if self.policy is not None and self.steps:
            mean = sum(step[-1] for step in self.steps) / len(self.steps)
            for *step, _ in self.steps:
                self.policy.observe(*step, mean)
        if self.steps and self.steps[0][1] == 0:  # a chain of plain steps (a drafting step is one alone)
            batch = len(self.steps[0][0])
            self.chains[batch] = self.chains.get(batch, 0) + 1
        self.steps = []


def choose_k(drafter, policy, rows, limits):
    """The policy's k for the coming step of `rows`, within their limits on drafts (0 without a drafter)."""
    if drafter is None:
        return 0
    cap = drafter.available(min(policy.num_draft, max(limits)))
    return policy.choose([row.index for row in rows], cap)


def draft_and_verify(target, drafter, cache, newest, k, delta, sampling, verify_sampling=None, limits=None,
                     logprobs=None):
    """Draft k tokens per row, score them with the target, verify: one host read.

    newest: each row's input token, a list or an array on the device; delta: one value or
    one per row; sampling is the drafter's, verify_sampling the verifier's (default: the
    same); limits (per row, default k) cap how many drafts a row may accept, and a row
    stopped by its limit takes its next token from the target's own distribution. Returns
    (a table on the device, per row [accepted count, draft 1 .. draft k, target token];
    the drafts each row could accept, its useful drafts; None, or with `logprobs` n the
    target's log-probabilities (see emitted_logprobs)).
    """
    drafts = mx.zeros((len(newest), 0), mx.int32)
    q = None
    useful = [0] * len(newest)
    if k > 0:
        drafts, q, real = drafter.propose(newest, k, sampling)
        useful = [min(r, limit) for r, limit in zip(real or [k] * len(newest), limits or [k] * len(newest))]
    inputs = newest if isinstance(newest, mx.array) else mx.array(newest, mx.int32)
    logits = target.decode(mx.concatenate([inputs[:, None], drafts], axis=1), cache)
    limit = None if all(count == k for count in useful) else useful
    counts, tokens = verify(logits, drafts, q, limit, delta, verify_sampling or sampling)
    table = mx.concatenate([counts[:, None], drafts, tokens[:, None]], axis=1).astype(mx.int32)
    scores = None if logprobs is None else emitted_logprobs(logits, drafts, counts, tokens, logprobs)
    # The drafter said on the host how many drafts are real: no need to send that through the device.
    return table, useful, scores


def emitted_logprobs(logits, drafts, counts, tokens, top):
    """The target's log-probabilities (log-softmax of its logits, before temperature or any cut) at
    each position a row may emit: (of the token emitted there (batch, k + 1), the `top` most likely
    tokens (batch, k + 1, top), their log-probabilities (batch, k + 1, top)). Position i emits
    draft i while i < count, and the target's token at count; positions past it are not emitted."""
    scores = logits.astype(mx.float32)
    scores = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
    positions = mx.arange(drafts.shape[1] + 1)[None]
    padded = mx.concatenate([drafts, tokens[:, None]], axis=1)
    emitted = mx.where(positions < counts[:, None], padded, tokens[:, None])
    chosen = mx.take_along_axis(scores, emitted[..., None], axis=-1)[..., 0]
    if top == 0:
        empty = mx.zeros((*chosen.shape, 0))
        return chosen, empty.astype(mx.int32), empty
    best = mx.argpartition(-scores, top - 1, axis=-1)[..., :top]
    return chosen, best.astype(mx.int32), mx.take_along_axis(scores, best, axis=-1)


def settle_row(row, entry, k, drafted, left, eos, scores=None):
    """Count one row's step in its stats and say what it emits: its Step record.

    eos: the ids that end a row. Counts come from what is emitted: drafts after an accepted
    EOS were judged for nothing (the row ends there), so they count neither as drafted nor
    as accepted. scores: this row's part of emitted_logprobs, as lists (None: not asked).
    """
    count, *proposed = entry
    emitted = proposed[:count] + proposed[k : k + 1]  # proposed[k]: the target's token after the prefix
    tokens = []
    for value in emitted[:left]:
        tokens.append(value)
        if value in eos:
            break
    accepted = min(count, drafted)
    if len(tokens) <= accepted:  # the row ended inside the accepted drafts
        accepted = drafted = len(tokens)
    row.stats.target_calls += 1
    row.stats.draft_calls += drafted
    row.stats.drafted += drafted
    row.stats.accepted += accepted
    row.stats.generated += len(tokens)
    row.generated += len(tokens)
    row.output += tokens
    row.newest = tokens[-1]
    finished = len(tokens) >= left or tokens[-1] in eos
    logprobs = None
    if scores is not None and row.request.logprobs is not None:
        chosen, best, best_scores = scores
        logprobs = [(token, chosen[i], sorted(zip(best[i], best_scores[i]), key=lambda pair: -pair[1])
                     [: row.request.logprobs]) for i, token in enumerate(tokens)]
    return Step(row.index, tokens, k, drafted, accepted, finished, 0.0, 0.0, logprobs)


def as_drafter(draft):
    """A Drafter: `draft` itself, or a ModelDrafter around a draft model, or None."""
    if draft is None or hasattr(draft, "propose"):
        return draft
    return ModelDrafter(draft)


def speculative_batch(
    target, draft, prompts, max_tokens, num_draft=5, delta=0.0, sampling=Sampling(), batch_size=1, stats=None,
    schedule="adaptive",
):
    """Decode many prompts at once: yield (prompt index, token) as tokens are decided.

    draft is a draft model, a Drafter, or None (plain decoding); schedule 'adaptive'
    (num_draft is the cap) or 'constant', or a StepPolicy.
    """
    policy = schedule if hasattr(schedule, "choose") else make_policy(schedule, num_draft)
    for step in speculative_steps(target, as_drafter(draft), prompts, max_tokens, policy, delta, sampling,
                                  batch_size, stats):
        for token in step.tokens:
            yield step.index, token


def speculative_generate(
    target, draft, prompt_ids, max_tokens, num_draft=5, delta=0.0, sampling=Sampling(), stats=None,
    schedule="adaptive",
):
    """Speculative decoding of one prompt: yield the target's tokens, several per target call."""
    stats = stats if stats is not None else Stats()
    for _, token in speculative_batch(target, draft, [prompt_ids], max_tokens, num_draft, delta, sampling, 1,
                                      [stats], schedule):
        yield token
