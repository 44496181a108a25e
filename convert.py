"""Convert a Hugging Face checkpoint (T5, GPT-2, Llama or Qwen2; hub id or local folder) into MLX weights.

    python convert.py --model t5-small [--mlx-path DIR] [--dtype float32|bfloat16|float16]
                      [-q [--q-bits 4|8] [--q-group-size 32|64|128]]

config.json's model_type picks the family (model.FAMILIES), whose module in models/ names
the tensors. Tensors are read, renamed, cast and written one at a time, so peak memory
stays near one output shard. The output is written to a temporary folder and renamed at
the end; an existing folder is replaced only if convert.py wrote it (its MARKER lists
every file in it), so a user's own files are never lost.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
import math
import os
import shutil
import signal
import struct
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

import cli
import files
import model

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
# Copied beside the weights when the checkpoint has them (and fetched from the hub): the
# tokenizer's files, the chat template current transformers keeps in a file of its own,
# and generation_config.json (the EOS ids a model lists besides config.json's).
COPIED_FILES = (
    "spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)
MAX_SHARD_BYTES = 5 << 30
# Written last into every output folder: the names of the files convert.py put there.
# Only a folder holding this file and nothing it does not list is ours to replace.
MARKER = ".mlx-converted"
Q_BITS, Q_GROUP_SIZES = (4, 8), (32, 64, 128)


class ConvertError(Exception):
    """Input that cannot be converted; main() prints it as one line."""


def mlx_tensor(family, hf_name, array):
    """(MLX name, array) of a Hugging Face tensor in the family's naming; None for tensors it drops."""
    try:
        return family.from_hf(hf_name, array)
    except KeyError:
        raise ConvertError(f"unexpected tensor '{hf_name}': not a {family.__name__.split('.')[-1]} checkpoint?") from None


def fetch(name):
    """A local checkpoint folder, or the files of hub id `name` downloaded with huggingface_hub."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise ConvertError(f"no checkpoint folder at '{name}'")
    try:
        from huggingface_hub import logging, model_info, snapshot_download

        logging.set_verbosity_error()  # its retry warnings would bury the one-line error
        # model_info fails at once when the hub is unreachable (list_repo_files retries for 20 s).
        files = [sibling.rfilename for sibling in model_info(name).siblings]
        weights = ["*.safetensors", "*.safetensors.index.json"]
        if not any(f.endswith(".safetensors") for f in files):
            weights = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        return Path(snapshot_download(name, allow_patterns=["config.json", *COPIED_FILES, *weights]))
    except Exception as error:  # the hub raises many kinds; all mean the same to a user
        raise ConvertError(f"could not fetch '{name}' from the Hugging Face hub ({cli.first_line(error)}); "
                           f"to convert a local copy, give its folder: --model path/to/folder") from None


def read_config(folder):
    """The checkpoint's config.json, checked to describe a model of a family model.py knows."""
    path = folder / "config.json"
    config = read_json(path)
    if config.get("model_type") not in model.FAMILIES:
        raise ConvertError(f"{path} describes model_type '{config.get('model_type')}', "
                           f"not one of {', '.join(model.FAMILIES)}")
    for key in model.family(config).REQUIRED_CONFIG:
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise ConvertError(f"{path}: '{key}' must be a positive integer, not {config.get(key)!r}")
    return config


def read_json(path):
    """model.read_json, its error a ConvertError."""
    try:
        return model.read_json(path)
    except model.LoadError as error:
        raise ConvertError(str(error)) from None


def weight_files(folder):
    """The checkpoint's weight files, in the order their index (if any) lists them."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            try:
                return model.indexed_files(folder / index)
            except model.LoadError as error:
                raise ConvertError(str(error)) from None
        if (folder / single).exists():  # a folder in its place fails, by name, when read
            return [folder / single]
    raise ConvertError(f"{folder} has no model.safetensors or pytorch_model.bin weights")


def safetensors_header(path):
    """{name: (dtype, shape, start, end)} of a safetensors file and the offset of its data.

    Every entry is checked against the file's size, so a truncated or corrupt file fails
    here, before anything is written.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 8 + length <= size else None
    except OSError as error:
        raise ConvertError(f"cannot read {path}: {error.strerror}") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ConvertError(f"{path.name} is not a valid safetensors file")
    header.pop("__metadata__", None)
    tensors = {name: tensor_entry(path, name, info) for name, info in header.items()}
    end = max((entry[3] for entry in tensors.values()), default=0)
    if 8 + length + end > size:
        raise ConvertError(f"{path.name} is truncated ({size} bytes, its header needs {8 + length + end})")
    return tensors, 8 + length


