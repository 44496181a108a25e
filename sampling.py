"""How a token is chosen from logits: greedy, or sampled after temperature, top-k, top-p and min-p,
from logits adjusted by a logit bias and presence and frequency penalties (OpenAI's).

Every setting is one value for all rows (the common case) or a list with one value per
row of a batch (a server mixes requests); `keys` gives rows their own random streams.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

GREEDY_TEMPERATURE = 1e-6


@dataclass
class Sampling:
    """How a token is chosen from logits; temperature <= 1e-6 means greedy.

    temperature, top_k and top_p: one value, or a list of one per row. keys: None (MLX's
    global generator) or per-row random keys (batch, 2) for the coming draws. logit_bias
    ({token id: added to its logit}), presence_penalty (taken from the logit of every token
    the output holds) and frequency_penalty (taken once per time it holds it) adjust the
    logits before anything else, as OpenAI's do; a batch's Sampling (`of_rows`) holds them as
    arrays, with `counts`, each row's output tokens so far.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    keys: object = None
    logit_bias: dict = None  # a batch's: (batch, vocab) array, or None
    presence_penalty: float = 0.0  # a batch's: (batch, 1, 1) array where counts are set
    frequency_penalty: float = 0.0
    counts: object = None  # a batch's: (batch, vocab) times each token is in a row's output (penalties only)
    min_p: float = 0.0  # keep the tokens at least min_p times as likely as the most likely one (after top-p)

    @classmethod
    def of_rows(cls, settings, keys=None, outputs=None, vocab=None):
        """One Sampling for a batch whose rows have the Samplings `settings`; a setting all rows share
        stays one value. outputs: each row's tokens so far, and vocab the logits' width (both needed
        where a row has a logit bias or a penalty)."""

        def column(name):
            values = [getattr(s, name) for s in settings]
            return values[0] if all(v == values[0] for v in values) else values

        batch = cls(column("temperature"), column("top_k"), column("top_p"), keys, min_p=column("min_p"))
        if any(s.logit_bias for s in settings):
            bias = np.zeros((len(settings), vocab), np.float32)
            for row, s in enumerate(settings):
                for token, value in (s.logit_bias or {}).items():
                    bias[row, int(token)] = value
            batch.logit_bias = mx.array(bias)
        if any(s.presence_penalty or s.frequency_penalty for s in settings):
            batch.counts = mx.array(np.stack([np.bincount(np.asarray(out, np.int64), minlength=vocab)[:vocab]
                                              for out in outputs]).astype(np.float32))
            batch.presence_penalty = per_row([s.presence_penalty for s in settings], 3)
            batch.frequency_penalty = per_row([s.frequency_penalty for s in settings], 3)
        return batch

    def seen(self, tokens):
        """This Sampling after each row's output gained one token more (tokens (batch,)): for the next draft."""
        if self.counts is None:
            return self
        return replace(self, counts=self.counts + (tokens[:, None] == mx.arange(self.counts.shape[1])))

    @property
    def greedy_rows(self):
        """Whether each row is greedy: a bool for all rows, or a numpy array (batch,)."""
        if isinstance(self.temperature, list):
            return np.array(self.temperature) <= GREEDY_TEMPERATURE
        return self.temperature <= GREEDY_TEMPERATURE

    @property
    def greedy(self):
        """Every row is greedy."""
        return bool(np.all(self.greedy_rows))


def per_row(values, ndim, dtype=mx.float32):
    """A list of per-row values as an array (batch, 1, ...) that broadcasts against an ndim-dimensional one."""
    return mx.array(values, dtype=dtype).reshape(-1, *([1] * (ndim - 1)))


def adjusted(logits, sampling: Sampling, drafts=None):
    """Logits after the logit bias and the presence and frequency penalties (no change where none).

    logits (batch, vocab) after the output so far, or (batch, n, vocab) at n positions where
    position i follows the output and drafts[:, :i] (drafts (batch, n - 1)), as a verify pass
    scores them: each position is penalised for the drafts before it too, as it would be alone.
    """
    if sampling.logit_bias is None and sampling.counts is None:
        return logits
    flat = logits.ndim == 2
    out = logits.astype(mx.float32)[:, None] if flat else logits.astype(mx.float32)
    if sampling.logit_bias is not None:
        out = out + sampling.logit_bias[:, None]
    if sampling.counts is not None:
        counts = mx.broadcast_to(sampling.counts[:, None], out.shape)
        if drafts is not None and drafts.shape[1] > 0:
            hot = (drafts[..., None] == mx.arange(out.shape[-1])).astype(mx.float32)
            before = mx.concatenate([mx.zeros_like(hot[:, :1]), mx.cumsum(hot, axis=1)], axis=1)
            counts = counts + before[:, : out.shape[1]]
        out = out - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
    return out[:, 0] if flat else out


