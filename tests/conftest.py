"""Shared fixtures: tiny offline T5 checkpoints (random weights, local tokenizer)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cpu_blas  # noqa: E402,F401  (before anything imports MLX)
