"""Quantized conversion (convert.py -q) and loading: sizes, layers, exactness, memory."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import OFTEN, ROOT, one_error_line, run_script

import convert
import decoder
import model
import synthetic

PROMPTS = [
    "Return the number of items in the collection.",
    "Create a new parser with the given options and a default formatter for help",
    "Close the file.",
]
MAX_TOKENS = 30
# The pair conftest's pair_dirs builds at OFTEN, kept here in Hugging Face form to convert at each setting.
PAIR = dict(draft_layers=1, target_layers=3, d_model=64, gated=True, eps=OFTEN)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(target, draft) Hugging Face folders of a tiny pair that agrees often."""
    draft, target = synthetic.speculative_pair(tmp_path_factory.mktemp("hf"), **PAIR)
    return target, draft


@pytest.fixture(scope="module")
def converted(hf_pair, tmp_path_factory):
    """folder(which, bits, dtype) -> the converted folder; bits None is float; built once each."""
    made = {}

    def folder(which, bits=None, dtype="float32", group_size=64):
        key = (which, bits, dtype, group_size)
        if key not in made:
            quantization = convert.quantization_settings(bits, group_size) if bits else None
            source = hf_pair[0 if which == "target" else 1]
            out = tmp_path_factory.mktemp(f"{which}-{bits}-{dtype}-{group_size}")
            made[key] = convert.convert(str(source), str(out / "model"), dtype, quantization=quantization)
        return made[key]

    return folder


def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_folder_loads_as_quantized_layers(converted, bits):
    folder = converted("target", bits)
    assert json.loads((folder / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": bits}
    target, _ = model.load(folder)
    layers = dict(target.named_modules())
    assert isinstance(layers["shared"], nn.QuantizedEmbedding)
    assert isinstance(layers["decoder.layers.0.ffn.wo"], nn.QuantizedLinear)
    assert isinstance(layers["lm_head"], nn.QuantizedLinear)  # this pair is v1.1: untied head
    assert layers["shared"].bits == bits and layers["shared"].group_size == 64
    # Packed weights stay packed; norms and position biases stay float.
    assert layers["encoder.layers.0.self_attn.q"].weight.dtype == mx.uint32
    assert target.encoder.final_norm.weight.dtype == mx.float32
    assert target.decoder.position_bias.weight.dtype == mx.float32


@pytest.mark.parametrize("bits, tolerance", [(8, 0.03), (4, 0.4)])
def test_quantized_logits_stay_near_float(converted, bits, tolerance):
    """Against the float32 model (itself checked against transformers in test_model.py)."""
    reference, tokenizer = model.load(converted("target"))
    quantized, _ = model.load(converted("target", bits))
    ids = prompt_ids(tokenizer)
    encoder_ids, decoder_ids = mx.array([ids[0]]), mx.array([[0] + ids[1]])
    expected, got = reference(encoder_ids, decoder_ids), quantized(encoder_ids, decoder_ids)
    relative = mx.abs(got - expected).max() / mx.abs(expected).max()
    assert 0 < relative.item() < tolerance, relative.item()


def test_group_size_too_wide_keeps_those_weights_float(converted):
    """d_model 64 cannot be cut in groups of 128: those layers stay float, the d_ff-wide ones quantize."""
    target, _ = model.load(converted("target", 4, group_size=128))
    layers = dict(target.named_modules())
    assert isinstance(layers["shared"], nn.Embedding)
    assert isinstance(layers["decoder.layers.0.self_attn.q"], nn.Linear)
    assert isinstance(layers["decoder.layers.0.ffn.wo"], nn.QuantizedLinear)
    reference, _ = model.load(converted("target"))
    assert mx.array_equal(layers["shared"].weight, reference.shared.weight)


def greedy_check(target, draft, tokenizer):
    """Speculative greedy output equals the target's own plain greedy output, for every num-draft."""
    for ids in prompt_ids(tokenizer):
        expected = list(decoder.generate(target, ids, MAX_TOKENS))
        assert len(set(expected)) >= 5, expected  # a target repeating one token would prove little
        for k in (1, 3, 6):
            assert list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, num_draft=k)) == expected, k


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("draft_bits", ["same", None])
def test_speculative_equals_quantized_target_greedy(converted, bits, draft_bits):
    target, tokenizer = model.load(converted("target", bits))
    draft, _ = model.load(converted("draft", bits if draft_bits == "same" else None))
    greedy_check(target, draft, tokenizer)


