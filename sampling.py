"""How a token is chosen from logits: greedy, or sampled after temperature, top-k and top-p."""

from dataclasses import dataclass

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
    """One token index per row of `probs` (the global generator when key is None)."""
    return mx.random.categorical(mx.log(probs), key=key)


def choose(logits, sampling: Sampling):
    """The next token for each row of logits (..., vocab)."""
    if sampling.greedy:
        return mx.argmax(logits, axis=-1)
    return sample(distribution(logits, sampling))
