"""T5 encoder-decoder in MLX: the family behind T5-small ... T5-11B and flan-t5.

`Model.start` runs the encoder once per prompt and computes every decoder layer's
cross-attention keys/values once; `decode` then runs the decoder over new tokens only.
"""

import math
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .base import BaseModelArgs, TokenIds, gelu_tanh, whole
from .cache import Cache
from .linear import Linear, tied_head

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "gelu_new": gelu_tanh, "silu": nn.silu}


@dataclass
class ModelArgs(BaseModelArgs):
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
    # T5's positions are relative (no table to run off), but it was trained on 512-token inputs
    # and the encoder's attention grows with the square of the input: Hugging Face's T5 configs
    # carry n_positions 512, and this project takes it as the limit of the encoder's input and,
    # likewise, of the decoder's output.
    n_positions: int = 512

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
        self.q = Linear(args.d_model, inner, bias=False)
        self.k = Linear(args.d_model, inner, bias=False)
        self.v = Linear(args.d_model, inner, bias=False)
        self.o = Linear(inner, args.d_model, bias=False)

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
            self.wi_0 = Linear(args.d_model, args.d_ff, bias=False)
            self.wi_1 = Linear(args.d_model, args.d_ff, bias=False)
        else:
            self.wi = Linear(args.d_model, args.d_ff, bias=False)
        self.wo = Linear(args.d_ff, args.d_model, bias=False)

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
    """The encoder's layers lo..hi-1 (all by default); the final norm if it holds the last."""

    def __init__(self, args: ModelArgs, lo=0, hi=None):
        super().__init__()
        hi = args.num_layers if hi is None else hi
        self.position_bias = RelativePositionBias(args, bidirectional=True)
        self.layers = [EncoderLayer(args) for _ in range(lo, hi)]
        if hi == args.num_layers and lo < hi:
            self.final_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def __call__(self, x, mask=None):
        positions = mx.arange(x.shape[1])[None]
        bias = self.position_bias(positions, positions)
        padding = additive_mask(mask, bias.dtype)
        if padding is not None:
            bias = bias + padding
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x) if "final_norm" in self else x


class Decoder(nn.Module):
    """The decoder's layers lo..hi-1 (all by default); the final norm if it holds the last."""

    def __init__(self, args: ModelArgs, lo=0, hi=None):
        super().__init__()
        hi = args.num_decoder_layers if hi is None else hi
        self.position_bias = RelativePositionBias(args, bidirectional=False)
        self.layers = [DecoderLayer(args) for _ in range(lo, hi)]
        if hi == args.num_decoder_layers:
            self.final_norm = nn.RMSNorm(args.d_model, eps=args.layer_norm_epsilon)

    def __call__(self, x, cache, padding=None):
        query_positions, key_positions = cache.reserve(x.shape[1], padding)
        bias = self.position_bias(query_positions, key_positions)
        for index, layer in enumerate(self.layers):
            x = layer(x, bias, cache, index)
        return self.final_norm(x) if "final_norm" in self else x


class T5Cache(Cache):
    """The slot cache plus T5's cross-attention state.

    Cross-attention keys/values (and the encoder padding mask) are computed once per
    prompt, at construction or when `replace_rows` puts new prompts in.
    """

    def __init__(self, cross, mask=None):
        super().__init__(cross[0][0].shape[0], len(cross))
        self.cross = cross
        self.memory_length = cross[0][0].shape[2]
        self.cross_mask = additive_mask(mask, cross[0][0].dtype)

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
        super().replace_rows(rows, fresh)
        length = max(self.memory_length, fresh.memory_length)
        mine, mask = self._padded_cross(length)
        theirs, their_mask = fresh._padded_cross(length)
        index = mx.array(rows)
        for (k, v), (new_k, new_v) in zip(mine, theirs):
            k[index] = new_k
            v[index] = new_v
        mask[index] = their_mask
        self.cross, self.cross_mask, self.memory_length = mine, mask, length

    def keep_rows(self, rows):
        super().keep_rows(rows)
        index = mx.array(rows)
        self.cross = [(k[index], v[index]) for k, v in self.cross]
        self.cross_mask = None if self.cross_mask is None else self.cross_mask[index]