@pytest.mark.parametrize("bits", [4, 8])
def test_bfloat16_float_parts_with_quantized_weights(converted, bits):
    folder = converted("target", bits, "bfloat16")
    target, tokenizer = model.load(folder, mx.bfloat16)
    assert target.shared.scales.dtype == mx.bfloat16 and target.encoder.final_norm.weight.dtype == mx.bfloat16
    assert target.shared.weight.dtype == mx.uint32
    draft, _ = model.load(converted("draft", bits, "bfloat16"), mx.bfloat16)
    greedy_check(target, draft, tokenizer)


def folder_bytes(folder):
    return sum(f.stat().st_size for f in folder.iterdir())


def test_four_bit_folder_is_under_three_tenths_of_float32(tmp_path):
    # About 8M parameters (32 MB in float32), so the tokenizer and config do not dominate.
    config = synthetic.t5_config(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=4, num_decoder_layers=4)
    source = synthetic.save_checkpoint(tmp_path / "hf", config, synthetic.random_weights(config))
    float32 = convert.convert(str(source), str(tmp_path / "float32"))
    four_bit = convert.convert(str(source), str(tmp_path / "4bit"), quantization=convert.quantization_settings(4))
    assert folder_bytes(float32) > 30e6
    assert folder_bytes(four_bit) <= 0.3 * folder_bytes(float32)


def test_cli_quantizes_and_says_what_stays_float(hf_pair, tmp_path):
    result = run_script("convert.py", "--model", hf_pair[1], "--mlx-path", tmp_path / "q", "-q", "--q-bits", "8",
                        "--q-group-size", "128")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"group_size": 128, "bits": 8}
    assert "stay float" in result.stderr and "not a multiple of 128" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["-q", "--q-bits", "3"], "--q-bits must be one of 4, 8"),
    (["-q", "--q-group-size", "48"], "--q-group-size must be one of 32, 64, 128"),
    (["--q-bits", "8"], "go with -q/--quantize"),
])
def test_cli_bad_quantization_flags(hf_pair, tmp_path, flags, message):
    result = run_script("convert.py", "--model", hf_pair[1], "--mlx-path", tmp_path / "q", *flags)
    assert message in one_error_line(result)
    assert not (tmp_path / "q").exists()


# Peak RSS is read from /proc/self/status (VmHWM: this process's own high-water mark).
# resource.getrusage's ru_maxrss would not do: a child starts with its parent's peak
# (Linux carries it across fork and exec), so after a big parent it never rises.
LOAD_PEAK = """
import sys
sys.path.insert(0, {root!r})
import cpu_blas, model
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten

def status(key):
    return 1024 * int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))

base = status("VmRSS")
loaded = model.load_model(Path(sys.argv[1]), getattr(mx, sys.argv[2]))
print(status("VmHWM") - base, sum(p.nbytes for _, p in tree_flatten(loaded.parameters())))
"""


def load_peak(folder, dtype):
    """(peak RSS growth while loading, the loaded model's bytes), in a fresh process."""
    script = LOAD_PEAK.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, str(folder), dtype], capture_output=True, text=True,
                            check=True)
    return tuple(map(int, result.stdout.split()))


@pytest.fixture(scope="module")
def medium_folders(tmp_path_factory):
    """A float32 T5 of about 100 MB, converted to float32, bfloat16 and 4-bit folders."""
    root = tmp_path_factory.mktemp("medium")
    config = synthetic.t5_config(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=4, num_decoder_layers=4,
                                 vocab_size=32128)
    source = synthetic.save_checkpoint(root / "hf", config, synthetic.random_weights(config))
    settings = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
                "4bit": ("bfloat16", convert.quantization_settings(4))}
    return {name: convert.convert(str(source), str(root / name), dtype, quantization=quantization)
            for name, (dtype, quantization) in settings.items()}


# Loading's own overhead beside the weights (module objects, allocator pages), measured near 4 MB.
OVERHEAD = 8e6
EMBEDDING_FLOAT32 = 32128 * 512 * 4  # the medium model's largest tensor


@pytest.mark.parametrize("name, dtype", [("float32", "float32"), ("bfloat16", "bfloat16"), ("4bit", "bfloat16")])
def test_loading_peak_is_about_the_model_size(medium_folders, name, dtype):
    peak, size = load_peak(medium_folders[name], dtype)
    assert 0.8 * size <= peak <= 1.15 * size + OVERHEAD, (peak / size, size)


def test_casting_on_load_holds_one_float32_tensor_at_a_time(medium_folders):
    """A float32 folder loaded as bfloat16: never a float32 copy of the model, only of its largest tensor."""
    peak, size = load_peak(medium_folders["float32"], "bfloat16")
    assert peak <= 1.15 * size + EMBEDDING_FLOAT32 + OVERHEAD, (peak / size, size)
