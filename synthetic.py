"""Offline checkpoints (T5, GPT-2, Llama): tokenizers trained on local text and random weights.

Used by the tests and by benchmark.py, so that everything runs with no model hub. The
checkpoints are written in Hugging Face's format (config.json, safetensors or
pytorch_model.bin, tokenizer files), exactly what convert.py reads from the hub.
"""

import importlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import files

# Standard-library modules whose docstrings are the tokenizer's training text.
CORPUS_MODULES = (
    "argparse", "collections", "csv", "dataclasses", "datetime", "decimal", "email", "fractions",
    "functools", "heapq", "http.client", "inspect", "json", "logging", "pathlib", "random",
    "statistics", "string", "textwrap", "typing", "unittest", "urllib.parse", "zipfile",
)
EXTRA_IDS = 100
BPE_SPECIAL = "<|endoftext|>"  # id 0 of the byte-level BPE: BOS and EOS, as in GPT-2
# Where tokenizers and pairs are built once and reused; MLX_T5_SYNTHETIC_CACHE moves it
# (the tests point it at a folder of their own, away from the pairs a user built).
CACHE = Path(os.environ.get("MLX_T5_SYNTHETIC_CACHE") or Path(tempfile.gettempdir()) / "t5-speculative-synthetic")


def corpus_sentences():
    """Lines of the docstrings of CORPUS_MODULES, in a fixed order, read in a fresh interpreter.

    Read in this process they would depend on what it imported first (typing_extensions,
    which transformers imports, replaces typing._collect_parameters and its docstring; torch
    replaces more), and so would the tokenizers trained on them. The fresh interpreter loads
    typing_extensions, as the process that trained the tokenizers the tests were tuned on did.
    """
    code = ("try:\n    import typing_extensions\nexcept ImportError:\n    pass\n"
            "import json, synthetic\nprint(json.dumps(synthetic.docstring_lines()))")
    child = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, check=True)
    return json.loads(child.stdout)


def docstring_lines():
    """Lines of the docstrings of CORPUS_MODULES as this process sees them (see corpus_sentences)."""
    lines = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        for _, member in sorted(inspect.getmembers(module), key=lambda item: item[0]):
            doc = inspect.getdoc(member) if inspect.isfunction(member) or inspect.isclass(member) else None
            lines.extend(line.strip() for line in (doc or "").splitlines() if len(line.strip()) > 20)
    return lines


def train_tokenizer(folder, vocab_size=1000, kind="t5"):
    """Write a tokenizer into `folder`; return its length.

    kind "t5": sentencepiece unigram (pad 0, eos 1, unk 2), vocab_size pieces plus 100
    <extra_id_*> tokens. kind "bpe": byte-level BPE as GPT-2 and Llama 3 use, with
    <|endoftext|> (id 0) as BOS and EOS.
    """
    cached = cached_tokenizer(vocab_size, kind)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for file in cached.iterdir():
        shutil.copyfile(file, folder / file.name)
    return tokenizer_size(vocab_size, kind)