class Model(nn.Module, TokenIds):
    def __init__(self, args: ModelArgs, part=None):
        super().__init__()
        self.args = args
        encoder, decoder = args.num_layers, args.num_decoder_layers
        # A pipeline part (base.Part) holds a run of the encoder's layers, then the decoder's.
        self.part = part = part or whole(encoder + decoder)
        if part.first or (part.last and args.tie_word_embeddings):
            self.shared = nn.Embedding(args.vocab_size, args.d_model)
        self.encoder = Encoder(args, *part.held(0, encoder))
        self.decoder = Decoder(args, *part.held(encoder, encoder + decoder))
        if part.last and not args.tie_word_embeddings:
            self.lm_head = Linear(args.d_model, args.vocab_size, bias=False)

    @property
    def max_source_positions(self):
        """The longest prompt (encoder input) taken, in tokens: config.json's n_positions (512 if absent)."""
        return self.args.n_positions

    @property
    def max_positions(self):
        """The most tokens generated for one prompt (decoder positions): n_positions, as for the input."""
        return self.args.n_positions

    @property
    def decoder_start_token_id(self):
        return self.args.decoder_start_token_id

    def stack(self):
        """[(name, count)]: the layer lists a pass runs, in order (a pipeline splits them)."""
        return [("encoder.layers", self.args.num_layers), ("decoder.layers", self.args.num_decoder_layers)]

    def encode(self, input_ids, mask=None):
        """Encoder output (batch, length, d_model); mask is 1 for real tokens, 0 for padding."""
        return self.encoder(self.shared(input_ids), mask)

    def start(self, prompts):
        """(cache, first decoder inputs) for prompts (lists of token ids), encoded in one padded pass.

        An empty prompt is encoded as EOS alone, which is what T5's tokenizer makes of empty
        text (the encoder cannot attend over nothing).
        """
        cache, firsts, _ = self.start_part(prompts)
        return cache, firsts

    def start_part(self, prompts, x=None):
        """start() for a pipeline part: (cache, first decoder inputs, activations for the next part or None).

        x: the previous part's encoder activations (batch, length, d_model), or the
        encoder's output once its last layer has run; None for the first part.
        """
        prompts = [list(ids) or [self.eos_token_id] for ids in prompts]
        width = max(len(ids) for ids in prompts)
        ids = mx.array([ids + [0] * (width - len(ids)) for ids in prompts])
        mask = mx.array([[1] * len(ids) + [0] * (width - len(ids)) for ids in prompts])
        x = self.encoder(self.shared(ids) if self.part.first else x, mask)
        # A part without decoder layers still counts each row's tokens in a cache of no layers.
        cache = self.make_cache(x, mask) if self.decoder.layers else Cache(len(prompts), 0)
        return cache, [self.decoder_start_token_id] * len(prompts), None if self.part.last else x

    def make_cache(self, memory, mask=None):
        """A fresh decoder cache holding every layer's cross-attention keys/values."""
        # Stored contiguous: every decoding step reads them, and MLX would copy a
        # transposed view on each read.
        cross = [tuple(map(mx.contiguous, layer.cross_attn.keys_values(memory))) for layer in self.decoder.layers]
        return T5Cache(cross, mask)

    def decode(self, tokens, cache, padding=None):
        """Logits (batch, len(tokens), vocab) for new tokens; the cache advances past them.

        padding (batch,), if given, counts leading filler tokens per row (see Cache.reserve).
        """
        h = self.decoder(self.shared(tokens) if self.part.first else tokens, cache, padding)
        if not self.part.last:
            return h  # a pipeline part's activations (batch, n, d_model)
        if self.args.scale_decoder_outputs:
            h = h * self.args.d_model**-0.5
        if self.args.tie_word_embeddings:
            return tied_head(self.shared, h)
        return self.lm_head(h)

    def __call__(self, input_ids, decoder_input_ids, mask=None):
        """Full forward over all decoder positions at once, from an empty cache."""
        return self.decode(decoder_input_ids, self.make_cache(self.encode(input_ids, mask), mask))


# ----- Hugging Face checkpoints -----------------------------------------------------------

REQUIRED_CONFIG = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
EMBEDDING = "shared.weight"
# Hugging Face name -> MLX name. Block 0 carries the relative position bias of its stack.
RENAMES = [
    (r"(en|de)coder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias", r"\1coder.position_bias"),
    (r"(en|de)coder\.final_layer_norm", r"\1coder.final_norm"),
    (r"(en|de)coder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])", r"\1coder.layers.\2.self_attn.\3"),
    (r"(en|de)coder\.block\.(\d+)\.layer\.0\.layer_norm", r"\1coder.layers.\2.self_attn_norm"),
    (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])", r"decoder.layers.\1.cross_attn.\2"),
    (r"decoder\.block\.(\d+)\.layer\.1\.layer_norm", r"decoder.layers.\1.cross_attn_norm"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)", r"encoder.layers.\1.ffn.\2"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm", r"encoder.layers.\1.ffn_norm"),
    (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)", r"decoder.layers.\1.ffn.\2"),
    (r"decoder\.block\.(\d+)\.layer\.2\.layer_norm", r"decoder.layers.\1.ffn_norm"),
    (r"(shared|lm_head)", r"\1"),
]
# Copies of `shared`, and a bias some old checkpoints carry that T5 never uses.
DROPPED = re.compile(r"(en|de)coder\.embed_tokens\.weight|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")


def from_hf(hf_name, array):
    """(MLX name, array) of a Hugging Face T5 tensor; None for dropped duplicates; KeyError if unknown."""
    if DROPPED.fullmatch(hf_name):
        return None
    for pattern, replacement in RENAMES:
        match = re.fullmatch(pattern + r"\.weight", hf_name)
        if match:
            return match.expand(replacement) + ".weight", array
    raise KeyError(hf_name)


def output_config(config, tied):
    """The source config plus the two facts the MLX loader reads explicitly."""
    # transformers 5 writes scale_decoder_outputs; older files say tie_word_embeddings: false.
    scale = config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True))
    return dict(config, tie_word_embeddings=tied, scale_decoder_outputs=bool(scale))
