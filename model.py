"""Loading converted models: `load()` reads a folder written by convert.py.

config.json's `model_type` picks the family (models/<type>.py); each family declares
its `ModelArgs` and its MLX `Model`, which exposes what a decoding loop needs
(decoder.LanguageModel) and nothing of drafting.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
from pathlib import Path

import mlx.core as mx

from models import t5

MODELS_DIR = Path("mlx_models")
FAMILIES = {"t5": t5}


class LoadError(Exception):
    """A model folder that is missing or unusable."""


def family(config):
    """The module of the family config.json's `model_type` names."""
    model_type = config.get("model_type", "t5")
    if model_type not in FAMILIES:
        raise LoadError(f"model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def build(config):
    """The (uninitialised) MLX model a config.json describes."""
    module = family(config)
    return module.Model(module.ModelArgs.from_config(config))


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
    """The model in a converted folder, its weights cast to `dtype` (default_dtype() if None)."""
    config = json.loads((path / "config.json").read_text())
    model = build(config)
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