def tensor_entry(path, name, info):
    """(dtype, shape, start, end) of one header entry, its byte count checked."""
    try:
        dtype, shape, (start, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"{path.name}: the header entry of '{name}' is malformed") from None
    if dtype not in SAFETENSORS_DTYPES:
        raise ConvertError(f"{path.name}: tensor '{name}' has unsupported dtype {dtype}")
    itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start
            and min(shape, default=0) >= 0 and end - start == math.prod(shape) * itemsize):
        raise ConvertError(f"{path.name}: the offsets of tensor '{name}' do not fit its shape")
    return dtype, shape, start, end


def read_safetensors(path):
    """Yield (name, mx.array) from a safetensors file, one tensor in memory at a time."""
    header, base = safetensors_header(path)
    with open(path, "rb") as f:
        for name, (dtype, shape, start, end) in header.items():
            f.seek(base + start)
            data = np.frombuffer(f.read(end - start), dtype=SAFETENSORS_DTYPES[dtype])
            array = mx.array(data.reshape(shape))
            # numpy has no bfloat16: its bits travel as uint16 and are reinterpreted in MLX.
            yield name, array.view(mx.bfloat16) if dtype == "BF16" else array


def read_torch(path):
    """Yield (name, mx.array) from a pytorch_model*.bin file (needs torch)."""
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path.name} is a PyTorch file: install torch to convert it") from None
    try:
        try:
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Files saved in torch's legacy (pre-1.6) format can only be read whole.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for a damaged file
        raise ConvertError(f"{path.name} could not be read: {cli.first_line(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConvertError(f"{path.name} does not hold a state dict of tensors")
    for name, tensor in state.items():
        yield name, mx.array(tensor.float().numpy())


def tensor_count(files):
    """How many tensors the files hold (None when only loading them would tell)."""
    if any(f.suffix != ".safetensors" for f in files):
        return None
    return sum(len(safetensors_header(f)[0]) for f in files)


def read_tensors(files):
    for file in files:
        yield from (read_safetensors(file) if file.suffix == ".safetensors" else read_torch(file))


def expected_shapes(config, source="config.json"):
    """MLX names and shapes of the tensors the config implies (lm_head aside: it is optional).

    Read off the model itself, built lazily (nothing is allocated), so that the two agree.
    """
    try:
        built = model.build(dict(config, tie_word_embeddings=True), source)
    except model.LoadError as error:
        raise ConvertError(str(error)) from None
    return {name: tuple(p.shape) for name, p in tree_flatten(built.parameters())}


def quantization_settings(bits=4, group_size=64):
    """config.json's "quantization" entry, mlx-lm's defaults: 4 bits in groups of 64."""
    if bits not in Q_BITS:
        raise ConvertError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))}, not {bits}")
    if group_size not in Q_GROUP_SIZES:
        raise ConvertError(f"--q-group-size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, not {group_size}")
    return {"group_size": group_size, "bits": bits}


def quantization_plan(config, quantization):
    """The MLX names of the weights to store quantized, with a note on stderr of those kept float.

    MLX quantizes the layers that have `to_quantized` (linear and embedding layers), and
    only along a last dimension divisible by the group size; norms and position biases
    stay float. The loader rebuilds exactly these layers from the stored `.scales`.
    """
    built = model.build(dict(config, tie_word_embeddings=False))  # lazy: nothing is allocated
    layers = [f"{path}.weight" for path, m in built.named_modules() if hasattr(m, "to_quantized")]
    group = quantization["group_size"]
    plan = model.quantizable(built, group)
    narrow = sorted(set(layers) - plan)
    others = len(tree_flatten(built.parameters())) - len(layers)
    note = (f"quantizing linear and embedding weights to {quantization['bits']} bits in groups of {group}; "
            f"{others} norm and position-bias tensors stay float (MLX quantizes only linear and embedding layers)")
    if narrow:
        note += f"; {len(narrow)} stay float because their last dimension is not a multiple of {group}, e.g. '{narrow[0]}'"
    print(note, file=sys.stderr)
    return plan


