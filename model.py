"""T5 encoder-decoder in MLX, with a decoder cache for incremental decoding.

`load()` reads a folder written by convert.py. The model exposes what a decoding loop
needs and nothing of drafting: `encode` runs the encoder once per prompt, `make_cache`
computes the cross-attention keys/values once, and `decode` runs the decoder over new
tokens only.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
import math
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

MODELS_DIR = Path("mlx_models")
# Logical position of a cache slot that must never be attended to: it lies in the
# future of every query, so the causal rule masks it.
HIDDEN_POSITION = 2**30


@partial(mx.compile, shapeless=True)
def gelu_tanh(x):
    """GELU's tanh approximation (Hugging Face's gelu_new)."""
    # x * x * x, not x**3: MLX's CPU kernels compute a power through the scalar powf,
    # which made this activation a third slower.
    return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_new": gelu_tanh, "silu": nn.silu}


class LoadError(Exception):
    """A model folder that is missing or unusable."""


@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    decoder_start_token_id: int = 0
    eos_token_id: int = 1

    @classmethod
    def from_config(cls, config):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers

    @property
    def activation(self):
        name = self.feed_forward_proj.split("-")[-1]
        # Hugging Face maps "gated-gelu" to the tanh approximation.
        return ACTIVATIONS["gelu_new" if self.feed_forward_proj == "gated-gelu" else name]

    @property
    def gated(self):
        return self.feed_forward_proj.startswith("gated-")


def bucket_table(num_buckets, max_distance):
    """Bucket of each distance 0..max_distance, computed as Hugging Face does in float32.

    Every distance past max_distance falls in the last bucket, so a lookup with the
    distance clipped to max_distance reproduces T5's log-spaced buckets exactly.
    """
    distance = np.arange(max_distance + 1)
    max_exact = num_buckets // 2
    # Distance 0 would take log(0); it is an exact bucket, so any positive stand-in works.
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact))
    large = max_exact + (
        log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return mx.array(np.where(distance < max_exact, distance, large).astype(np.int32))


class RelativePositionBias(nn.Module):
    """T5's learned bias per head for each bucketed (key - query) distance."""

    def __init__(self, args: ModelArgs, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.max_distance = args.relative_attention_max_distance
        buckets = args.relative_attention_num_buckets
        self.half = buckets // 2 if bidirectional else 0
        self._table = bucket_table(buckets // 2 if bidirectional else buckets, self.max_distance)
        self.weight = mx.zeros((buckets, args.num_heads))

    def __call__(self, query_positions, key_positions):
        """Bias (batch, heads, queries, keys) from positions (batch, queries) and (batch, keys)."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        if self.bidirectional:
            distance = mx.abs(relative)
            offset = mx.where(relative > 0, self.half, 0)
        else:
            distance = mx.maximum(-relative, 0)
            offset = 0
        bucket = self._table[mx.minimum(distance, self.max_distance)] + offset
        bias = self.weight[bucket].transpose(0, 3, 1, 2)
        if self.bidirectional:
            return bias
        return mx.where((relative > 0)[:, None], -mx.inf, bias)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        inner = args.num_heads * args.d_kv
        self.num_heads = args.num_heads
        self.q = nn.Linear(args.d_model, inner, bias=False)
        self.k = nn.Linear(args.d_model, inner, bias=False)
        self.v = nn.Linear(args.d_model, inner, bias=False)
        self.o = nn.Linear(inner, args.d_model, bias=False)

    def heads(self, x):
        B, L, _ = x.shape
        return x.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)

    def keys_values(self, x):
        return self.heads(self.k(x)), self.heads(self.v(x))

    def __call__(self, x, keys, values, mask):
        B, L, _ = x.shape
        # T5 folds the 1/sqrt(d) scale into its weights, hence scale 1.0.
        out = mx.fast.scaled_dot_product_attention(self.heads(self.q(x)), keys, values, scale=1.0, mask=mask)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gated = args.gated
        self.act = args.activation
        if self.gated:
            self.wi_0 = nn.Linear(args.d_model, args.d_ff, bias=False)
            self.wi_1 = nn.Linear(args.d_model, args.d_ff, bias=False)
        else:
            self.wi = nn.Linear(args.d_model, args.d_ff, bias=False)
        self.wo = nn.Linear(args.d_ff, args.d_model, bias=False)

    def __call__(self, x):
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class EncoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.self_attn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.ffn = FeedForward(args)
        self.ffn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def __call__(self, x, mask):
        h = self.self_attn_norm(x)
        x = x + self.self_attn(h, *self.self_attn.keys_values(h), mask)
        return x + self.ffn(self.ffn_norm(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.self_attn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.cross_attn = Attention(args)
        self.cross_attn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)
        self.ffn = FeedForward(args)
        self.ffn_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def __call__(self, x, mask, cache, index):
        h = self.self_attn_norm(x)
        keys, values = cache.store(index, *self.self_attn.keys_values(h))
        x = x + self.self_attn(h, keys, values, mask)
        h = self.cross_attn_norm(x)
        x = x + self.cross_attn(h, *cache.cross[index], cache.cross_mask)
        return x + self.ffn(self.ffn_norm(x))


def additive_mask(mask, dtype):
    """(batch, keys) 1/0 padding mask -> additive (batch, 1, 1, keys) of `dtype`, or None."""
    if mask is None:
        return None
    # Attention wants the mask in its own dtype (bfloat16 on a GPU).
    return mx.where(mask.astype(mx.bool_), 0.0, -mx.inf).astype(dtype)[:, None, None, :]


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.position_bias = RelativePositionBias(args, bidirectional=True)
        self.layers = [EncoderLayer(args) for _ in range(args.num_layers)]
        self.final_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def __call__(self, x, mask=None):
        positions = mx.arange(x.shape[1])[None]
        bias = self.position_bias(positions, positions)
        padding = additive_mask(mask, bias.dtype)
        if padding is not None:
            bias = bias + padding
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.position_bias = RelativePositionBias(args, bidirectional=False)
        self.layers = [DecoderLayer(args) for _ in range(args.num_decoder_layers)]
        self.final_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def __call__(self, x, cache, padding=None):
        query_positions, key_positions = cache.reserve(x.shape[1], padding)
        bias = self.position_bias(query_positions, key_positions)
        for index, layer in enumerate(self.layers):
            x = layer(x, bias, cache, index)
        return self.final_norm(x)


class Cache:
    """Decoder state for one batch of prompts.

    Self-attention keys/values live in buffers preallocated in steps of `step` slots;
    `offset` counts the slots in use and is shared by the batch. Each row keeps its own
    length (the number of tokens it has decoded) and the logical position of every slot,
    so rows can drop different numbers of tokens: the tail common to all rows is cut by
    moving `offset`, the rest is hidden by giving those slots HIDDEN_POSITION. Nothing is
    copied then; `compact` squeezes hidden slots out once they make up most of the cache.
    Cross-attention keys/values (and the encoder padding mask) are computed once per
    prompt, at construction or when `replace_rows` puts new prompts in.
    """

    step = 256
    # Hidden slots cost every later step attention time; compacting costs one copy of
    # the live ones. So compact once hidden slots outnumber live ones by this many.
    slack = 16

    def __init__(self, cross, mask=None):
        self.cross = cross
        self.batch, _, self.memory_length, _ = cross[0][0].shape
        self.cross_mask = additive_mask(mask, cross[0][0].dtype)
        self.keys = [None] * len(cross)
        self.values = [None] * len(cross)
        self.positions = mx.full((self.batch, 0), HIDDEN_POSITION, dtype=mx.int32)
        self.offset = 0
        self.write_at = 0
        self.lengths = np.zeros(self.batch, dtype=np.int64)

    def capacity(self, slots):
        """Buffer slots to allocate for `slots` in use: rounded up to a whole step."""
        return self.step * -(-slots // self.step)

    def _resize(self, capacity, slots=None):
        """Buffers of `capacity` slots holding the current ones' slots (or the `slots` chosen per row)."""
        used = self.offset if slots is None else slots.shape[1]
        extra = capacity - used

        def resized(buffer, fill):
            kept = buffer[..., :used, :] if slots is None else mx.take_along_axis(buffer, slots[:, None, :, None], 2)
            shape = (*buffer.shape[:2], extra, buffer.shape[3])
            return mx.concatenate([kept, mx.full(shape, fill, buffer.dtype)], axis=2)

        self.positions = resized(self.positions[:, None, :, None], HIDDEN_POSITION)[:, 0, :, 0]
        for i, (k, _) in enumerate(self.cross):
            if self.keys[i] is None:
                self.keys[i] = self.values[i] = mx.zeros((self.batch, k.shape[1], 0, k.shape[3]), k.dtype)
            self.keys[i] = resized(self.keys[i], 0)
            self.values[i] = resized(self.values[i], 0)

    def reserve(self, count, padding=None):
        """Claim `count` slots for new tokens; return (query, key) positions, each (batch, n).

        padding (batch,) says how many of each row's new tokens are leading filler:
        their slots are hidden and they do not count towards the row's length.
        """
        padding = np.zeros(self.batch, dtype=np.int64) if padding is None else np.asarray(padding)
        if self.offset + count > self.positions.shape[1]:
            self._resize(self.capacity(self.offset + count))
        steps = np.arange(count)
        # Filler sits at HIDDEN_POSITION as key and as query: real queries never see it,
        # and it sees at least itself. A filler query that saw nothing (a row's first
        # token) would give NaN, which its keys/values would pass on to every layer after.
        real = self.lengths[:, None] - padding[:, None] + steps
        queries = np.where(steps < padding[:, None], HIDDEN_POSITION, real)
        self.positions[:, self.offset : self.offset + count] = mx.array(queries, dtype=mx.int32)
        self.write_at = self.offset
        self.offset += count
        self.lengths = self.lengths + count - padding
        return mx.array(queries, dtype=mx.int32), self.positions[:, : self.offset]

    def store(self, index, keys, values):
        """Write one layer's new keys/values at the claimed slots; return all in use."""
        self.keys[index][..., self.write_at : self.offset, :] = keys
        self.values[index][..., self.write_at : self.offset, :] = values
        return self.keys[index][..., : self.offset, :], self.values[index][..., : self.offset, :]

    def trim(self, counts):
        """Forget the last `counts` tokens: one int for every row, or one per row."""
        counts = np.broadcast_to(np.asarray(counts, dtype=np.int64), self.lengths.shape)
        common = int(counts.min())
        self.offset -= common
        self.lengths = self.lengths - counts
        if (counts > common).any():
            first_hidden = mx.array(self.offset - (counts - common), dtype=mx.int32)[:, None]
            slots = mx.arange(self.offset, dtype=mx.int32)[None]
            window = self.positions[:, : self.offset]
            self.positions[:, : self.offset] = mx.where(slots >= first_hidden, HIDDEN_POSITION, window)
        if self.offset > 2 * self.lengths.max() + self.slack:
            self.compact()

    def compact(self):
        """Move each row's live slots to the front, in order, so hidden ones stop costing."""
        positions = np.array(self.positions[:, : self.offset])
        width = int(self.lengths.max())
        slots = np.zeros((self.batch, width), dtype=np.int64)
        for row, live in enumerate(positions != HIDDEN_POSITION):
            found = np.flatnonzero(live)
            slots[row, : len(found)] = found
        # width + 1: room for the next token, so the next step does not grow it again at once.
        self._resize(self.capacity(width + 1), mx.array(slots))
        # Rows shorter than the widest were filled with copies of slot 0: hide those.
        filler = np.arange(width)[None] >= self.lengths[:, None]
        self.positions[:, :width] = mx.where(mx.array(filler), HIDDEN_POSITION, self.positions[:, :width])
        self.offset = width

    def _padded_cross(self, length):
        """Cross keys/values and additive mask widened to `length` encoder positions."""
        extra = length - self.memory_length
        dtype = self.cross[0][0].dtype
        mask = self.cross_mask if self.cross_mask is not None else mx.zeros((self.batch, 1, 1, self.memory_length), dtype)
        if extra == 0:
            return self.cross, mask
        pad = [(0, 0), (0, 0), (0, extra), (0, 0)]
        cross = [(mx.pad(k, pad), mx.pad(v, pad)) for k, v in self.cross]
        return cross, mx.pad(mask, [(0, 0), (0, 0), (0, 0), (0, extra)], constant_values=-mx.inf)

    def replace_rows(self, rows, fresh):
        """Put the prompts of `fresh` (a new cache, one row each) in place of `rows`."""
        length = max(self.memory_length, fresh.memory_length)
        mine, mask = self._padded_cross(length)
        theirs, their_mask = fresh._padded_cross(length)
        index = mx.array(rows)
        for (k, v), (new_k, new_v) in zip(mine, theirs):
            k[index] = new_k
            v[index] = new_v
        mask[index] = their_mask
        self.cross, self.cross_mask, self.memory_length = mine, mask, length
        self.positions[index] = HIDDEN_POSITION
        self.lengths[np.asarray(rows)] = 0

    def keep_rows(self, rows):
        """Drop every row not in `rows`."""
        index = mx.array(rows)
        self.cross = [(k[index], v[index]) for k, v in self.cross]
        self.cross_mask = None if self.cross_mask is None else self.cross_mask[index]
        self.keys = [None if k is None else k[index] for k in self.keys]
        self.values = [None if v is None else v[index] for v in self.values]
        self.positions = self.positions[index]
        self.lengths = self.lengths[np.asarray(rows)]
        self.batch = len(rows)


class T5(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)

    @property
    def vocab_size(self):
        return self.args.vocab_size

    @property
    def decoder_start_token_id(self):
        return self.args.decoder_start_token_id

    @property
    def eos_token_id(self):
        return self.args.eos_token_id

    def encode(self, input_ids, mask=None):
        """Encoder output (batch, length, d_model); mask is 1 for real tokens, 0 for padding."""
        return self.encoder(self.shared(input_ids), mask)

    def make_cache(self, memory, mask=None):
        """A fresh decoder cache holding every layer's cross-attention keys/values."""
        # Stored contiguous: every decoding step reads them, and MLX would copy a
        # transposed view on each read.
        cross = [tuple(map(mx.contiguous, layer.cross_attn.keys_values(memory))) for layer in self.decoder.layers]
        return Cache(cross, mask)

    def decode(self, tokens, cache, padding=None):
        """Logits (batch, len(tokens), vocab) for new tokens; the cache advances past them.

        padding (batch,), if given, counts leading filler tokens per row (see Cache.reserve).
        """
        h = self.decoder(self.shared(tokens), cache, padding)
        if self.args.scale_decoder_outputs:
            h = h * self.args.d_model**-0.5
        if self.args.tie_word_embeddings:
            return self.shared.as_linear(h)
        return self.lm_head(h)

    def __call__(self, input_ids, decoder_input_ids, mask=None):
        """Full forward over all decoder positions at once, from an empty cache."""
        return self.decode(decoder_input_ids, self.make_cache(self.encode(input_ids, mask), mask))


def default_dtype():
    """float32 on the CPU (bfloat16 matmuls are slow there), bfloat16 on a GPU."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def resolve(path_or_name):
    """A converted folder, or a model name resolved under mlx_models/."""
    path = Path(path_or_name)
    if (path / "config.json").is_file():
        return path
    local = MODELS_DIR / str(path_or_name).rstrip("/").split("/")[-1]
    if (local / "config.json").is_file():
        return local
    raise LoadError(f"model '{path_or_name}' not found; convert it first: python convert.py --model {path_or_name}")


def load_model(path, dtype=None):
    """The T5 in a converted folder, its weights cast to `dtype` (default_dtype() if None)."""
    config = json.loads((path / "config.json").read_text())
    model = T5(ModelArgs.from_config(config))
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    if not weights:
        raise LoadError(f"no weights in {path}; convert it again with convert.py")
    dtype = dtype or default_dtype()
    try:
        model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    except ValueError as error:
        raise LoadError(f"weights in {path} do not fit its config: {error}") from None
    mx.eval(model.parameters())
    return model


def load(path_or_name, dtype=None):
    """(model, tokenizer) from a converted folder or a name under mlx_models/."""
    from transformers import AutoTokenizer

    path = resolve(path_or_name)
    # Without its files transformers would build a T5 tokenizer of a few placeholder pieces.
    if not any((path / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise LoadError(f"{path} has no tokenizer.json or spiece.model; convert the model again")
    return load_model(path, dtype), AutoTokenizer.from_pretrained(str(path))
