"""convert.py: every checkpoint layout gives the same MLX weights; bad input fails cleanly."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import convert
import synthetic
from conftest import ROOT


@pytest.fixture(scope="module")
def vocab_size():
    return synthetic.train_tokenizer(synthetic.CACHE / "probe")


@pytest.fixture(scope="module")
def v1(vocab_size):
    """(config, weights) of a tiny v1 T5: relu, tied head."""
    config = synthetic.t5_config(vocab_size)
    return config, synthetic.random_weights(config, seed=1)


@pytest.fixture(scope="module")
def v11(vocab_size):
    """(config, weights) of a tiny v1.1 T5: gated-gelu, untied head."""
    config = synthetic.t5_config(vocab_size, gated=True, num_decoder_layers=3)
    return config, synthetic.random_weights(config, seed=2)


def mlx_weights(folder):
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


def converted(tmp_path, config, weights, **layout):
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights, **layout)
    return convert.convert(str(source), str(tmp_path / "mlx"))


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert mx.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("variant", ["v1", "v11"])
def test_transformers_loads_synthetic_checkpoints(variant, request, tmp_path):
    """The synthetic writer uses Hugging Face's own names: nothing missing or unexpected."""
    from transformers import T5ForConditionalGeneration

    config, weights = request.getfixturevalue(variant)
    synthetic.save_checkpoint(tmp_path, config, weights)
    _, info = T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("variant", ["v1", "v11"])
def test_single_sharded_and_bin_checkpoints_convert_identically(variant, request, tmp_path):
    pytest.importorskip("torch")
    config, weights = request.getfixturevalue(variant)
    single = mlx_weights(converted(tmp_path / "single", config, weights))
    sharded = mlx_weights(converted(tmp_path / "sharded", config, weights, shards=3))
    torch_bin = mlx_weights(converted(tmp_path / "bin", config, weights, fmt="bin"))
    assert_same_weights(single, sharded)
    assert_same_weights(single, torch_bin)
    np.testing.assert_array_equal(np.array(single["shared.weight"]), weights["shared.weight"])
    np.testing.assert_array_equal(
        np.array(single["decoder.layers.0.cross_attn.o.weight"]),
        weights["decoder.block.0.layer.1.EncDecAttention.o.weight"],
    )


def test_output_is_sharded_with_an_index_past_the_shard_size(v1, tmp_path):
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    whole = mlx_weights(convert.convert(str(source), str(tmp_path / "whole")))
    out = convert.convert(str(source), str(tmp_path / "split"), max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == {f.name for f in files}
    assert set(index["weight_map"]) == set(whole)
    assert_same_weights(whole, mlx_weights(out))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_dtype(v1, tmp_path, dtype):
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    out = convert.convert(str(source), str(tmp_path / "mlx"), dtype)
    loaded = mlx_weights(out)
    assert all(w.dtype == getattr(mx, dtype) for w in loaded.values())
    expected = mx.array(weights["shared.weight"]).astype(getattr(mx, dtype))
    assert mx.array_equal(loaded["shared.weight"], expected)


def test_bfloat16_source_converts_to_float32(v1, tmp_path):
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, {})
    as_bf16 = {name: mx.array(w).astype(mx.bfloat16) for name, w in weights.items()}
    mx.save_safetensors(str(source / "model.safetensors"), as_bf16, metadata={"format": "pt"})
    loaded = mlx_weights(convert.convert(str(source), str(tmp_path / "mlx")))
    assert loaded["shared.weight"].dtype == mx.float32
    assert mx.array_equal(loaded["shared.weight"], as_bf16["shared.weight"].astype(mx.float32))


def test_tied_and_untied_heads(v1, v11, tmp_path):
    tied_out = converted(tmp_path / "v1", *v1)
    untied_out = converted(tmp_path / "v11", *v11)
    tied_config = json.loads((tied_out / "config.json").read_text())
    untied_config = json.loads((untied_out / "config.json").read_text())
    assert "lm_head.weight" not in mlx_weights(tied_out)
    assert tied_config["tie_word_embeddings"] and tied_config["scale_decoder_outputs"]
    head = mlx_weights(untied_out)["lm_head.weight"]
    np.testing.assert_array_equal(np.array(head), v11[1]["lm_head.weight"])
    assert not untied_config["tie_word_embeddings"] and not untied_config["scale_decoder_outputs"]