def stored_tensors(name, array, plan, quantization):
    """{name: array} as written: a quantized weight becomes its packed weight, scales and biases."""
    if name not in plan:
        return {name: array}
    weight, scales, biases = mx.quantize(array, group_size=quantization["group_size"], bits=quantization["bits"])
    prefix = name.removesuffix(".weight")
    return {name: weight, f"{prefix}.scales": scales, f"{prefix}.biases": biases}


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `max_bytes` is reached."""

    def __init__(self, folder, max_bytes):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending, self.pending_bytes, self.shards = {}, 0, []

    def add(self, name, array):
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes

    def flush(self):
        path = self.folder / f"shard-{len(self.shards)}.safetensors"
        try:
            mx.save_safetensors(str(path), self.pending, metadata={"format": "mlx"})
        except RuntimeError as error:  # MLX reports a failed write (a full disk) this way
            raise OSError(None, f"{error} (is the disk full?)", str(path)) from None
        files.follow_umask(path)  # MLX creates its files 0644 whatever the umask
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self):
        """Name the shards as Hugging Face does, with an index when there are several."""
        if self.pending or not self.shards:
            self.flush()
        if len(self.shards) == 1:
            os.replace(self.folder / "shard-0.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            os.replace(self.folder / f"shard-{i}.safetensors", self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        total = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert_weights(files, config, out, dtype, max_shard_bytes, quantization=None):
    """Write the renamed, cast (and quantized) tensors to `out`; return whether lm_head is tied to the embedding."""
    family = model.family(config)
    expected = expected_shapes(config, files[0].parent / "config.json")
    plan = quantization_plan(config, quantization) if quantization else set()
    writer = ShardWriter(out, max_shard_bytes)
    seen, embedding, head = set(), None, None
    # disable=None: a bar on a terminal, nothing in logs and pipes (one-line errors stay one line).
    tensors = tqdm(read_tensors(files), total=tensor_count(files), desc="tensors", unit="tensor", file=sys.stderr,
                   disable=None)
    for hf_name, array in tensors:
        converted = mlx_tensor(family, hf_name, array)
        if converted is None or converted[0] in seen:
            continue
        name, array = converted
        seen.add(name)
        if name == "lm_head.weight":
            head = array  # kept until the embedding is known: a copy of it means a tied head
            continue
        if name not in expected:
            raise ConvertError(f"tensor '{hf_name}' is not part of the model config.json describes")
        if expected[name] != tuple(array.shape):
            shape = tuple(array.shape)
            raise ConvertError(f"tensor '{hf_name}' has shape {shape}, config.json implies {expected[name]}")
        if name == family.EMBEDDING:
            embedding = array
        for stored_name, stored in stored_tensors(name, array.astype(dtype), plan, quantization).items():
            mx.eval(stored)
            writer.add(stored_name, stored)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConvertError(f"the checkpoint lacks {len(missing)} tensor(s) that config.json implies, "
                           f"e.g. '{missing[0]}' (MLX name)")
    tied = head is None or bool(mx.array_equal(head, embedding))
    if not tied:
        if tuple(head.shape) != expected[family.EMBEDDING]:
            raise ConvertError(f"lm_head has shape {tuple(head.shape)}, expected {expected[family.EMBEDDING]}")
        for stored_name, stored in stored_tensors("lm_head.weight", head.astype(dtype), plan, quantization).items():
            writer.add(stored_name, stored)
    writer.finish()
    return tied


def convert(source, mlx_path=None, dtype="float32", max_shard_bytes=MAX_SHARD_BYTES, quantization=None):
    """Convert checkpoint `source` (hub id or folder) into `mlx_path`; return that folder.

    quantization: None, or quantization_settings(bits, group_size) to store linear and
    embedding weights quantized (the other tensors in `dtype`).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if not str(source).strip() or (mlx_path is not None and not str(mlx_path).strip()):
        raise ConvertError("--model and --mlx-path must not be empty")
    folder = fetch(source)
    config = read_config(folder)
    files = weight_files(folder)
    destination = output_folder(source, mlx_path)
    check_destination(destination, folder)
    staging = None
    try:
        with interrupts_held():  # a Ctrl-C here could leave a staging folder nobody removes
            staging = make_staging(destination)
        tied = convert_weights(files, config, staging, DTYPES[dtype], max_shard_bytes, quantization)
        written = model.family(config).output_config(config, tied)
        if quantization:
            written["quantization"] = quantization
        (staging / "config.json").write_text(json.dumps(written, indent=2))
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staging / name)
        mark(staging)
        with interrupts_held():
            install(staging, destination, folder)
    except OSError as error:
        raise ConvertError(os_error_message(error, destination)) from None
    finally:
        if staging is not None:
            with interrupts_held():
                shutil.rmtree(staging, ignore_errors=True)
    return destination


def output_folder(source, mlx_path):
    """--mlx-path, else mlx_models/<last part of the name>."""
    if mlx_path:
        return Path(mlx_path)
    # A local folder is named by its real path, so that `--model .` gets a proper name.
    name = Path(source).resolve().name if Path(source).is_dir() else source.rstrip("/").split("/")[-1]
    return Path("mlx_models") / name


