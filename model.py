"""Loading models: `load()` reads a folder written by convert.py, or one mlx-lm wrote.

config.json's `model_type` picks the family (models/<type>.py); each family declares
its `ModelArgs` and its MLX `Model`, which exposes what a decoding loop needs
(decoder.LanguageModel) and nothing of drafting. A folder whose tensors carry mlx-lm's
names (written by mlx_lm.convert, or published by the mlx-community), and any model_type
the project's own families lack, loads through mlx-lm's model classes (models/mlxlm.py).
A hub id ORG/NAME that is no local folder is looked up in Hugging Face's local cache.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import cli
from models import gpt2, llama, mlxlm, t5
from models.base import as_list
from tokenizer import load as load_tokenizer

MODELS_DIR = Path("mlx_models")
# Qwen2 is Llama with q/k/v biases (models/llama.py reads model_type for that).
FAMILIES = {"t5": t5, "gpt2": gpt2, "llama": llama, "qwen2": llama}


class LoadError(Exception):
    """A model folder that is missing or unusable."""


PIPELINE_REFUSAL = ("--pipeline splits the project's own families (T5, GPT-2, Llama) only; "
                    "an mlx-lm model runs whole on one machine (drop --pipeline)")


def family(config):
    """The module of the project's own family config.json's `model_type` names (what convert.py writes)."""
    model_type = config.get("model_type", "t5")
    if model_type not in FAMILIES:
        raise LoadError(f"model_type '{model_type}' is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def loader(config, names=()):
    """The family that loads a folder of this config.json and these tensor names: the project's
    own for what convert.py writes, models/mlxlm.py for mlx-lm's names or a type only mlx-lm knows."""
    model_type = config.get("model_type", "t5")
    if model_type in FAMILIES and not (model_type != "t5" and mlxlm.named_by_mlx_lm(names)):
        return FAMILIES[model_type]
    if mlxlm.architecture(model_type) is None:
        raise LoadError(f"model_type '{model_type}' is not supported: neither the project's families "
                        f"({', '.join(FAMILIES)}) nor mlx-lm's architectures have it")
    return mlxlm


def build(config, source="config.json", part=None, module=None):
    """The (uninitialised) MLX model a config.json (file `source`) describes, in family
    `module` (default: loader(config)): its pipeline part `part` (models.base.Part) only, if given."""
    module = module or loader(config)
    try:
        return module.Model(module.ModelArgs.from_config(config), part)
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # a value missing or of the wrong kind
        raise LoadError(f"{source} does not describe a model this project can build "
                        f"({type(error).__name__}: {error})") from None


def read_json(path):
    """The JSON object in file `path`; a missing, damaged or empty file is a one-line LoadError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise LoadError(f"cannot read {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LoadError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path} is not a JSON object")
    return data


def indexed_files(index):
    """The weight files a (sharded checkpoint's) index file names, in its order, each checked to exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise LoadError(f"{index} has no valid weight_map")
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise LoadError(f"{index.parent} lacks shard {missing[0]} named in {index.name}")
    return files


def quantizable(model, group_size):
    """Names of the weights MLX can quantize: linear and embedding layers whose last dimension group_size divides."""
    return {f"{path}.weight" for path, m in model.named_modules()
            if hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0}


def parameter_count(config):
    """How many parameters config.json describes, counted on the model built lazily."""
    return sum(p.size for _, p in tree_flatten(build(config).parameters()))


def weight_bytes(config, float_bytes=4, quantization=None, part=None):
    """Bytes of the weights config.json describes (of pipeline part `part` only, if given):
    floats at float_bytes each; quantized weights at quantization["bits"] each plus a float
    scale and bias per group."""
    built = build(config, part=part)  # lazy: nothing is allocated
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


def hub_id(name):
    """Whether `name` reads as a Hugging Face hub id, ORG/NAME."""
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith(".")


def hub_cached(name):
    """The folder of hub id `name` in Hugging Face's local cache (HF_HUB_CACHE); None if not there.

    Only the cache is read: nothing is downloaded, so a model fetched once works offline.
    """
    if not hub_id(name):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(str(name), local_files_only=True))
    except (OSError, HFValidationError):  # LocalEntryNotFoundError is an OSError
        return None
    return folder if (folder / "config.json").exists() else None


