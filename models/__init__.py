"""Model families, one file each (as mlx-lm keeps them), and the slot cache they share.

Each family module declares `ModelArgs` (its config), `Model` (the MLX model, with the
decoding interface decoder.py documents as `decoder.LanguageModel`), and the mapping
from Hugging Face tensor names used by convert.py. `model.py` picks the family from
config.json's `model_type`: t5.py (encoder-decoder), gpt2.py and llama.py (decoder-only,
also Qwen2), with what the decoder-only ones share in base.py and the cache in cache.py.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

