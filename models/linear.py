"""Linear layers whose few-row products take MKL's cheaper route.

A verify pass multiplies the g + 1 tokens of each row by every weight. For 2 to 8 rows
MKL computes x @ W.T by first packing W, which makes a 4-row product cost 2-3 one-row
products on a 2-core CPU; the same product taken with the weight on the left, (W @ x.T).T,
costs 1.1-1.7 of them (`python ../shared/tools/matmul_rows.py`-style timings in README.md).
That is where the verify pass of a large model spends its time: on a T5-3B-shaped target
it halved the cost of a 4-token pass. Small weights gain nothing (the step is then per-op
overhead) and OpenBLAS is slower that way round, so the route is taken only where it
was measured to pay: float32 on the CPU with MKL bound, weights of 1M elements or more.
"""

import sys

import mlx.core as mx
import mlx.nn as nn

ROWS = range(2, 9)  # beyond 8 rows MKL's packed product catches up
MIN_ELEMENTS = 1 << 20


def mkl_bound():
    """Whether cpu_blas bound MKL for MLX's CPU products in this process."""
    blas = sys.modules.get("cpu_blas")  # imported by every entry point before MLX, if at all
    return blas is not None and (blas.LOADED or "").startswith("libmkl")


WEIGHT_LEFT = mkl_bound()


def weight_left(rows, weight):
    """Whether rows x weight.T is cheaper as weight @ x.T here."""
    return (WEIGHT_LEFT and rows in ROWS and weight.size >= MIN_ELEMENTS and weight.dtype == mx.float32
            and mx.default_device() == mx.cpu)


def project(x, weight):
    """x @ weight.T over x's last axis: the product of every linear layer and tied head."""
    rows = x.size // x.shape[-1]
    if not weight_left(rows, weight):
        return x @ weight.T
    flat = x.reshape(rows, x.shape[-1])
    return (weight @ flat.T).T.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear through `project`; quantizes to nn.QuantizedLinear like its parent."""

    def __call__(self, x):
        y = project(x, self.weight)
        return y + self.bias if "bias" in self else y


def tied_head(embedding, h):
    """Logits through an embedding's own weight (a quantized embedding keeps its packed product)."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return embedding.as_linear(h)
    return project(h, embedding.weight)