def cached_tokenizer(vocab_size=1000, kind="t5"):
    """The folder of the tokenizer trained once per kind and vocab_size under CACHE."""
    cached = CACHE / (f"tokenizer-{vocab_size}" if kind == "t5" else f"{kind}-tokenizer-{vocab_size}")
    if (cached / "tokenizer.json").is_file():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = files.temporary_folder(cached)  # renamed whole, so a reader never sees half of it
    try:
        # transformers writes the files; its import-time advice ("PyTorch was not found ...",
        # on a machine set up from requirements.txt) is no news to someone building a pair.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        (write_tokenizer if kind == "t5" else write_bpe_tokenizer)(staging, vocab_size)
        staging.rename(cached)
    except OSError:
        if not (cached / "tokenizer.json").is_file():  # else another process cached it first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def write_tokenizer(folder, vocab_size):
    """Train sentencepiece on CORPUS_MODULES' docstrings; save it as Hugging Face's T5Tokenizer."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_sentences()), model_writer=proto, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    model = sentencepiece_model_pb2.ModelProto.FromString(proto.getvalue())
    # transformers 5 builds T5Tokenizer from (piece, score) pairs and ignores a vocab file;
    # the extra ids close the vocabulary in reverse, as in Google's T5 (<extra_id_0> last).
    vocab = [(piece.piece, piece.score) for piece in model.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]
    tokenizer = T5Tokenizer(
        vocab=vocab, extra_ids=EXTRA_IDS, _spm_precompiled_charsmap=model.normalizer_spec.precompiled_charsmap,
    )
    tokenizer.save_pretrained(str(folder))
    (folder / "spiece.model").write_bytes(proto.getvalue())


def write_bpe_tokenizer(folder, vocab_size):
    """Train a byte-level BPE on CORPUS_MODULES' docstrings; save it as a fast tokenizer.

    Written as tokenizer.json and tokenizer_config.json, and as GPT-2's vocab.json and
    merges.txt too, the files a GPT-2 checkpoint on the hub carries.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_sentences(), vocab_size=vocab_size, special_tokens=[BPE_SPECIAL], show_progress=False)
    bpe.save_model(str(folder))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BPE_SPECIAL, eos_token=BPE_SPECIAL)
    tokenizer.save_pretrained(str(folder))


def tokenizer_size(vocab_size=1000, kind="t5"):
    """How many tokens the cached tokenizer has (its tokenizer.json lists them all)."""
    tokenizer = json.loads((cached_tokenizer(vocab_size, kind) / "tokenizer.json").read_text())
    return len(tokenizer["model"]["vocab"])


