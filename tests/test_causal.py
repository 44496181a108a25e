"""Decoder-only families (GPT-2, Llama, Qwen2): logits match transformers; decoding is exact.

Tiny random checkpoints are written in Hugging Face's format by synthetic.py, read by
transformers as they are, and converted for MLX by convert.py.
"""

import json
import shutil
import types

import mlx.core as mx
import numpy as np
import pytest
from conftest import OFTEN, one_error_line, run_script
from test_decoder import EndsAt, assert_follows

import convert
import decoder
import main
import model
import synthetic
from models.cache import Cache

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# Tiny configs (synthetic.gpt2_config / llama_config overrides) covering each feature.
TINY = {
    "gpt2": ("gpt2", {}),
    "llama": ("llama", {}),  # grouped-query attention (4 heads, 2 key/value heads), untied head
    "llama-tied-mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
    "linear-rope": ("llama", dict(rope_scaling=dict(type="linear", factor=4.0))),
    "qwen2": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # q/k/v biases, none on o_proj
}
TOLERANCE = 1e-4  # max |ours - theirs| / max |theirs|


def tiny_config(name):
    family, overrides = TINY[name]
    if family == "gpt2":
        return synthetic.gpt2_config(**overrides)
    config = synthetic.llama_config(**overrides)
    if family == "qwen2":
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, MLX model, tokenizer, MLX folder), from one Hugging Face folder each."""
    made = {}

    def make(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            config = tiny_config(name)
            source = synthetic.save_checkpoint(root / "hf", config, synthetic.random_weights(config, seed=len(made)))
            hf, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True)
            # Every tensor the synthetic writer made is one transformers expects, and none is missing.
            assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            folder = convert.convert(str(source), str(root / "mlx"))
            made[name] = (hf.eval(), *model.load(folder), folder)
        return made[name]

    return make


def reference_logits(hf, ids, mask=None):
    """transformers' logits; with a padding mask, positions count real tokens only (as generate does)."""
    ids = torch.tensor(ids)
    mask = torch.ones_like(ids) if mask is None else torch.tensor(mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()


def relative_error(ours, theirs):
    return float(np.abs(np.asarray(ours, dtype=np.float64) - theirs).max() / np.abs(theirs).max())


def random_ids(count, vocab, seed=0):
    return np.random.default_rng(seed).integers(1, vocab, count).tolist()


@pytest.mark.parametrize("name", sorted(TINY))
def test_full_forward_matches_transformers(checkpoints, name):
    hf, ours, *_ = checkpoints(name)
    ids = [random_ids(50, ours.vocab_size, seed) for seed in (1, 2)]
    assert relative_error(ours(mx.array(ids)), reference_logits(hf, ids)) < TOLERANCE


@pytest.mark.parametrize("name", sorted(TINY))
def test_incremental_decoding_in_chunks_matches_transformers(checkpoints, name):
    """A long prompt fed in chunks of 1 to 40 tokens through one cache: positions keep counting."""
    hf, ours, *_ = checkpoints(name)
    ids = random_ids(300, ours.vocab_size, seed=3)
    expected = reference_logits(hf, [ids])[0]
    cache, start = Cache(1, ours.args.num_layers), 0
    for size in [40, 1, 7, 1, 1, 33, 2, 100, 5, 1, 60, 49]:
        logits = ours.decode(mx.array([ids[start : start + size]]), cache)[0]
        assert relative_error(logits, expected[start : start + size]) < TOLERANCE, (name, start)
        start += size
    assert start == len(ids)


@pytest.mark.parametrize("name", sorted(TINY))
def test_left_padded_batch_matches_transformers(checkpoints, name):
    """Rows of different lengths, left-padded: each row's real tokens get transformers' logits."""
    hf, ours, *_ = checkpoints(name)
    lengths = [23, 5, 1, 17]
    width = max(lengths)
    rows = [[0] * (width - n) + random_ids(n, ours.vocab_size, seed=n) for n in lengths]
    mask = [[0] * (width - n) + [1] * n for n in lengths]
    expected = reference_logits(hf, rows, mask)
    padding = np.array([width - n for n in lengths])
    logits = ours.decode(mx.array(rows), Cache(len(rows), ours.args.num_layers), padding)
    for row, n in enumerate(lengths):
        assert relative_error(logits[row, width - n :], expected[row, width - n :]) < TOLERANCE, (name, row)


# Measured: at most 0.05 (bfloat16, 8 mantissa bits) and 0.006 (float16, 11) on these models;
# a wrong position or mask gives errors near 1.
HALF_TOLERANCE = {mx.bfloat16: 0.1, mx.float16: 0.02}


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_half_precision_follows_transformers(checkpoints, name, dtype):
    """Loaded in bfloat16 or float16, a left-padded batch's logits stay close to float32 transformers'."""
    hf, _, _, folder = checkpoints(name)
    half = model.load_model(folder, dtype)
    ids = random_ids(40, half.vocab_size, seed=5)
    padding = np.array([0, 30])
    logits = half.decode(mx.array([ids, [0] * 30 + ids[:10]]), Cache(2, half.args.num_layers), padding)
    assert logits.dtype == dtype
    logits = np.asarray(logits.astype(mx.float32))
    for ours, theirs in ((logits[0], reference_logits(hf, [ids])[0]), (logits[1, 30:], reference_logits(hf, [ids[:10]])[0])):
        assert relative_error(ours, theirs) < HALF_TOLERANCE[dtype], name
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.85, name


# ----- decoding -------------------------------------------------------------------------

PROMPTS = [
    "Return the number of items in the collection.",
    "Create a new parser with the given options and a default formatter for help",
    "Close the file.",
    "Sort",
    "Write the rows to the CSV file using the dialect given, quoting every field that needs it",
]
MAX_TOKENS = 40
FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def pairs(load_pair):
    """family -> (target, draft, tokenizer): a 3-layer target that embeds a 1-layer draft (eps 0.05)."""
    return {family: load_pair(0.05, family=family) for family in FAMILIES}


@pytest.fixture(scope="module")
def hf_greedy(pair_dirs, pairs):
    """family -> transformers' greedy generate of the target for each prompt: the reference."""
    reference = {}
    for family in FAMILIES:
        target_dir, _ = pair_dirs(0.05, family=family)
        hf = AutoModelForCausalLM.from_pretrained(target_dir.parent / "hf" / "target").eval()
        tokenizer = pairs[family][2]
        outputs = []
        for ids in prompt_ids(tokenizer):
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
            outputs.append(out[0, len(ids) :].tolist())
        reference[family] = outputs
    return reference


def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_greedy_equals_transformers_generate(pairs, hf_greedy, family):
    target, _, tokenizer = pairs[family]
    for ids, expected in zip(prompt_ids(tokenizer), hf_greedy[family]):
        assert list(decoder.generate(target, ids, MAX_TOKENS)) == expected
    assert max(len(set(tokens)) for tokens in hf_greedy[family]) >= 8  # varied enough to be a real test


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_speculative_equals_transformers_generate(pairs, hf_greedy, family):
    target, draft, tokenizer = pairs[family]
    for k in range(1, 9):
        stats = decoder.Stats()
        for ids, expected in zip(prompt_ids(tokenizer), hf_greedy[family]):
            tokens = list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, num_draft=k, stats=stats,
                                                       schedule="constant"))
            assert tokens == expected, (family, k)
        assert 0.2 < stats.acceptance_rate < 1.0, (family, k, stats.acceptance_rate)
        assert stats.generated == sum(map(len, hf_greedy[family]))


