"""Plain and speculative decoding for encoder-decoder models, as token generators.

The decoder talks to a model only through `encode(input_ids)`, `make_cache(memory)`,
`decode(tokens, cache)` (logits for new tokens; the cache advances past them),
`cache.trim(count)`, and the `decoder_start_token_id` / `eos_token_id` attributes.

Speculative decoding (Leviathan et al. 2023): each step the draft proposes up to
`num_draft` tokens, the target scores them all in one decode call, the longest accepted
prefix is kept and the target adds one token of its own. The host reads the result
once per step; the draft loop itself never waits on the device.
"""

import time
from dataclasses import asdict, dataclass

import mlx.core as mx

GREEDY_TEMPERATURE = 1e-6


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


def sample(probs):
    """One token index per row of `probs`."""
    return mx.random.categorical(mx.log(probs))


def choose(logits, sampling: Sampling):
    """The next token for each row of logits (..., vocab)."""
    if sampling.greedy:
        return mx.argmax(logits, axis=-1)
    return sample(distribution(logits, sampling))


def leading_true(flags):
    """How many entries at the start of a 1-D boolean array are True."""
    return mx.cumprod(flags.astype(mx.int32)).sum()


def greedy_accept(target_logits, drafts, delta):
    """Verify greedy drafts: (accepted count, target token after the accepted prefix).

    target_logits (k + 1, vocab) score the positions of drafts (k,) and one beyond. A
    draft is accepted when it is the target's argmax, or when delta > 0 and its
    probability is at least (1 - delta) times the target's largest.
    """
    best = mx.argmax(target_logits, axis=-1)
    accept = drafts == best[:-1]
    if delta > 0:
        probs = mx.softmax(target_logits[:-1].astype(mx.float32), axis=-1)
        drafted = mx.take_along_axis(probs, drafts[:, None], axis=-1)[:, 0]
        accept = accept | (drafted >= (1 - delta) * probs.max(axis=-1))
    count = leading_true(accept)
    return count, best[count]


def sampled_accept(p, q, drafts, delta):
    """Verify sampled drafts: (accepted count, target token after the accepted prefix).

    p (k + 1, vocab) is the target's distribution at each draft position and one beyond,
    q (k, vocab) the draft's. Draft x is accepted with probability min(1, p(x)/q(x) +
    delta); at the first rejection the token comes from norm(max(0, p - q)), and when
    all pass from p at the last position. At delta 0 the result is distributed as p.
    """
    k = drafts.shape[0]
    p_draft = mx.take_along_axis(p[:k], drafts[:, None], axis=-1)[:, 0]
    q_draft = mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    accept = mx.random.uniform(shape=(k,)) < mx.minimum(1.0, p_draft / q_draft + delta)
    count = leading_true(accept)
    residual = mx.maximum(p - mx.concatenate([q, mx.zeros_like(p[:1])]), 0.0)[count]
    # A residual of zero mass (p == q) is never reached by a rejection; guard anyway.
    residual = mx.where(residual.sum() > 0, residual, p[count])
    return count, sample(residual / residual.sum())


def start(model, prompt_ids):
    """Encode one prompt (a list of token ids) and return its fresh decoder cache."""
    return model.make_cache(model.encode(mx.array(prompt_ids)[None]))


def generate(model, prompt_ids, max_tokens, sampling=Sampling(), stats=None):
    """Plain decoding: yield the model's tokens one by one until EOS or max_tokens."""
    stats = stats if stats is not None else Stats()
    began = time.perf_counter()
    cache = start(model, prompt_ids)

    def step(token):
        stats.target_calls += 1
        return choose(model.decode(token.reshape(1, 1), cache)[0, -1], sampling)

    token = step(mx.array(model.decoder_start_token_id))
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


def draft_tokens(draft, cache, inputs, count, sampling):
    """Let the draft propose `count` tokens after `inputs`; return (tokens, q or None).

    Nothing here waits on the device: each proposal feeds the next as a lazy array.
    """
    tokens, dists = [], []
    for _ in range(count):
        logits = draft.decode(inputs[None], cache)[0, -1]
        if sampling.greedy:
            token = mx.argmax(logits, axis=-1)
        else:
            dists.append(distribution(logits, sampling))
            token = sample(dists[-1])
        token = token.astype(mx.int32)
        mx.async_eval(token)
        tokens.append(token)
        inputs = token.reshape(1)
    return mx.stack(tokens), (mx.stack(dists) if dists else None)


def speculative_generate(
    target, draft, prompt_ids, max_tokens, num_draft=5, delta=0.0, sampling=Sampling(), stats=None
):
    """Speculative decoding: yield the target's tokens, several per target call.

    After every step both caches hold exactly the emitted tokens except the newest,
    which is the next step's input. When every draft was accepted the draft has not
    seen its own last proposal, so it is fed that one too.
    """
    stats = stats if stats is not None else Stats()
    began = time.perf_counter()
    target_cache, draft_cache = start(target, prompt_ids), start(draft, prompt_ids)
    newest = [target.decoder_start_token_id]
    unseen_by_draft = []
    while stats.generated < max_tokens:
        # A step emits at most k + 1 tokens: draft no more than the budget can use.
        k = min(num_draft, max_tokens - stats.generated - 1)
        target_inputs = mx.array(newest)
        if k > 0:
            drafts, q = draft_tokens(draft, draft_cache, mx.array(unseen_by_draft + newest), k, sampling)
            target_inputs = mx.concatenate([target_inputs, drafts])
        else:
            drafts, q = mx.zeros((0,), mx.int32), None
        logits = target.decode(target_inputs[None], target_cache)[0]
        if sampling.greedy:
            count, token = greedy_accept(logits, drafts, delta)
        else:
            q = q if q is not None else mx.zeros((0, logits.shape[-1]))
            count, token = sampled_accept(distribution(logits, sampling), q, drafts, delta)
        accepted, *proposed = mx.concatenate([count[None], drafts, token[None]]).astype(mx.int32).tolist()
        emitted = proposed[:accepted] + proposed[-1:]

        stats.target_calls += 1
        stats.draft_calls += k
        stats.drafted += k
        stats.accepted += accepted
        target_cache.trim(k - accepted)
        if accepted == k:
            unseen_by_draft = proposed[k - 1 : k]
        else:
            draft_cache.trim(k - 1 - accepted)
            unseen_by_draft = []
        newest = emitted[-1:]

        for value in emitted[: max_tokens - stats.generated]:
            stats.generated += 1
            stats.seconds = time.perf_counter() - began
            yield value
            if value == target.eos_token_id:
                return