def t5_config(vocab_size=None, gated=False, **overrides):
    """A Hugging Face T5 config: v1 (relu, tied head) or v1.1 (gated-gelu, untied).

    vocab_size defaults to the tokenizer's length rounded up to a multiple of 8, so the
    model has a few ids the tokenizer lacks, like Google's checkpoints (32128 vs 32100).
    """
    if vocab_size is None:
        vocab_size = -(-tokenizer_size() // 8) * 8
    config = dict(
        model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=vocab_size,
        d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        layer_norm_epsilon=1e-6, initializer_factor=1.0, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=True,
    )
    config.update(overrides)
    return config


def layer_shapes(config, stack, index):
    """Hugging Face names and shapes of one encoder or decoder block, with init std factors."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    prefix = f"{stack}.block.{index}.layer"
    attention = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
    shapes = {}
    for i, name in enumerate(attention):
        shapes[f"{prefix}.{i}.{name}.q.weight"] = ((inner, d), (d * config["d_kv"]) ** -0.5)
        shapes[f"{prefix}.{i}.{name}.k.weight"] = ((inner, d), d**-0.5)
        shapes[f"{prefix}.{i}.{name}.v.weight"] = ((inner, d), d**-0.5)
        shapes[f"{prefix}.{i}.{name}.o.weight"] = ((d, inner), inner**-0.5)
        shapes[f"{prefix}.{i}.layer_norm.weight"] = ((d,), None)
    ffn = f"{prefix}.{len(attention)}"
    inputs = ["wi_0", "wi_1"] if config.get("feed_forward_proj", "relu").startswith("gated") else ["wi"]
    for name in inputs:
        shapes[f"{ffn}.DenseReluDense.{name}.weight"] = ((ff, d), d**-0.5)
    shapes[f"{ffn}.DenseReluDense.wo.weight"] = ((d, ff), ff**-0.5)
    shapes[f"{ffn}.layer_norm.weight"] = ((d,), None)
    if index == 0:
        buckets = config.get("relative_attention_num_buckets", 32)
        shapes[f"{prefix}.0.SelfAttention.relative_attention_bias.weight"] = ((buckets, config["num_heads"]), d**-0.5)
    return shapes


def t5_shapes(config):
    """Hugging Face names, shapes and init std (None: a norm) of a T5, as transformers initialises it."""
    factor = config.get("initializer_factor", 1.0)
    d = config["d_model"]
    decoder_layers = config.get("num_decoder_layers") or config["num_layers"]
    shapes = {"shared.weight": ((config["vocab_size"], d), 1.0)}
    for stack, count in (("encoder", config["num_layers"]), ("decoder", decoder_layers)):
        for index in range(count):
            shapes.update(layer_shapes(config, stack, index))
        shapes[f"{stack}.final_layer_norm.weight"] = ((d,), None)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = ((config["vocab_size"], d), 1.0)
    return {name: (shape, None if std is None else factor * std) for name, (shape, std) in shapes.items()}


def gpt2_config(vocab_size=None, **overrides):
    """A Hugging Face GPT-2 config (tied head), tiny unless overridden, for the BPE tokenizer."""
    config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab_size or tokenizer_size(kind="bpe"),
        n_embd=64, n_layer=2, n_head=4, n_positions=512, n_inner=None, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )
    config.update(overrides)
    return config


def gpt2_shapes(config):
    """Hugging Face names, shapes and init std of a GPT-2 (Conv1D weights stored (in, out))."""
    d, std = config["n_embd"], config.get("initializer_range", 0.02)
    inner = config.get("n_inner") or 4 * d
    shapes = {"transformer.wte.weight": ((config["vocab_size"], d), std),
              "transformer.wpe.weight": ((config["n_positions"], d), std)}
    for i in range(config["n_layer"]):
        for name, (rows, cols) in {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d),
                                   "mlp.c_fc": (d, inner), "mlp.c_proj": (inner, d)}.items():
            shapes[f"transformer.h.{i}.{name}.weight"] = ((rows, cols), std)
            shapes[f"transformer.h.{i}.{name}.bias"] = ((cols,), std)
        for norm in ("ln_1", "ln_2"):
            shapes.update(layer_norm_shapes(f"transformer.h.{i}.{norm}", d))
    shapes.update(layer_norm_shapes("transformer.ln_f", d))
    return shapes


def layer_norm_shapes(prefix, width):
    return {f"{prefix}.weight": ((width,), None), f"{prefix}.bias": ((width,), 0.1)}


def llama_config(vocab_size=None, **overrides):
    """A Hugging Face Llama config (grouped-query attention, untied head), tiny unless overridden."""
    config = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab_size or tokenizer_size(kind="bpe"),
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        attention_bias=False, mlp_bias=False, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0,
    )
    config.update(overrides)
    return config


def llama_shapes(config):
    """Hugging Face names, shapes and init std of a Llama (or Qwen2: q/k/v biases)."""
    d, std = config["hidden_size"], config.get("initializer_range", 0.02)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    ff = config["intermediate_size"]
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    o_bias = config["model_type"] != "qwen2" and config.get("attention_bias", False)
    shapes = {"model.embed_tokens.weight": ((config["vocab_size"], d), std), "model.norm.weight": ((d,), None)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        outputs = {"q_proj": heads * head_dim, "k_proj": kv, "v_proj": kv}
        for name, width in outputs.items():
            shapes[f"{prefix}.self_attn.{name}.weight"] = ((width, d), std)
            if qkv_bias:
                shapes[f"{prefix}.self_attn.{name}.bias"] = ((width,), std)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = ((d, heads * head_dim), std)
        if o_bias:
            shapes[f"{prefix}.self_attn.o_proj.bias"] = ((d,), std)
        for name, shape in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            shapes[f"{prefix}.mlp.{name}.weight"] = (shape, std)
            if config.get("mlp_bias", False):
                shapes[f"{prefix}.mlp.{name}.bias"] = (shape[:1], std)
        shapes[f"{prefix}.input_layernorm.weight"] = ((d,), None)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = ((d,), None)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = ((config["vocab_size"], d), std)
    return shapes


SHAPES = {"t5": t5_shapes, "gpt2": gpt2_shapes, "llama": llama_shapes, "qwen2": llama_shapes}


def tensor_shapes(config):
    """{Hugging Face name: (shape, init std or None for norms)} of a config's tensors, for its family."""
    return SHAPES[config["model_type"]](config)


def random_tensor(shape, std, rng):
    """Drawn as transformers initialises it; norms (std None) near 1 rather than 1, so a test notices a dropped norm."""
    if std is None:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (std * rng.standard_normal(shape)).astype(np.float32)


def random_weights(config, seed=0):
    """Float32 weights in Hugging Face's names, drawn with the std the family's init uses."""
    rng = np.random.default_rng(seed)
    return {name: random_tensor(shape, std, rng) for name, (shape, std) in tensor_shapes(config).items()}


def save_checkpoint(folder, config, weights, shards=1, fmt="safetensors"):
    """Write a Hugging Face checkpoint: config, tokenizer files, and weights in `shards` files."""
    names = list(weights)
    groups = ({name: weights[name] for name in names[i::shards]} for i in range(shards))
    return save_groups(folder, config, groups, shards, fmt)


def save_groups(folder, config, groups, count, fmt="safetensors"):
    """Write a checkpoint whose weights come as `count` dicts, one file each, held one at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, kind="t5" if config["model_type"] == "t5" else "bpe")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files = [f"{stem}.{suffix}"] if count == 1 else [f"{stem}-{i + 1:05d}-of-{count:05d}.{suffix}" for i in range(count)]
    weight_map, total = {}, 0
    for file, group in zip(files, groups):
        write_weights(folder / file, group, fmt)
        weight_map.update(dict.fromkeys(group, file))
        total += sum(w.nbytes for w in group.values())
    if count > 1:
        index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_weights(path, weights, fmt):
    """One weight file: safetensors (no torch needed) or a torch.save'd state dict."""
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(weights, str(path), metadata={"format": "pt"})
    else:
        import torch

        torch.save({name: torch.from_numpy(array) for name, array in weights.items()}, str(path))


# Per family: the config builder, its layer-count keys, and the shape settings of a pair
# whose width is d_model.
PAIR_FAMILIES = {
    "t5": (t5_config, ("num_layers", "num_decoder_layers"),
           lambda d: dict(d_model=d, d_kv=d // 8, num_heads=8, d_ff=4 * d)),
    "gpt2": (gpt2_config, ("n_layer",), lambda d: dict(n_embd=d, n_head=8)),
    "llama": (llama_config, ("num_hidden_layers",),
              lambda d: dict(hidden_size=d, num_attention_heads=8, num_key_value_heads=4, intermediate_size=3 * d)),
}
# A layer's index in a Hugging Face name, and the projections that write into the residual stream.
LAYER_INDEX = re.compile(r"\.(?:block|h|layers)\.(\d+)\.")
OUTPUT_PROJECTION = re.compile(r".*\.(o|wo|c_proj|o_proj|down_proj)\.(weight|bias)")


def speculative_pair(folder, draft_layers=2, target_layers=24, d_model=512, eps=0.05, seed=0, family="t5",
                     **overrides):
    """Save a draft and a target whose agreement eps controls; return their folders.

    The target copies the draft's embeddings, positions, norms and layers, and adds
    target_layers - draft_layers random layers after them (in T5's encoder and decoder
    both), whose outputs into the residual stream (attention and feed-forward output
    projections, with their biases) are scaled by eps. At eps 0 the target computes the
    draft's function exactly. Both hold the same tokenizer.
    """
    folder = Path(folder)
    make_config, layer_keys, widths = PAIR_FAMILIES[family]
    # Exactly the tokenizer's length (no rounding): every id either model emits decodes.
    vocab = tokenizer_size(kind="t5" if family == "t5" else "bpe")
    settings = dict(widths(d_model), **overrides)
    draft_config = make_config(vocab, **settings, **dict.fromkeys(layer_keys, draft_layers))
    target_config = dict(draft_config, **dict.fromkeys(layer_keys, target_layers))
    draft = random_weights(draft_config, seed)
    target = random_weights(target_config, seed + 1)
    target.update(draft)  # the shared layers, embeddings, positions and final norms
    for name in target:
        layer = LAYER_INDEX.search(name)
        if layer is not None and int(layer.group(1)) >= draft_layers and OUTPUT_PROJECTION.fullmatch(name):
            target[name] = target[name] * np.float32(eps)
    return save_checkpoint(folder / "draft", draft_config, draft), save_checkpoint(folder / "target", target_config, target)


# Google's T5 v1 checkpoints (relu, tied head, vocabulary 32128), as their config.json say.
T5_VOCAB = 32128
T5_SHAPES = {
    "t5-small": dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6),
    "t5-base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=12),
    "t5-large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_layers=24),
    "t5-3b": dict(d_model=1024, d_kv=128, num_heads=32, d_ff=16384, num_layers=24),
    "t5-11b": dict(d_model=1024, d_kv=128, num_heads=128, d_ff=65536, num_layers=24),
}


def real_config(name, **overrides):
    """The config of Google's checkpoint `name` (a T5_SHAPES key), overrides applied."""
    shape = T5_SHAPES[name]
    return t5_config(T5_VOCAB, **dict(shape, num_decoder_layers=shape["num_layers"], **overrides))


# The t5-3b preset: T5-3B's shapes over T5-small's. Both untie the head (33M parameters,
# 1.2% of the target): random weights with T5's tied head repeat one token (1 to 3
# distinct tokens in 40 at initializer factors 1 to 30), which would make acceptance
# meaningless. Factor 3 gives the most varied output of those tried.
PRESETS = {"t5-3b": ("t5-3b", "t5-small")}
PRESET_SETTINGS = dict(tie_word_embeddings=False, initializer_factor=3.0)
# Tuned by counting greedy acceptance (g 3, 3 prompts x 24 tokens, no timing) with the built
# target's eps-scaled weights rescaled in memory:
#   eps   0.05  0.02  0.01  0.005  0.004  0.003
#   a     0.10  0.06  0.22  0.64   0.44   0.48
# Its 16384-wide feed-forward layers and 32 heads stray much further per unit of eps than
# the default pair's; below 0.01 acceptance is near 0.5-0.65 but noisy from prompt to prompt.
PRESET_EPS = 0.005
SHARD_BYTES = 1 << 30


def silent_ids(weights, config):
    """Zero the head rows of ids past the tokenizer, so no generated id lacks a piece.

    Their logit is then exactly 0, below the largest of the tokenizer's ~1100 random
    logits at every greedy step (decoding would drop such ids silently).
    """
    weights["lm_head.weight"][tokenizer_size():] = 0
    return weights


def embed(target, draft, name, draft_config, target_config):
    """Write `draft` into the leading corner of `target`: its heads, hidden units and residual dims first."""
    heads, kv, d = draft_config["num_heads"], draft_config["d_kv"], draft_config["d_model"]
    target_kv, wide = target_config["d_kv"], target_config["d_model"]
    kind = name.split(".")[-2]
    if kind in ("q", "k", "v"):
        target.reshape(-1, target_kv, wide)[:heads, :kv, :d] = draft.reshape(heads, kv, d)
    elif kind == "o":
        target.reshape(wide, -1, target_kv)[:d, :heads, :kv] = draft.reshape(d, heads, kv)
    elif kind == "relative_attention_bias":
        target[:, :heads] = draft
    elif target.ndim == 1:
        # RMSNorm over the wider stream divides by an rms sqrt(wide / d) times smaller
        # (the extra dims hold next to nothing): the weights undo it.
        target[:d] = draft / np.sqrt(wide / d)
    else:
        target[: draft.shape[0], : draft.shape[1]] = draft
    return target


def widened_tensor(name, shape, std, draft, draft_config, target_config, eps, rng):
    """One target tensor: random, with its output side scaled by eps, and the draft's tensor embedded.

    What the draft does not compute reaches the residual stream (and the logits) only
    through eps: attention and feed-forward output projections, the embedding's and the
    head's extra columns, and the query dims the draft's heads lack (their scores stay the draft's).
    """
    array = random_tensor(shape, std, rng)
    kind = name.split(".")[-2]
    if kind in ("o", "wo", "shared", "lm_head"):
        array *= np.float32(eps)
    if kind == "q" and name in draft:
        array.reshape(-1, target_config["d_kv"], shape[1])[: draft_config["num_heads"]] *= np.float32(eps)
    if name in draft:
        embed(array, draft[name], name, draft_config, target_config)
    return array


def shard_names(shapes, max_bytes=SHARD_BYTES):
    """Tensor names grouped into runs of at most max_bytes of float32 (one tensor may exceed it)."""
    groups, size = [[]], 0
    for name, (shape, _) in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def widened_pair(folder, draft_config, target_config, eps, seed=0):
    """Save a draft and a wider, deeper target that computes the draft's function at eps 0.

    The target holds the draft in the first heads, hidden units and residual dims of its
    first layers; its other layers are random with output projections scaled by eps. It
    is written a shard at a time: memory holds the draft and one shard of the target.
    """
    folder = Path(folder)
    draft = silent_ids(random_weights(draft_config, seed), draft_config)
    shapes = tensor_shapes(target_config)
    groups = shard_names(shapes)

    def target_groups():
        for names in groups:
            group = {}
            for name in names:
                rng = np.random.default_rng([seed + 1, list(shapes).index(name)])
                group[name] = widened_tensor(name, *shapes[name], draft, draft_config, target_config, eps, rng)
            if "lm_head.weight" in group:
                silent_ids(group, target_config)
            yield group

    target = save_groups(folder / "target", target_config, target_groups(), len(groups))
    return save_checkpoint(folder / "draft", draft_config, draft), target


def preset_pair(name, eps=PRESET_EPS, seed=0, keep_hf=False):
    """Folders of a preset pair, converted for MLX (and as Hugging Face checkpoints with keep_hf).

    Built once under CACHE. The Hugging Face copy is written only when it is wanted or
    the MLX folders are missing, and removed after conversion unless kept.
    """
    import convert

    target_name, draft_name = PRESETS[name]
    root = CACHE / f"preset-{name}-eps{eps}-seed{seed}"
    folders = {"target": root / "mlx-target", "draft": root / "mlx-draft",
               "hf_target": root / "hf" / "target", "hf_draft": root / "hf" / "draft"}
    converted = (folders["draft"] / "config.json").is_file()
    if (keep_hf or not converted) and not (folders["hf_draft"] / "config.json").is_file():
        print(f"building the {name} pair in {root} ...", file=sys.stderr)
        widened_pair(root / "hf", real_config(draft_name, **PRESET_SETTINGS),
                     real_config(target_name, **PRESET_SETTINGS), eps, seed)
    if not converted:
        for which in ("target", "draft"):  # the draft last: its folder marks a finished build
            convert.convert(str(folders[f"hf_{which}"]), str(folders[which]), max_shard_bytes=SHARD_BYTES)
    if not keep_hf:
        shutil.rmtree(root / "hf", ignore_errors=True)
    return folders


# Weight formats of the memory table: (name, bytes per float, quantization).
FORMATS = [("float32", 4, None), ("bfloat16", 2, None),
           ("8-bit", 2, {"group_size": 64, "bits": 8}), ("4-bit", 2, {"group_size": 64, "bits": 4})]
MAC_GB = (8, 16, 24, 32, 64, 128)


def usable_gb(memory_gb):
    """What a pair may take of a Mac's memory: a quarter (at least 4 GB) stays with the system."""
    return memory_gb - max(4, memory_gb / 4)


def memory_table():
    """README's tables: each checkpoint's size per format, and what a t5-small-drafted pair fits in each Mac."""
    import model

    sizes = {name: [model.weight_bytes(real_config(name), b, q) / 1e9 for _, b, q in FORMATS] for name in T5_SHAPES}
    lines = ["| model | parameters | " + " | ".join(f for f, _, _ in FORMATS) + " |", "|---" * (2 + len(FORMATS)) + "|"]
    for name, row in sizes.items():
        count = model.parameter_count(real_config(name))
        lines.append(f"| {name} | {count / 1e9:.3g} B | " + " | ".join(f"{gb:.2f} GB" for gb in row) + " |")
    lines += ["", "| Mac memory | usable | " + " | ".join(f for f, _, _ in FORMATS) + " |",
              "|---" * (2 + len(FORMATS)) + "|"]
    for memory in MAC_GB:
        fits = []
        for i in range(len(FORMATS)):
            targets = [name for name, row in sizes.items() if row[i] + sizes["t5-small"][i] <= usable_gb(memory)]
            fits.append(targets[-1] if targets else "-")
        lines.append(f"| {memory} GB | {usable_gb(memory):g} GB | " + " | ".join(fits) + " |")
    return "\n".join(lines)
