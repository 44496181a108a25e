"""Llama in MLX, and the models built like it: TinyLlama, Llama 3.x, Qwen2 / Qwen2.5, DeepSeek-Coder.

RMSNorm, SwiGLU, grouped-query attention and rotary positions (RoPE, with "llama3" and
"linear" scaling). RoPE angles come from each token's own position in the cache, so
rows of a batch may sit at different lengths.
"""

import math
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .base import BaseModelArgs, CausalModel, causal_mask, output_config, whole  # noqa: F401 (convert.py uses output_config)
from .linear import Linear, tied_head

ROPE_TYPES = ("default", "llama3", "linear")


@dataclass
class ModelArgs(BaseModelArgs):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = None
    head_dim: int = None
    max_position_embeddings: int = 2048  # transformers' LlamaConfig default, for a config.json without it
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = None
    rope_parameters: dict = None  # transformers 5 folds rope_theta and rope_scaling into this
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int = None
    eos_token_id: int = None

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        rope = dict(self.rope_scaling or {}, **(self.rope_parameters or {}))
        self.rope_theta = rope.pop("rope_theta", self.rope_theta)
        self.rope_type = rope.get("rope_type", rope.get("type", "default"))
        self.rope_scaling = rope
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type '{self.rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})")

    @property
    def num_layers(self):
        return self.num_hidden_layers

    @property
    def qkv_bias(self):
        # Qwen2 always has q/k/v biases (and none on o_proj); Llama's flag covers all four.
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self):
        return self.model_type != "qwen2" and self.attention_bias


def inverse_frequencies(args: ModelArgs):
    """RoPE's angle per position for each pair of dimensions, float32, as transformers computes them."""
    dims = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, dims, 2, dtype=np.float32) / np.float32(dims)))
    inv_freq = inv_freq.astype(np.float32)
    scaling = args.rope_scaling
    if args.rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif args.rope_type == "llama3":
        inv_freq = llama3_frequencies(inv_freq, scaling)
    return mx.array(inv_freq.astype(np.float32))


def llama3_frequencies(inv_freq, scaling):
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotate(x, cos, sin):
    """Apply RoPE in Hugging Face's layout: the two halves of each head form the pairs."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = args.head_dim**-0.5
        d, inner, kv = args.hidden_size, args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
        self.q_proj = Linear(d, inner, bias=args.qkv_bias)
        self.k_proj = Linear(d, kv, bias=args.qkv_bias)
        self.v_proj = Linear(d, kv, bias=args.qkv_bias)
        self.o_proj = Linear(inner, d, bias=args.o_bias)

    def __call__(self, x, mask, rope, cache, index):
        B, L, _ = x.shape

        def heads(t, count):
            return t.reshape(B, L, count, -1).transpose(0, 2, 1, 3)

        queries = rotate(heads(self.q_proj(x), self.num_heads), *rope)
        keys = rotate(heads(self.k_proj(x), self.num_kv_heads), *rope)
        keys, values = cache.store(index, keys, heads(self.v_proj(x), self.num_kv_heads))
        # Grouped-query attention: the kernel shares each key/value head among its query heads.
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args)

    def __call__(self, x, mask, rope, cache, index):
        x = x + self.self_attn(self.input_layernorm(x), mask, rope, cache, index)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module, CausalModel):
    layer_list = "layers"

    def __init__(self, args: ModelArgs, part=None):
        super().__init__()
        self.args = args
        self.part = part = part or whole(args.num_hidden_layers)
        if part.first or (part.last and args.tie_word_embeddings):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Layer(args) for _ in range(part.stop - part.start)]
        if part.last:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self._inv_freq = inverse_frequencies(args)

    @property
    def max_positions(self):
        """The context the model was trained for: prompt plus output, in tokens."""
        return self.args.max_position_embeddings

    def rope(self, positions, dtype):
        """(cos, sin), each (batch, 1, n, head_dim), of the tokens at `positions` (batch, n)."""
        angles = positions.astype(mx.float32)[:, None, :, None] * self._inv_freq
        angles = mx.concatenate([angles, angles], axis=-1)
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

    def decode(self, tokens, cache, padding=None):
        """Logits (batch, n, vocab) for new tokens; the cache advances past them.

        A part of a pipeline (see CausalModel) takes and returns activations (batch, n, hidden_size).
        """
        query_positions, key_positions = cache.reserve(tokens.shape[1], padding)
        x = self.embed_tokens(tokens) if self.part.first else tokens
        mask = causal_mask(query_positions, key_positions, x.dtype)
        rope = self.rope(query_positions, x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, mask, rope, cache, index)
        if not self.part.last:
            return x
        x = self.norm(x)
        return tied_head(self.embed_tokens, x) if self.args.tie_word_embeddings else self.lm_head(x)


# ----- Hugging Face checkpoints -----------------------------------------------------------

REQUIRED_CONFIG = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
EMBEDDING = "embed_tokens.weight"
NAMES = re.compile(
    r"(embed_tokens|norm|layers\.\d+\.(input_layernorm|post_attention_layernorm"
    r"|self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))\.(weight|bias)"
)


def from_hf(hf_name, array):
    """(MLX name, array) of a Hugging Face Llama tensor; None for RoPE buffers; KeyError if unknown."""
    if hf_name == "lm_head.weight":
        return hf_name, array
    name = hf_name.removeprefix("model.")
    if re.fullmatch(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
        return None  # recomputed from the config
    if NAMES.fullmatch(name):
        return name, array
    raise KeyError(hf_name)
