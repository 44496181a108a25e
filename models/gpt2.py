"""GPT-2 in MLX: gpt2, gpt2-medium, gpt2-large, gpt2-xl.

Learned absolute positions, pre-norm blocks with biases everywhere, GELU (tanh form)
and a head tied to the token embedding. Each row reads its positions from the cache,
so rows of a batch may sit at different lengths.
"""

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, CausalModel, causal_mask, gelu_tanh, output_config, whole  # noqa: F401 (convert.py uses output_config)
from .linear import Linear, tied_head

ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu": nn.gelu, "relu": nn.relu}


@dataclass
class ModelArgs(BaseModelArgs):
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = None
    eos_token_id: int = None

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function '{self.activation_function}' is not supported")
        self.n_inner = self.n_inner or 4 * self.n_embd

    @property
    def num_layers(self):
        return self.n_layer


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index):
        super().__init__()
        self.num_heads = args.n_head
        head_dim = args.n_embd // args.n_head
        self.scale = head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            self.scale /= index + 1
        self.c_attn = Linear(args.n_embd, 3 * args.n_embd)
        self.c_proj = Linear(args.n_embd, args.n_embd)

    def __call__(self, x, mask, cache, index):
        B, L, _ = x.shape
        heads = [t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for t in mx.split(self.c_attn(x), 3, -1)]
        keys, values = cache.store(index, heads[1], heads[2])
        out = mx.fast.scaled_dot_product_attention(heads[0], keys, values, scale=self.scale, mask=mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.act = ACTIVATIONS[args.activation_function]
        self.c_fc = Linear(args.n_embd, args.n_inner)
        self.c_proj = Linear(args.n_inner, args.n_embd)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, index):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args, index)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)

    def __call__(self, x, mask, cache, index):
        x = x + self.attn(self.ln_1(x), mask, cache, index)
        return x + self.mlp(self.ln_2(x))


class Model(nn.Module, CausalModel):
    layer_list = "h"

    def __init__(self, args: ModelArgs, part=None):
        super().__init__()
        self.args = args
        self.part = part = part or whole(args.n_layer)
        if part.first or (part.last and args.tie_word_embeddings):
            self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        if part.first:
            self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = [Block(args, i) for i in range(part.start, part.stop)]
        if part.last:
            self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
            if not args.tie_word_embeddings:
                self.lm_head = Linear(args.n_embd, args.vocab_size, bias=False)

    @property
    def max_positions(self):
        return self.args.n_positions

    def decode(self, tokens, cache, padding=None):
        """Logits (batch, n, vocab) for new tokens; the cache advances past them.

        A part of a pipeline (see CausalModel) takes and returns activations (batch, n, n_embd).
        """
        query_positions, key_positions = cache.reserve(tokens.shape[1], padding)
        x = tokens
        if self.part.first:
            # Filler queries sit at HIDDEN_POSITION, past the table: any row serves them.
            x = self.wte(tokens) + self.wpe(mx.minimum(query_positions, self.args.n_positions - 1))
        mask = causal_mask(query_positions, key_positions, x.dtype)
        for index, block in enumerate(self.h):
            x = block(x, mask, cache, index)
        if not self.part.last:
            return x
        x = self.ln_f(x)
        return tied_head(self.wte, x) if self.args.tie_word_embeddings else self.lm_head(x)


# ----- Hugging Face checkpoints -----------------------------------------------------------

REQUIRED_CONFIG = ("vocab_size", "n_embd", "n_layer", "n_head")
EMBEDDING = "wte.weight"
# GPT-2's Conv1D layers store their weights (in, out): nn.Linear wants (out, in).
CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# The causal-mask buffers old checkpoints carry.
DROPPED = re.compile(r"h\.\d+\.attn\.(masked_)?bias")


def from_hf(hf_name, array):
    """(MLX name, array) of a Hugging Face GPT-2 tensor; None for buffers; KeyError if unknown."""
    # The hub's gpt2 files name tensors without the `transformer.` prefix GPT2LMHeadModel adds.
    name = hf_name.removeprefix("transformer.")
    if DROPPED.fullmatch(name):
        return None
    if CONV1D.fullmatch(name):
        return name, array.T
    if re.fullmatch(r"(wte|wpe|ln_f|h\.\d+\.(ln_1|ln_2|attn\.c_\w+|mlp\.c_\w+))\.(weight|bias)|lm_head\.weight", name):
        return name, array
    raise KeyError(hf_name)
