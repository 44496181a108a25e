"""Loading converted models: `load()` reads a folder written by convert.py.

config.json's `model_type` picks the family (models/<type>.py); each family declares
its `ModelArgs` and its MLX `Model`, which exposes what a decoding loop needs
(decoder.LanguageModel) and nothing of drafting.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

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


def quantizable(model, group_size):
    """Names of the weights MLX can quantize: linear and embedding layers whose last dimension group_size divides."""
    return {f"{path}.weight" for path, m in model.named_modules()
            if hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0}


def parameter_count(config):
    """How many parameters config.json describes, counted on the model built lazily."""
    return sum(p.size for _, p in tree_flatten(build(config).parameters()))


def weight_bytes(config, float_bytes=4, quantization=None):
    """Bytes of the weights config.json describes: floats at float_bytes each; quantized
    weights at quantization["bits"] each plus a float scale and bias per group."""
    built = build(config)  # lazy: nothing is allocated
    quantized = quantizable(built, quantization["group_size"]) if quantization else set()
    total = 0
    for name, p in tree_flatten(built.parameters()):
        if name in quantized:
            total += p.size * quantization["bits"] / 8 + p.size // quantization["group_size"] * 2 * float_bytes
        else:
            total += p.size * float_bytes
    return int(total)


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


def read_weights(path, dtype):
    """Every tensor in the folder: floating ones cast to `dtype`, packed quantized ones as stored.

    Cast and evaluated one tensor at a time, each dropped from its file's (lazy) dict
    first, so no copy of the model in its stored dtype builds up beside the cast one.
    """
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        stored = mx.load(str(file))
        for name in list(stored):
            array = stored.pop(name)
            if mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(dtype)
            mx.eval(array)
            weights[name] = array
    return weights


def quantize_layers(model, config, weights):
    """Swap in quantized layers wherever the folder stores a weight with `.scales` (config.json's "quantization")."""
    quantization = config.get("quantization")
    if quantization is None:
        return
    try:
        group_size, bits = quantization["group_size"], quantization["bits"]
    except (TypeError, KeyError):
        raise LoadError(f"config.json's quantization {quantization!r} lacks group_size or bits") from None
    nn.quantize(model, group_size, bits, class_predicate=lambda path, _: f"{path}.scales" in weights)


def load_model(path, dtype=None):
    """The model in a converted folder, its float weights cast to `dtype` (default_dtype() if None).

    A quantized folder loads as quantized layers; its packed weights are never cast.
    """
    config = json.loads((path / "config.json").read_text())
    model = build(config)  # lazy: its random initial weights are never computed
    weights = read_weights(path, dtype or default_dtype())
    if not weights:
        raise LoadError(f"no weights in {path}; convert it again with convert.py")
    quantize_layers(model, config, weights)
    try:
        model.load_weights(list(weights.items()))
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