@pytest.mark.parametrize("batch_size", [2, 3, 5])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batches_equal_transformers_generate(pairs, hf_greedy, family, batch_size):
    """Mixed prompt lengths, rows replaced as they finish: each prompt's output is transformers'."""
    target, draft, tokenizer = pairs[family]
    for k in (1, 3, 8):
        outputs = [[] for _ in PROMPTS]
        for index, token in decoder.speculative_batch(target, draft, prompt_ids(tokenizer), MAX_TOKENS, k,
                                                      batch_size=batch_size, schedule="constant"):
            outputs[index].append(token)
        assert outputs == hf_greedy[family], (family, k)


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_survive_cache_growth_and_compaction(pairs, hf_greedy, family, monkeypatch):
    """Tiny preallocation steps: prefilled rows are copied in, caches grow and compact often."""
    monkeypatch.setattr(Cache, "step", 4)
    monkeypatch.setattr(Cache, "slack", 2)
    target, draft, tokenizer = pairs[family]
    outputs = [[] for _ in PROMPTS]
    for index, token in decoder.speculative_batch(target, draft, prompt_ids(tokenizer), MAX_TOKENS, 4, batch_size=2,
                                                  schedule="constant"):
        outputs[index].append(token)
    assert outputs == hf_greedy[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_prompt_starts_from_bos(pairs, pair_dirs, family):
    target, draft, _ = pairs[family]
    hf = AutoModelForCausalLM.from_pretrained(pair_dirs(0.05, family=family)[0].parent / "hf" / "target").eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 1:].tolist()
    assert list(decoder.speculative_generate(target, draft, [], 12, num_draft=3, schedule="constant")) == expected
    assert list(decoder.speculative_generate(target, draft, [], 12, num_draft=3)) == expected  # adaptive