def find(path_or_name):
    """A converted or mlx-lm folder, a model name resolved under mlx_models/, or a hub id
    ORG/NAME in Hugging Face's local cache; None if none of them holds a config.json."""
    for path in (Path(path_or_name), MODELS_DIR / str(path_or_name).rstrip("/").split("/")[-1]):
        if (path / "config.json").exists():
            return path
    return hub_cached(path_or_name)


def fetch_command(name):
    """What to run to have model `name`: download an MLX model of the hub, or convert a checkpoint."""
    convert = f"python convert.py --model {name}"
    return f"hf download {name} (an MLX model) or {convert} (a checkpoint to convert)" if hub_id(name) else convert


def not_found(names):
    """The LoadError for models not there yet, with the commands that fetch or convert them."""
    hub = any(hub_id(name) for name in names)
    where = " (no such folder, none under mlx_models/, none in the Hugging Face cache)" if hub else ""
    return LoadError(f"model{'s' * (len(names) > 1)} {' and '.join(map(repr, names))} not found{where}; "
                     f"{'fetch or convert' if hub else 'convert'} first: {' && '.join(map(fetch_command, names))}")


def resolve(path_or_name):
    """A converted folder, or a model name resolved under mlx_models/."""
    path = find(path_or_name)
    if path is None:
        raise not_found([path_or_name])
    return path


def read_config(path):
    """config.json of converted folder `path`, which must name its model_type.

    Its eos_token_id becomes a list of every EOS id that config.json and
    generation_config.json name (config.json's first), as transformers' generate stops at each.
    """
    config = read_json(path / "config.json")
    if "model_type" not in config:
        raise LoadError(f"{path / 'config.json'} names no model_type; convert the model again with convert.py")
    generation = path / "generation_config.json"
    named = as_list(config.get("eos_token_id")) + as_list(read_json(generation).get("eos_token_id")
                                                          if generation.is_file() else None)
    if named:
        config["eos_token_id"] = list(dict.fromkeys(named))
    return config


def weight_files(path):
    """The safetensors files of converted folder `path` (those its index names, if it has one)."""
    index = path / "model.safetensors.index.json"
    files = indexed_files(index) if index.exists() else sorted(path.glob("*.safetensors"))
    if not files and any(path.glob("pytorch_model*.bin")):
        raise LoadError(f"{path} is a Hugging Face checkpoint, not a converted one; "
                        f"convert it first: python convert.py --model {path}")
    if not files:
        raise LoadError(f"no weights in {path}; convert it again with convert.py")
    return files


def read_weights(file):
    """{name: array} of one safetensors file; a damaged file is a LoadError that names it."""
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as error:
        raise LoadError(f"{file} is damaged or incomplete ({cli.first_line(error)}); convert the model again") from None


def mismatch(path, model, weights, error):
    """The LoadError for weights that do not fit the model their config.json describes."""
    expected = dict(tree_flatten(model.parameters()))
    unknown = [name for name in weights if name not in expected]
    if unknown:
        return LoadError(f"{path} holds {len(unknown)} tensor(s) the model does not have, e.g. '{unknown[0]}': "
                         f"not converted? python convert.py --model {path}")
    missing = [name for name in expected if name not in weights]
    if missing:
        return LoadError(f"{path} lacks {len(missing)} of the model's tensors, e.g. '{missing[0]}'; "
                         f"convert it again with convert.py")
    return LoadError(f"weights in {path} do not fit its config: {cli.first_line(error)}")


def part_name(model, name):
    """The name stored tensor `name` has in `model`, a pipeline part whose layer lists count
    from its first layer; None if the part does not hold it."""
    offset = 0
    for stack, count in model.stack():
        if name.startswith(stack + "."):
            index, rest = name[len(stack) + 1 :].split(".", 1)
            lo, hi = model.part.held(offset, offset + count)
            return f"{stack}.{int(index) - lo}.{rest}" if lo <= int(index) < hi else None
        offset += count
    return name


