"""What the decoder-only families (GPT-2, Llama) share: the causal mask and prefill.

Rows of a batch accept different numbers of drafts, so each row has its own positions
(models/cache.py tracks them per slot). Positions, not slot indices, drive everything
here: a key is visible to a query iff its position is not later than the query's, and
hidden or filler slots sit at HIDDEN_POSITION, in the future of every real query.
"""

import math
from dataclasses import dataclass, fields
from functools import partial

import mlx.core as mx
import numpy as np

from .cache import Cache


class BaseModelArgs:
    """A family's config: the fields of config.json its dataclass names, the rest ignored."""

    @classmethod
    def from_config(cls, config):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


@partial(mx.compile, shapeless=True)
def gelu_tanh(x):
    """GELU's tanh approximation (Hugging Face's gelu_new)."""
    # x * x * x, not x**3: MLX's CPU kernels compute a power through the scalar powf,
    # which made this activation a third slower.
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def causal_mask(query_positions, key_positions, dtype):
    """Additive mask (batch, 1, queries, keys): 0 where key position <= query position, else -inf."""
    visible = key_positions[:, None, :] <= query_positions[:, :, None]
    return mx.where(visible, 0.0, -mx.inf).astype(dtype)[:, None]


@dataclass(frozen=True)
class Part:
    """The layers one pipeline rank holds: units [start, stop) of a family's stack of `total`.

    A family's stack is its layer lists in the order a pass runs them (T5: the encoder's
    layers, then the decoder's). The first part also holds the token embedding, the last
    the final norm and the head; Part(0, total, total) is the whole model.
    """

    start: int
    stop: int
    total: int

    @property
    def first(self):
        return self.start == 0

    @property
    def last(self):
        return self.stop == self.total

    def held(self, begin, end):
        """(lo, hi): of the stack's units begin..end-1 (one layer list), those this part holds, counted from begin."""
        lo, hi = max(self.start, begin), min(self.stop, end)
        return (lo - begin, hi - begin) if lo < hi else (0, 0)


def whole(total):
    """The Part that is the whole model."""
    return Part(0, total, total)


def as_list(ids):
    """A config's token id or ids (one int, a list, or None) as a list."""
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


class TokenIds:
    """vocab_size and the EOS ids, which decoder.LanguageModel asks for, read from the model's `args`.

    args.eos_token_id is one id or a list of them (Llama 3 Instruct names three: the end of
    the text and the ends of a turn); every one ends a row.
    """

    @property
    def vocab_size(self):
        return self.args.vocab_size

    @property
    def eos_token_ids(self):
        return frozenset(as_list(self.args.eos_token_id))

    @property
    def eos_token_id(self):
        return next(iter(as_list(self.args.eos_token_id)), None)


class CausalModel(TokenIds):
    """The decoding interface (decoder.LanguageModel) of a decoder-only model.

    A subclass defines `args` (with vocab_size, eos_token_id, bos_token_id, num_layers),
    `part` (the Part of its layers it holds) and `decode(tokens, cache, padding)`. A part
    that is not the first takes the previous part's activations (batch, n, d) for tokens,
    and one that is not the last returns its activations instead of logits.
    """

    # Positions the prompt and the output share (None: no limit); a family with a table sets it.
    max_positions = None
    max_source_positions = None  # no separate limit on the prompt: it counts towards max_positions
    # Prompt tokens prefilled per pass: the attention scores of one chunk, (batch, heads, chunk, prompt),
    # bound the prefill's memory, as mlx-lm's prefill step does.
    prefill_chunk = 512

    def stack(self):
        """[(name, count)]: the layer lists a pass runs, in order (a pipeline splits them)."""
        return [(self.layer_list, self.args.num_layers)]

    def __call__(self, input_ids, padding=None):
        """Logits (batch, length, vocab) of a full forward from an empty cache; padding as in decode."""
        return self.decode(input_ids, self.new_cache(input_ids.shape[0]), padding)

    def new_cache(self, batch):
        """An empty cache for the layers this part holds."""
        return Cache(batch, len(getattr(self, self.layer_list)))

    def start(self, prompts):
        """(cache, first input tokens): all but each prompt's last token prefilled, left-padded.

        An empty prompt starts from the BOS token, as Hugging Face's generate does.
        """
        return finish(self.prefill(prompts))

    def prefill(self, prompts, chunk=None):
        """start() as a generator: it prefills `chunk` columns (at most `prefill_chunk`) per next()
        and returns start()'s (cache, first input tokens), so a step loop can run other rows'
        steps between chunks."""
        cache, firsts, _ = yield from self.prefill_part(prompts, chunk=chunk)
        return cache, firsts

    def start_part(self, prompts, x=None):
        """start() for this part: (cache, first input tokens, activations for the next part or None).

        x: the previous part's activations of the prefill (batch, width, d) (None for the
        first part, or when no prompt has more than one token).
        """
        return finish(self.prefill_part(prompts, x))

    def prefill_part(self, prompts, x=None, chunk=None):
        """start_part() as a generator of its chunks. The prefill runs `prefill_chunk` columns
        at a time, the cache evaluated after each, so peak memory is bounded by one chunk
        whatever the prompt's length."""
        prompts = [list(ids) or self.bos_prompt() for ids in prompts]
        cache = self.new_cache(len(prompts))
        prefixes = [ids[:-1] for ids in prompts]
        width = max(len(ids) for ids in prefixes)
        padding = np.array([width - len(ids) for ids in prefixes])
        if self.part.first:
            x = mx.array([[0] * (width - len(ids)) + ids for ids in prefixes]) if width else None
        cache.grow(width)  # one allocation for the whole prompt, not one copy per chunk
        outs = []
        chunk = min(chunk or self.prefill_chunk, self.prefill_chunk)
        for lo in range(0, width, chunk):
            hi = min(lo + chunk, width)
            # Filler leads each row, so within a chunk it leads too: this chunk's share of it.
            out = self.decode(x[:, lo:hi], cache, np.clip(padding - lo, 0, hi - lo))
            if not self.part.last:
                outs.append(out)
            # Only the keys/values matter to the last part: evaluating them drops the chunk's graph.
            mx.eval([k for k in cache.keys if k is not None], [v for v in cache.values if v is not None], outs)
            yield hi
        return cache, [ids[-1] for ids in prompts], mx.concatenate(outs, axis=1) if outs else None

    def bos_prompt(self):
        if self.args.bos_token_id is None:
            raise ValueError("an empty prompt needs a BOS token, and this model has none")
        return [self.args.bos_token_id]


def finish(generator):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as done:
            return done.value


def output_config(config, tied):
    """The config.json convert.py writes: the source's, with whether the head is tied."""
    return dict(config, tie_word_embeddings=tied)