@pytest.mark.parametrize("family", FAMILIES)
def test_max_tokens_and_eos(pairs, family):
    target, draft, tokenizer = pairs[family]
    ids = prompt_ids(tokenizer)[1]
    plain = list(decoder.generate(target, ids, MAX_TOKENS))
    for max_tokens in (1, 2, 7):
        for k in (1, 4, 8):
            tokens = decoder.speculative_generate(target, draft, ids, max_tokens, k, schedule="constant")
            assert list(tokens) == plain[:max_tokens]
    for position in (0, 3, 9):
        # The target says EOS as its `position`-th generated token (the prompt's last token sits at len - 1).
        ending = EndsAt(target, len(ids) - 1 + position)
        tokens = list(decoder.speculative_generate(ending, ending, ids, MAX_TOKENS, num_draft=4, schedule="constant"))
        assert tokens == plain[:position] + [target.eos_token_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_one_accepts_every_draft(pairs, family):
    target, draft, tokenizer = pairs[family]
    stats = decoder.Stats()
    for ids in prompt_ids(tokenizer):
        list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, num_draft=4, delta=1.0, stats=stats,
                                          schedule="constant"))
    assert stats.drafted > 0 and stats.acceptance_rate == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_tokens_follow_the_target(load_pair, pair_dirs, family, batch_size=4):
    """The first token of many speculative generations (a draft accepted or resampled) follows the target."""
    target, draft, tokenizer = load_pair(0.3, family=family)
    hf = AutoModelForCausalLM.from_pretrained(pair_dirs(0.3, family=family)[0].parent / "hf" / "target").eval()
    ids = tokenizer(PROMPTS[0]).input_ids
    sampling = decoder.Sampling(temperature=1.0, top_k=6)
    logits = reference_logits(hf, [ids])[0, -1]
    expected = np.asarray(decoder.distribution(mx.array(logits), sampling))
    mx.random.seed(5)
    copies = 1200
    firsts = {}
    for index, token in decoder.speculative_batch(target, draft, [ids] * copies, 2, num_draft=2, sampling=sampling,
                                                  batch_size=batch_size, schedule="constant"):
        firsts.setdefault(index, token)
    samples = np.array([firsts[i] for i in range(copies)])
    assert set(samples.tolist()) <= set(np.flatnonzero(expected).tolist())
    assert_follows(samples, expected)


# ----- command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_cli(pair_dirs, tmp_path_factory):
    """(model flags, prompt file) for main.py on the GPT-2 pair."""
    target, draft = pair_dirs(0.05, family="gpt2")
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return ["--model", target, "--draft-model", draft], path


@pytest.mark.parametrize("flags", [["--json"], ["--json", "--regular-decode"], ["--json", "--prompt-lookup"],
                                   ["--batch-size", "3", "--num-draft", "7", "--draft-schedule", "constant"]])
def test_main_json_tokens_are_transformers_greedy(gpt2_cli, hf_greedy, flags):
    models, prompt_file = gpt2_cli
    result = run_script("main.py", *models, "--prompt-file", prompt_file, "--max-tokens", MAX_TOKENS, *flags)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["tokens"] for r in records] == hf_greedy["gpt2"]  # generated ids only, no prompt
    for record in records:
        assert record["stats"]["generated"] == len(record["tokens"])
        assert record["text"] == AutoTokenizer.from_pretrained(models[1]).decode(record["tokens"], skip_special_tokens=True)


def test_main_streams_a_causal_model(gpt2_cli, hf_greedy, pairs):
    models, _ = gpt2_cli
    result = run_script("main.py", *models, "--prompt", PROMPTS[0], "--max-tokens", MAX_TOKENS)
    assert result.returncode == 0, result.stderr
    text, summary = result.stdout.rstrip("\n").rsplit("\n", 1)
    assert text == main.text_of(pairs["gpt2"][2], hf_greedy["gpt2"][0]) and "acceptance" in summary


def test_prompt_past_gpt2_positions_is_one_line(gpt2_cli):
    models, _ = gpt2_cli
    line = one_error_line(run_script("main.py", *models, "--prompt", "Close the file.", "--max-tokens", 600))
    assert "positions" in line and "512" in line