def part_names(model):
    """rename(stored name) -> its name in `model`, a pipeline part, or None for a tensor of a layer it does not hold."""
    # Quantized layers add .scales and .biases to what the float model holds: match by layer.
    held = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(model.parameters())}

    def rename(name):
        local = part_name(model, name)
        return local if local is not None and local.rsplit(".", 1)[0] in held else None

    return rename


def cast_weights(files, dtype, rename=None):
    """Every tensor in `files`: floating ones cast to `dtype`, packed quantized ones as stored.

    rename(name) -> the tensor's name in the model, or None to skip it unread (a pipeline part's).

    Cast and evaluated one tensor at a time, each dropped from its file's (lazy) dict
    first, so no copy of the model in its stored dtype builds up beside the cast one.
    """
    weights = {}
    for file in files:
        stored = read_weights(file)
        for stored_name in list(stored):
            array = stored.pop(stored_name)
            name = stored_name if rename is None else rename(stored_name)
            if name is None:
                continue
            if mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(dtype)
            try:
                mx.eval(array)
            except (RuntimeError, ValueError) as error:
                raise LoadError(f"{file} is damaged or incomplete ({cli.first_line(error)}); "
                                f"convert the model again") from None
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


def stored_names(files):
    """The tensor names in safetensors `files` (read from their headers: nothing is loaded)."""
    return [name for file in files for name in read_weights(file)]


def folder_family(path):
    """The family that loads converted or mlx-lm folder `path` (see loader)."""
    return loader(read_config(path), stored_names(weight_files(path)))


def load_mlx_lm(path, config, dtype=None):
    """The model in mlx-lm folder `path`, read by mlx-lm itself; its floats cast to `dtype`, or
    (None) to float32 on the CPU as every family's, kept as stored on a GPU as mlx-lm runs them.
    It stops at every EOS id `config` (read_config's) names."""
    if dtype is None and default_dtype() == mx.float32:
        dtype = mx.float32
    try:
        return mlxlm.load(path, dtype, as_list(config.get("eos_token_id")))
    except mlxlm.Unsupported as error:
        raise LoadError(f"{path}: {error}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        raise LoadError(f"mlx-lm cannot load {path} ({type(error).__name__}: {cli.first_line(error)})") from None


def load_model(path, dtype=None, part=None):
    """The model in a converted or mlx-lm folder, its float weights cast to `dtype` (default_dtype() if None).

    A quantized folder loads as quantized layers; its packed weights are never cast.
    part (models.base.Part): build and read only that pipeline part's layers (own families only).
    """
    path = Path(path)
    config, files = read_config(path), weight_files(path)
    module = loader(config, stored_names(files))
    if module is mlxlm:
        if part is not None and not (part.first and part.last):
            raise LoadError(PIPELINE_REFUSAL)
        return load_mlx_lm(path, config, dtype)
    model = build(config, path / "config.json", part, module)  # lazy: its random initial weights are never computed
    rename = None if part is None else part_names(model)
    weights = cast_weights(files, dtype or default_dtype(), rename)
    quantize_layers(model, config, weights)
    try:
        model.load_weights(list(weights.items()))
    except ValueError as error:
        raise mismatch(path, model, weights, error) from None
    mx.eval(model.parameters())
    return model


def load(path_or_name, dtype=None, part=None):
    """(model, tokenizer) from a converted folder or a name under mlx_models/.

    The tokenizer comes from tokenizer.py: read with the `tokenizers` package where the
    folder's tokenizer.json allows it, transformers' AutoTokenizer otherwise.
    """
    path = resolve(path_or_name)
    # Without its files transformers would build a T5 tokenizer of a few placeholder pieces.
    if not any((path / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise LoadError(f"{path} has no tokenizer.json or spiece.model; convert the model again")
    model = load_model(path, dtype, part)
    try:
        tokenizer = load_tokenizer(path)
    except Exception as error:  # sentencepiece, tokenizers and transformers each raise their own kinds
        raise LoadError(f"the tokenizer in {path} could not be loaded ({cli.first_line(error)}); "
                        f"convert the model again") from None
    return model, tokenizer
