"""What the decoder-only families (GPT-2, Llama) share: the causal mask and prefill.

Rows of a batch accept different numbers of drafts, so each row has its own positions
(models/cache.py tracks them per slot). Positions, not slot indices, drive everything
here: a key is visible to a query iff its position is not later than the query's, and
hidden or filler slots sit at HIDDEN_POSITION, in the future of every real query.
"""

import math
from dataclasses import fields
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


class TokenIds:
    """vocab_size and eos_token_id, which decoder.LanguageModel asks for, read from the model's `args`."""

    @property
    def vocab_size(self):
        return self.args.vocab_size

    @property
    def eos_token_id(self):
        return self.args.eos_token_id


class CausalModel(TokenIds):
    """The decoding interface (decoder.LanguageModel) of a decoder-only model.

    A subclass defines `args` (with vocab_size, eos_token_id, bos_token_id, num_layers)
    and `decode(tokens, cache, padding)`.
    """

    max_positions = None  # no limit unless the family has a table of positions

    def __call__(self, input_ids, padding=None):
        """Logits (batch, length, vocab) of a full forward from an empty cache; padding as in decode."""
        return self.decode(input_ids, Cache(input_ids.shape[0], self.args.num_layers), padding)

    def start(self, prompts):
        """(cache, first input tokens): all but each prompt's last token prefilled, left-padded.

        An empty prompt starts from the BOS token, as Hugging Face's generate does.
        """
        prompts = [list(ids) or self.bos_prompt() for ids in prompts]
        cache = Cache(len(prompts), self.args.num_layers)
        prefixes = [ids[:-1] for ids in prompts]
        width = max(len(ids) for ids in prefixes)
        if width:
            tokens = mx.array([[0] * (width - len(ids)) + ids for ids in prefixes])
            # Only the keys/values matter here: evaluating them drops the prefill's graph.
            self.decode(tokens, cache, np.array([width - len(ids) for ids in prefixes]))
            mx.eval([k for k in cache.keys if k is not None], [v for v in cache.values if v is not None])
        return cache, [ids[-1] for ids in prompts]

    def bos_prompt(self):
        if self.args.bos_token_id is None:
            raise ValueError("an empty prompt needs a BOS token, and this model has none")
        return [self.args.bos_token_id]


def output_config(config, tied):
    """The config.json convert.py writes: the source's, with whether the head is tied."""
    return dict(config, tie_word_embeddings=tied)