def test_vocabularies_that_differ_are_one_line(gpt2_cli, pair_dirs, tmp_path):
    """Draft and target must be of one family and share a tokenizer: another family, or the
    same family and size with other tokens."""
    models, _ = gpt2_cli
    t5_target, _ = pair_dirs(OFTEN)  # a sentencepiece vocabulary of 1100 tokens
    line = one_error_line(run_script("main.py", "--model", t5_target, "--draft-model", models[3]))
    assert "different families (gpt2 draft, t5 target)" in line
    # A GPT-2 draft whose tokenizer gives two of its tokens each other's ids: same family, same size.
    draft = tmp_path / "draft"
    shutil.copytree(models[3], draft)
    spec = json.loads((draft / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (draft / "tokenizer.json").write_text(json.dumps(spec))
    line = one_error_line(run_script("main.py", "--model", models[1], "--draft-model", draft))
    assert "vocabularies differ" in line and "tokenizers" in line


# ----- convert.py -------------------------------------------------------------------------


@pytest.mark.parametrize("hub_id,family", [("gpt2-xl", "gpt2"), ("deepseek-ai/deepseek-coder-1.3b-base", "llama")])
def test_hub_path_offline(hub_id, family, tmp_path, monkeypatch):
    """convert.py --model <hub id>: huggingface_hub's calls replaced by a local folder."""
    import huggingface_hub

    config = synthetic.gpt2_config() if family == "gpt2" else synthetic.llama_config()
    local = synthetic.save_checkpoint(tmp_path / "snapshot", config, synthetic.random_weights(config))
    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked.update(repo_id=repo_id, patterns=allow_patterns)
        return str(local)

    info = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=p.name) for p in local.iterdir()])
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    out = convert.convert(hub_id)
    assert asked["repo_id"] == hub_id and {"vocab.json", "merges.txt", "tokenizer.json"} <= set(asked["patterns"])
    assert out == convert.Path("mlx_models") / hub_id.split("/")[-1]
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= {
        p.name for p in (tmp_path / out).iterdir()}
    ours, tokenizer = model.load(tmp_path / out)
    assert type(ours).__module__ == f"models.{family}" and tokenizer("Close the file.").input_ids


def test_gpt2_hub_layout_converts(tmp_path):
    """The hub's gpt2 files: names without `transformer.`, causal-mask buffers, a .bin, a copy of the head."""
    config = synthetic.gpt2_config()
    weights = synthetic.random_weights(config)
    hub = {name.removeprefix("transformer."): array for name, array in weights.items()}
    hub["h.0.attn.bias"] = np.tril(np.ones((1, 1, 512, 512), dtype=np.float32))
    hub["lm_head.weight"] = weights["transformer.wte.weight"]
    expected = model.load(convert.convert(str(synthetic.save_checkpoint(tmp_path / "hf", config, weights)),
                                          str(tmp_path / "plain")))[0]
    for fmt in ("safetensors", "bin"):
        source = synthetic.save_checkpoint(tmp_path / f"hub-{fmt}", config, hub, fmt=fmt)
        ours = model.load(convert.convert(str(source), str(tmp_path / f"mlx-{fmt}")))[0]
        ids = mx.array([random_ids(20, ours.vocab_size)])
        assert mx.array_equal(ours(ids), expected(ids)), fmt
        assert ours.args.tie_word_embeddings


def test_unsupported_rope_scaling_is_one_line(tmp_path):
    config = synthetic.llama_config(rope_scaling=dict(rope_type="yarn", factor=4.0))
    source = synthetic.save_checkpoint(tmp_path / "hf", config, synthetic.random_weights(config))
    line = one_error_line(run_script("convert.py", "--model", source, "--mlx-path", tmp_path / "out"))
    assert "yarn" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_every_eos_id_stops_a_row(checkpoints, tmp_path, where):
    """A model naming several EOS ids (Llama 3 Instruct names three) stops where transformers'
    generate does: at the first token that is any of them, whichever file names the list."""
    hf, target, tokenizer, folder = checkpoints("llama")
    ids = tokenizer(PROMPTS[1]).input_ids
    with torch.no_grad():
        free = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                           do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    # A second EOS id the greedy text reaches for the first time a few tokens in.
    position = next(i for i in range(3, MAX_TOKENS) if free[i] not in free[:i] and free[i] != 0)
    source = shutil.copytree(folder.parent / "hf", tmp_path / "hf")
    eos = [0, free[position]]
    if where == "config.json":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(dict(config, eos_token_id=eos)))
    else:
        (source / "generation_config.json").write_text(json.dumps(dict(eos_token_id=eos, bos_token_id=0)))
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                      pad_token_id=0)[0, len(ids):].tolist()
    assert expected == free[: position + 1]
    several, _ = model.load(convert.convert(str(source), str(tmp_path / "mlx")))
    assert several.eos_token_ids == frozenset(eos)
    assert list(decoder.generate(several, ids, MAX_TOKENS)) == expected
    for schedule in ("constant", "adaptive"):
        assert list(decoder.speculative_generate(several, several, ids, MAX_TOKENS, num_draft=3,
                                                 schedule=schedule)) == expected
