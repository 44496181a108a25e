"""Model families, one file each (as mlx-lm keeps them), and the slot cache they share.

Each family module declares `ModelArgs` (its config), `Model` (the MLX model, with the
decoding interface decoder.py documents as `decoder.LanguageModel`), and the mapping
from Hugging Face tensor names used by convert.py. `model.py` picks the family from
config.json's `model_type`.
"""
