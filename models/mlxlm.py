"""mlx-lm's own model classes (every architecture mlx-lm has whose cache can be rolled back),
behind the project's decoding interface, so an mlx-lm / mlx-community folder loads as it is.

mlx-lm's attention asks a cache object per layer for three things: `offset` (where RoPE
starts), `update_and_fetch(keys, values)` (store the new keys/values, return all), and
`make_mask(n, ...)` (which keys each query sees). `LayerCache` answers them from the
project's per-row slot cache (models/cache.py): `offset` is an array, one start per row,
as mlx-lm's own batched cache gives it (mx.fast.rope takes one offset per row), and the
mask is built from the slots' logical positions, so rows at different lengths, hidden
slots and trims are what the other families see. A sliding window (mlx-lm's
RotatingKVCache) becomes a window in that mask over the full cache: the keys it sees are
those the rotating buffer would hold, and the cache still rolls back.
"""

import importlib
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .base import CausalModel, whole


def architecture(model_type):
    """The mlx_lm.models module of `model_type` (mlx-lm's own remapping applied); None if mlx-lm has none."""
    from mlx_lm.utils import MODEL_REMAPPING  # here, not above: importing mlx_lm imports transformers

    name = MODEL_REMAPPING.get(model_type, model_type)
    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        return None


def named_by_mlx_lm(names):
    """Whether tensor names are mlx-lm's (its models keep the transformer under `model.`);
    convert.py's Llama and GPT-2 names have no such prefix."""
    return any(name.startswith("model.") for name in names)


@dataclass
class ModelArgs:
    """config.json as mlx-lm reads it, and what decoding asks of it."""

    config: dict

    @classmethod
    def from_config(cls, config):
        return cls(dict(config))

    @property
    def model_type(self):
        return self.config["model_type"]

    @property
    def vocab_size(self):
        return self.config.get("vocab_size") or self.config.get("text_config", {}).get("vocab_size")

    @property
    def eos_token_id(self):
        return self.config.get("eos_token_id")  # one id or a list (Llama 3 Instruct names three): each ends a row

    @property
    def bos_token_id(self):
        return self.config.get("bos_token_id")


class Unsupported(ValueError):
    """An architecture mlx-lm has whose cache cannot be rolled back per row."""


def windows(inner, model_type):
    """Per layer: None (full attention) or its sliding window; ValueError for a cache that cannot roll back."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    found = []
    for layer in (inner.make_cache() if hasattr(inner, "make_cache") else [KVCache() for _ in inner.layers]):
        if type(layer) is KVCache:
            found.append(None)
        elif type(layer) is RotatingKVCache and layer.keep == 0:
            found.append(layer.max_size)
        else:
            kind = type(layer).__name__
            reason = "recurrent state" if kind in ("ArraysCache", "MambaCache") else "state"
            raise Unsupported(f"model_type '{model_type}' keeps {reason} ({kind}) that cannot be rolled back per row; "
                             f"speculative decoding needs key/value caches")
    return found


class LayerCache:
    """One layer's view of the slot cache during one decode call, as mlx-lm's attention calls it."""

    def __init__(self, step, index, window):
        self.step, self.index, self.window = step, index, window

    @property
    def offset(self):
        """(batch,) int32: each row's position of the first new token (RoPE's offset)."""
        return self.step.offsets

    def update_and_fetch(self, keys, values):
        """Store new keys/values (batch, heads, n, dim) in the claimed slots; return every slot in use."""
        return self.step.cache.store(self.index, keys, values)

    def make_mask(self, n, return_array=False, window_size=None):
        """Boolean (batch, 1, n, keys): a key is visible iff its position is not later than the
        query's, and (sliding window) less than `window` earlier."""
        return self.step.mask(window_size or self.window)


class Step:
    """The positions of one decode call's new tokens, shared by its layers (and their masks)."""

    def __init__(self, cache, queries, keys, offsets):
        self.cache, self.queries, self.keys, self.offsets = cache, queries, keys, offsets
        self.masks = {}

    def mask(self, window):
        if window not in self.masks:
            q, k = self.queries[:, None, :, None], self.keys[:, None, None, :]
            visible = k <= q
            if window is not None:
                visible = visible & (k > q - window)
            self.masks[window] = visible
        return self.masks[window]


class Model(nn.Module, CausalModel):
    """An mlx-lm model (`inner`, built from config.json by mlx-lm's own ModelArgs) with the decoding interface."""

    layer_list = "layers"

    def __init__(self, args: ModelArgs, part=None, inner=None):
        super().__init__()
        module = architecture(args.model_type)
        if module is None:
            raise ValueError(f"mlx-lm has no model_type '{args.model_type}'")
        self.inner = inner if inner is not None else module.Model(module.ModelArgs.from_dict(args.config))
        self.args = args
        self.part = whole(len(self.inner.layers))  # the whole model: --pipeline is refused (distributed.parts)
        self.windows = windows(self.inner, args.model_type)
        # A table of learned positions (GPT-2's) is a hard limit; RoPE's max_position_embeddings is not.
        self.max_positions = args.config.get("n_positions")

    width = None  # logits' width when widened (see widen); None: the model's own vocab_size

    @property
    def layers(self):
        return self.inner.layers

    @property
    def vocab_size(self):
        return self.width or self.args.vocab_size

    def widen(self, size):
        """Give logits `size` wide from now on, the ids past this model's own at -inf (probability 0),
        so it pairs with a model whose embeddings are padded wider over the same tokenizer (Qwen's)."""
        self.width = size

    def decode(self, tokens, cache, padding=None):
        """Logits (batch, n, vocab) for new tokens (batch, n); the cache advances past them."""
        n = tokens.shape[1]
        queries, keys = cache.reserve(n, padding)
        step = Step(cache, queries, keys, mx.array(cache.lengths - n, dtype=mx.int32))
        logits = self.inner(tokens, cache=[LayerCache(step, i, w) for i, w in enumerate(self.windows)])
        if self.width is not None and self.width > logits.shape[-1]:
            logits = mx.pad(logits, [(0, 0), (0, 0), (0, self.width - logits.shape[-1])], constant_values=-mx.inf)
        return logits


def cast(inner, dtype):
    """Floating parameters to `dtype`, one tensor at a time (no second copy of the model builds up)."""
    params = []
    for name, p in tree_flatten(inner.parameters()):
        if mx.issubdtype(p.dtype, mx.floating) and p.dtype != dtype:
            p = p.astype(dtype)
            mx.eval(p)
        params.append((name, p))
    inner.update(tree_unflatten(params))


def load(path, dtype=None, eos_token_ids=None):
    """The model in mlx-lm folder `path`, read by mlx-lm itself (its sanitize, its quantization:
    config.json's "quantization" with per-layer entries, or "quantization_config"), floats cast
    to `dtype` if given; `eos_token_ids` (a list) replaces config.json's (generation_config.json
    may name more). ValueError, KeyError, TypeError or OSError for a folder it cannot read."""
    from mlx_lm.utils import load_model

    inner, config = load_model(path, lazy=True)
    if dtype is not None:
        cast(inner, dtype)
    if eos_token_ids:
        config = dict(config, eos_token_id=list(eos_token_ids))
    model = Model(ModelArgs.from_config(config), inner=inner)
    mx.eval(model.parameters())
    return model