def test_transformers5_style_config_with_separate_head(v11, tmp_path):
    """transformers 5 writes tie_word_embeddings true with scale_decoder_outputs false."""
    config, weights = v11
    config = dict(config, tie_word_embeddings=True, scale_decoder_outputs=False)
    out = json.loads((converted(tmp_path, config, weights) / "config.json").read_text())
    assert out["tie_word_embeddings"] is False and out["scale_decoder_outputs"] is False


def test_duplicated_tied_head_is_kept_once(v1, tmp_path):
    """Old .bin files store lm_head and the embed_tokens copies of shared: one copy survives."""
    config, weights = v1
    copies = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    weights = dict(weights, **{name: weights["shared.weight"] for name in copies})
    loaded = mlx_weights(converted(tmp_path, config, weights))
    assert "lm_head.weight" not in loaded and not any("embed_tokens" in name for name in loaded)


def run_convert(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def bad_inputs(tmp_path, config, weights):
    """Folders convert.py must refuse, by name."""
    missing = tmp_path / "missing"
    no_config = tmp_path / "no-config"
    no_config.mkdir(parents=True)
    not_t5 = synthetic.save_checkpoint(tmp_path / "not-t5", dict(config, model_type="bert"), weights)
    truncated = synthetic.save_checkpoint(tmp_path / "truncated", config, weights)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = synthetic.save_checkpoint(tmp_path / "garbage", config, weights)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    return {"missing": missing, "no-config": no_config, "not-t5": not_t5, "truncated": truncated, "garbage": garbage}


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(v1, tmp_path):
    config, weights = v1
    for name, folder in bad_inputs(tmp_path / "in", config, weights).items():
        out = tmp_path / "out" / name
        result = run_convert("--model", str(folder), "--mlx-path", str(out), cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.strip() and "tensors:" not in line]
        assert result.returncode == 2, (name, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not out.exists(), name
        assert not list((tmp_path / "out").glob(f".{name}*")), name


def test_failed_conversion_keeps_an_existing_output(v1, tmp_path):
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    out = convert.convert(str(source), str(tmp_path / "mlx"))
    before = sorted(p.name for p in out.iterdir())
    (source / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(convert.ConvertError):
        convert.convert(str(source), str(out))
    assert sorted(p.name for p in out.iterdir()) == before


def test_default_destination_and_tokenizer_files(v1, tmp_path):
    config, weights = v1
    synthetic.save_checkpoint(tmp_path / "ckpt" / "my-t5", config, weights)
    result = run_convert("--model", str(tmp_path / "ckpt" / "my-t5"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "mlx_models" / "my-t5"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "spiece.model").is_file() and (out / "tokenizer.json").is_file()


def test_float16_warns(v1, tmp_path):
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    result = run_convert("--model", str(source), "--mlx-path", str(tmp_path / "out"), "--dtype", "float16", cwd=tmp_path)
    assert result.returncode == 0
    assert "overflow" in result.stderr and "float16" in result.stderr


@pytest.mark.parametrize("files,expected", [
    (["config.json", "model.safetensors", "pytorch_model.bin"], "*.safetensors"),
    (["config.json", "pytorch_model.bin", "spiece.model"], "pytorch_model*.bin"),
])
def test_hub_ids_download_only_the_needed_weights(v1, tmp_path, monkeypatch, files, expected):
    """The hub path, offline: huggingface_hub's calls are replaced by a local folder."""
    import huggingface_hub

    config, weights = v1
    local = synthetic.save_checkpoint(tmp_path / "snapshot", config, weights)
    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    out = convert.convert("google/flan-t5-tiny")
    assert asked["repo_id"] == "google/flan-t5-tiny"
    assert expected in asked["patterns"] and "config.json" in asked["patterns"]
    assert out == convert.Path("mlx_models/flan-t5-tiny") and (tmp_path / out / "model.safetensors").is_file()