def distribution(logits, sampling: Sampling):
    """Probabilities after temperature, top-k, top-p and min-p (in that order, as transformers' warpers
    run), over the last axis (greedy rows: temperature 1)."""
    temperature, top_k, top_p = sampling.temperature, sampling.top_k, sampling.top_p
    if isinstance(temperature, list):
        temperature = per_row(np.where(sampling.greedy_rows, 1.0, temperature), logits.ndim)
    logits = logits.astype(mx.float32) / temperature
    vocab = logits.shape[-1]
    if isinstance(top_k, list):
        if any(0 < k < vocab for k in top_k):
            # Each row's k-th largest logit: index k - 1 of the sorted logits (all of them where k is 0).
            at = [k - 1 if 0 < k < vocab else vocab - 1 for k in top_k]
            descending = -mx.sort(-logits, axis=-1)
            index = mx.broadcast_to(per_row(at, logits.ndim, mx.int32), (*logits.shape[:-1], 1))
            kth_largest = mx.take_along_axis(descending, index, axis=-1)
            logits = mx.where(logits < kth_largest, -mx.inf, logits)
    elif 0 < top_k < vocab:
        kth_largest = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)
        logits = mx.where(logits < kth_largest, -mx.inf, logits)
    probs = mx.softmax(logits, axis=-1)
    cut = any(p < 1.0 for p in top_p) if isinstance(top_p, list) else top_p < 1.0
    if cut:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        mass = per_row(top_p, probs.ndim) if isinstance(top_p, list) else top_p
        descending = -mx.sort(-probs, axis=-1)
        mass_before = mx.cumsum(descending, axis=-1) - descending
        smallest_kept = mx.where(mass_before < mass, descending, mx.inf).min(axis=-1, keepdims=True)
        kept = mx.where(probs < smallest_kept, 0.0, probs)
        kept = kept / kept.sum(axis=-1, keepdims=True)
        # A row at top_p 1 keeps all of its distribution (rounding must not cut its tail).
        probs = mx.where(mass >= 1.0, probs, kept) if isinstance(top_p, list) else kept
    min_p = sampling.min_p
    if any(m > 0 for m in min_p) if isinstance(min_p, list) else min_p > 0:
        # min-p (Nguyen et al. 2024): drop tokens less likely than min_p times the most likely one.
        floor = (per_row(min_p, probs.ndim) if isinstance(min_p, list) else min_p) * probs.max(axis=-1, keepdims=True)
        probs = mx.where(probs < floor, 0.0, probs)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def split_rows(keys, num=2):
    """Each row's key split in `num`: (batch, num, 2) from (batch, 2); None stays None."""
    return None if keys is None else mx.vmap(lambda key: mx.random.split(key, num))(keys)


def position_keys(keys, count):
    """(batch, count, 2): a key per row and position from per-row keys (batch, 2), drawn as a chain.

    Position i's key is the same whatever `count` (> i) is, so a row's draws do not depend
    on how many drafts its batch asked for (MLX's split(key, n) changes every part with n).
    """
    parts, rest = [], keys
    for _ in range(count):
        both = split_rows(rest)
        parts.append(both[:, 0])
        rest = both[:, 1]
    return mx.stack(parts, axis=1) if parts else mx.zeros((keys.shape[0], 0, 2), keys.dtype)


def uniform(shape, keys=None):
    """Uniform [0, 1) draws of `shape` (batch, n): from the global generator or one key, or, with
    per-row keys (batch, 2), one draw per row and position from `position_keys`."""
    if keys is None or keys.ndim == 1:
        return mx.random.uniform(shape=shape, key=keys)
    if shape[1] == 0:  # nothing to draw (and MLX's vmap over zero positions dies with SIGFPE)
        return mx.zeros(shape)
    return mx.vmap(mx.vmap(lambda key: mx.random.uniform(key=key)))(position_keys(keys, shape[1]))


def sample(probs, key=None):
    """One token index per row of `probs`: from `key` (one, or one per row (batch, 2)), or the global generator."""
    if key is not None and key.ndim == 2:
        return mx.vmap(lambda logprobs, row_key: mx.random.categorical(logprobs, key=row_key))(mx.log(probs), key)
    return mx.random.categorical(mx.log(probs), key=key)


def choose(logits, sampling: Sampling):
    """The next token for each row of logits (..., vocab)."""
    if sampling.greedy:
        return mx.argmax(logits, axis=-1)
    chosen = sample(distribution(logits, sampling), sampling.keys)
    greedy = sampling.greedy_rows
    if np.any(greedy):
        chosen = mx.where(mx.array(greedy), mx.argmax(logits, axis=-1), chosen)
    return chosen
