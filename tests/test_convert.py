"""convert.py: every checkpoint layout gives the same MLX weights; bad input fails cleanly."""

import importlib.util
import json
import struct
import subprocess
import sys
import types

import mlx.core as mx
import numpy as np
import pytest

import convert
import model
import synthetic
from conftest import ROOT, TINY, one_error_line, run_script


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


def test_tokenizer_encodes_with_eos_and_round_trips(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "Return a new list of the items in the dictionary."
    ids = tokenizer(text).input_ids
    assert len(ids) > 3 and ids[-1] == 1 and all(i > 2 for i in ids[:-1])  # no pad, eos or unk inside
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == synthetic.tokenizer_size() == 1100
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [1099, 1000]


@pytest.mark.parametrize("variant", sorted(TINY))
def test_transformers_loads_synthetic_checkpoints(variant, request):
    """The synthetic writer uses Hugging Face's own names: nothing missing or unexpected."""
    from transformers import T5ForConditionalGeneration

    folder = request.getfixturevalue(f"{variant}_checkpoint")
    hf, info = T5ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.scale_decoder_outputs == (variant != "v11")


def test_speculative_pair_at_eps_0_is_the_draft(tmp_path):
    """At eps 0 the target's extra layers add exactly nothing; at eps > 0 they change the logits."""
    torch = pytest.importorskip("torch")
    from transformers import T5ForConditionalGeneration

    ids = torch.tensor([[5, 17, 300, 42, 9, 1]])
    decoder_ids = torch.tensor([[0, 7, 250, 31]])
    logits = {}
    for eps in (0.0, 0.5):
        folders = synthetic.speculative_pair(tmp_path / str(eps), draft_layers=1, target_layers=3, d_model=32,
                                             eps=eps, gated=True)
        for folder in folders:
            hf = T5ForConditionalGeneration.from_pretrained(folder).eval()
            with torch.no_grad():
                logits[eps, folder.name] = hf(input_ids=ids, decoder_input_ids=decoder_ids).logits
    assert torch.equal(logits[0.0, "draft"], logits[0.0, "target"])
    assert torch.equal(logits[0.0, "draft"], logits[0.5, "draft"])
    assert not torch.allclose(logits[0.5, "draft"], logits[0.5, "target"], atol=1e-3)


def test_synthetic_needs_no_torch(tmp_path):
    """benchmark.py builds its pair with synthetic.py where torch is not installed."""
    script = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` fails, as if not installed
        "import pathlib, synthetic\n"
        "synthetic.CACHE = pathlib.Path(sys.argv[1]) / 'cache'\n"  # train the tokenizer afresh
        "draft, target = synthetic.speculative_pair(pathlib.Path(sys.argv[1]), 1, 2, d_model=32)\n"
        "print(sorted(p.name for p in target.iterdir()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model.safetensors" in result.stdout and "spiece.model" in result.stdout


@pytest.mark.parametrize("variant", sorted(TINY))
def test_converted_checkpoints_load_in_mlx(variant, request, tmp_path):
    """Every name and shape convert.py writes is one the MLX model expects (strict loading)."""
    out = convert.convert(str(request.getfixturevalue(f"{variant}_checkpoint")), str(tmp_path / "mlx"))
    _, tokenizer = model.load(out)
    assert len(tokenizer) == synthetic.tokenizer_size()


@pytest.mark.parametrize("variant", sorted(TINY))
def test_single_sharded_and_bin_checkpoints_convert_identically(variant, request, tmp_path):
    pytest.importorskip("torch")
    config, weights = request.getfixturevalue(variant)
    single = mlx_weights(converted(tmp_path / "single", config, weights))
    sharded = mlx_weights(converted(tmp_path / "sharded", config, weights, shards=3))
    torch_bin = mlx_weights(converted(tmp_path / "bin", config, weights, fmt="bin"))
    torch_shards = mlx_weights(converted(tmp_path / "bin-sharded", config, weights, shards=2, fmt="bin"))
    for other in (sharded, torch_bin, torch_shards):
        assert_same_weights(single, other)
    np.testing.assert_array_equal(np.array(single["shared.weight"]), weights["shared.weight"])
    np.testing.assert_array_equal(
        np.array(single["decoder.layers.0.cross_attn.o.weight"]),
        weights["decoder.block.0.layer.1.EncDecAttention.o.weight"],
    )


def test_legacy_torch_format_converts(v1, tmp_path):
    """pytorch_model.bin files saved before torch 1.6 cannot be memory-mapped; they still convert."""
    torch = pytest.importorskip("torch")
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, {})
    (source / "model.safetensors").unlink()
    state = {name: torch.from_numpy(w) for name, w in weights.items()}
    torch.save(state, source / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = mlx_weights(convert.convert(str(source), str(tmp_path / "mlx")))
    norm = np.array(loaded["encoder.final_norm.weight"])
    np.testing.assert_array_equal(norm, weights["encoder.final_layer_norm.weight"])


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
    return run_script("convert.py", *args, cwd=cwd, timeout=120)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bad_inputs(tmp_path, config, weights):
    """Folders convert.py must refuse, by name."""
    missing = tmp_path / "missing"
    no_config = tmp_path / "no-config"
    no_config.mkdir(parents=True)
    not_t5 = synthetic.save_checkpoint(tmp_path / "not-t5", dict(config, model_type="bert"), weights)
    truncated = synthetic.save_checkpoint(tmp_path / "truncated", config, weights)
    truncate(truncated / "model.safetensors")
    garbage = synthetic.save_checkpoint(tmp_path / "garbage", config, weights)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    folders = {"missing": missing, "no-config": no_config, "not-t5": not_t5, "truncated": truncated,
               "garbage": garbage}
    if importlib.util.find_spec("torch"):
        folders["truncated-bin"] = synthetic.save_checkpoint(tmp_path / "truncated-bin", config, weights, fmt="bin")
        truncate(folders["truncated-bin"] / "pytorch_model.bin")
    return folders


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(v1, tmp_path):
    config, weights = v1
    for name, folder in bad_inputs(tmp_path / "in", config, weights).items():
        out = tmp_path / "out" / name
        line = one_error_line(run_convert("--model", str(folder), "--mlx-path", str(out), cwd=tmp_path))
        assert not out.exists(), name
        assert not list((tmp_path / "out").glob(f".{name}*")), name
        if name == "not-t5":
            assert "bert" in line


def test_bin_without_torch_is_one_line(v1, tmp_path):
    pytest.importorskip("torch")
    source = synthetic.save_checkpoint(tmp_path / "hf", *v1, fmt="bin")
    script = "import sys, runpy; sys.modules['torch'] = None; runpy.run_path('convert.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", script, "--model", str(source), "--mlx-path", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "install torch" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def with_header(path, edit):
    """Rewrite a safetensors file's JSON header through `edit`, keeping its data."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + length]))
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def first_tensor_shape(header, shape):
    name = next(key for key in header if key != "__metadata__")
    header[name]["shape"] = shape
    return header


@pytest.mark.parametrize("case,message", [
    ("unknown tensor", "unexpected tensor 'encoder.extra.weight'"),
    ("missing tensor", r"lacks 1 tensor\(s\) .* 'decoder.layers.1.ffn.wo.weight'"),
    ("layer beyond the config", "not part of the model"),
    ("wrong shape", "config.json implies"),
    ("bad header shape", "do not fit its shape"),
    ("missing config key", "'d_model' must be a positive integer"),
    ("destination is a file", "is not a folder"),
])
def test_inconsistent_checkpoints_are_refused(v1, tmp_path, case, message):
    config, weights = v1
    weights = dict(weights)
    first = "encoder.block.0.layer.0.SelfAttention.q.weight"
    if case == "unknown tensor":
        weights["encoder.extra.weight"] = weights[first]
    if case == "missing tensor":
        del weights["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    if case == "layer beyond the config":
        weights[first.replace("block.0", "block.7")] = weights[first]
    if case == "wrong shape":
        weights[first] = weights[first][:, :-1].copy()
    if case == "missing config key":
        config = {k: v for k, v in config.items() if k != "d_model"}
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    if case == "bad header shape":
        with_header(source / "model.safetensors", lambda header: first_tensor_shape(header, [3, 5]))
    out = tmp_path / "out" / "mlx"
    out.parent.mkdir()
    if case == "destination is a file":
        out.write_text("not a model")
    with pytest.raises(convert.ConvertError, match=message):
        convert.convert(str(source), str(out))
    assert sorted(p.name for p in out.parent.iterdir()) == (["mlx"] if out.is_file() else [])


def test_failed_conversion_keeps_an_existing_output(v1, tmp_path):
    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    out = convert.convert(str(source), str(tmp_path / "mlx"))
    before = sorted(p.name for p in out.iterdir())
    (source / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(convert.ConvertError):
        convert.convert(str(source), str(out))
    assert sorted(p.name for p in out.iterdir()) == before


def test_successful_conversion_replaces_an_existing_output(v1_checkpoint, tmp_path):
    """A folder convert.py wrote is replaced whole: none of the older output's files stay."""
    out = convert.convert(str(v1_checkpoint), str(tmp_path / "mlx"), max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").is_file()
    convert.convert(str(v1_checkpoint), str(out), "bfloat16")
    assert mlx_weights(out)["shared.weight"].dtype == mx.bfloat16
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-*"))
    assert [p.name for p in tmp_path.iterdir()] == ["mlx"]  # no staging or old folder left


def test_dot_names_the_output_after_the_folder(v1, tmp_path, monkeypatch):
    monkeypatch.chdir(synthetic.save_checkpoint(tmp_path / "my-t5", *v1))
    out = convert.convert(".")
    assert out == convert.Path("mlx_models/my-t5") and (out / "config.json").is_file()


def test_hub_failure_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(convert.ConvertError, match="could not fetch 'google/flan-t5-tiny'") as error:
        convert.convert("google/flan-t5-tiny")
    assert "\n" not in str(error.value) and not (tmp_path / "mlx_models").exists()


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

    info = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=name) for name in files])
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    out = convert.convert("google/flan-t5-tiny")
    assert asked["repo_id"] == "google/flan-t5-tiny"
    assert expected in asked["patterns"] and "config.json" in asked["patterns"]
    assert {"generation_config.json", "chat_template.jinja", "tokenizer.json"} <= set(asked["patterns"])
    assert out == convert.Path("mlx_models/flan-t5-tiny") and (tmp_path / out / "model.safetensors").is_file()


def test_generation_config_and_chat_template_file_are_carried(v1, tmp_path):
    """generation_config.json (EOS ids besides config.json's) and chat_template.jinja (where current
    transformers saves a template) reach the converted folder; its tokenizer answers the template, and
    the server's chat prompt is the template's rendering."""
    import server
    import tokenizer

    config, weights = v1
    source = synthetic.save_checkpoint(tmp_path / "hf", config, weights)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    (source / "chat_template.jinja").write_text(template)
    generation = {"eos_token_id": [1, 7], "max_length": 64}
    (source / "generation_config.json").write_text(json.dumps(generation))
    out = convert.convert(str(source), str(tmp_path / "mlx"))
    assert (out / "chat_template.jinja").read_text() == template
    assert json.loads((out / "generation_config.json").read_text()) == generation
    loaded = tokenizer.load(out)
    assert loaded.chat_template == template
    messages = [server.Message(role="user", content="hi"), server.Message(role="user", content="there")]
    assert server.chat_prompt(loaded, messages) == ("[user] hi\n[user] there\n[assistant]", False)