def check_destination(destination, source_folder):
    """Refuse, as one line, an output folder whose replacement could lose anything of the user's."""
    where = destination.resolve()
    if destination.is_symlink():
        raise ConvertError(f"{destination} is a symbolic link; give the folder itself or a new one")
    if destination.exists() and not destination.is_dir():
        raise ConvertError(f"{destination} exists and is not a folder")
    if where == Path.cwd() or where in Path.cwd().parents:
        raise ConvertError(f"{destination} is the current folder or holds it; give a new folder, "
                           f"e.g. mlx_models/{source_folder.resolve().name}")
    if where == source_folder.resolve() or where in source_folder.resolve().parents:
        raise ConvertError(f"{destination} holds the checkpoint being converted; give a new folder")
    if destination.is_dir():
        ours = written_files(destination)
        extra = sorted(set(os.listdir(destination)) - ours)
        if extra:
            problem = f"holds '{extra[0]}', which convert.py did not write" if ours else "was not written by convert.py"
            raise ConvertError(f"{destination} already exists and {problem}; move it away or give another --mlx-path")


def written_files(folder):
    """The names MARKER lists in `folder` (MARKER included); empty if it has none."""
    try:
        names = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {MARKER, *names} if isinstance(names, list) else set()


def mark(folder):
    """Write MARKER into `folder`, listing the files in it: what a later run may replace."""
    names = sorted(os.listdir(folder))
    (folder / MARKER).write_text(json.dumps({"written_by": "convert.py", "files": names}, indent=2))


def make_staging(destination):
    """A new hidden folder beside `destination`, where the output is written before it is renamed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    return files.temporary_folder(destination, prefix=f".{destination.name}.")


def install(staging, destination, source_folder):
    """Rename the finished `staging` folder to `destination`; an older output goes only now."""
    # Again: the folder may have changed during a long conversion.
    check_destination(destination, source_folder)
    if not destination.exists() or not os.listdir(destination):
        os.replace(staging, destination)  # rename(2) replaces an empty folder
        return
    old = staging.with_name(staging.name + ".old")
    os.replace(destination, old)
    try:
        os.replace(staging, destination)
    except OSError:
        os.replace(old, destination)
        raise
    shutil.rmtree(old)


@contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) off until the block is done: renames and clean-ups run whole."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


def os_error_message(error, destination):
    """One line for an OSError met while converting: the output could not be written, or an input read."""
    path = Path(error.filename or destination)

    def output(p):  # the destination, or a staging folder beside it
        return p == destination or (p.parent == destination.parent and p.name.startswith(f".{destination.name}."))

    writing = path == destination.parent or any(output(p) for p in (path, *path.parents))
    reason = error.strerror or str(error)
    return f"cannot write {destination}: {reason}" if writing else f"cannot read {path}: {reason}"


def main():
    parser = cli.ArgumentParser(description="Convert a Hugging Face T5, GPT-2 or Llama-family checkpoint to MLX.")
    parser.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                        help="hub id (t5-small, gpt2-xl, deepseek-ai/deepseek-coder-1.3b-base) or local folder")
    parser.add_argument("--mlx-path", metavar="DIR", help="output folder (default: mlx_models/<last part of --model>); "
                        "an existing one is replaced only if convert.py wrote it")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype")
    parser.add_argument("-q", "--quantize", action="store_true", help="store linear and embedding weights quantized")
    parser.add_argument("--q-bits", type=int, help="with -q: bits per weight, 4 or 8 [4]")
    parser.add_argument("--q-group-size", type=int, help="with -q: weights per scale and bias, 32, 64 or 128 [64]")
    args = parser.parse_args()
    if args.dtype == "float16":
        print("warning: large T5 checkpoints overflow in float16 (feed-forward activations); "
              "prefer bfloat16 or float32", file=sys.stderr)
    try:
        if not args.quantize and (args.q_bits, args.q_group_size) != (None, None):
            raise ConvertError("--q-bits and --q-group-size go with -q/--quantize")
        quantization = None
        if args.quantize:
            quantization = quantization_settings(args.q_bits or 4, args.q_group_size or 64)
        path = convert(args.model, args.mlx_path, args.dtype, quantization=quantization)
    except (ConvertError, model.LoadError) as error:
        cli.fail(error)
    except OSError as error:  # outside the writing: e.g. a folder that cannot be listed
        cli.fail(f"{error.filename}: {error.strerror}" if error.filename else error)
    except KeyboardInterrupt:
        cli.fail("interrupted; no partial output was left")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
