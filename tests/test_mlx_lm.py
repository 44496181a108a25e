"""mlx-lm folders (models/mlxlm.py): loaded as mlx-lm wrote them, decoded exactly as mlx-lm decodes them.

Tiny random models are built from mlx-lm's own ModelArgs and Model classes, saved as
mlx_lm.convert saves them (save_model, save_config, a tokenizer; quantized with
mlx-lm's quantize_model), and checked against mlx-lm's own greedy generate_step on the
same folder, loaded by mlx-lm itself.
"""

import json
import shutil
import subprocess
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, one_error_line, run_script
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config, save_model

import api
import decoder
import distributed
import drafters
import model
import synthetic
from models import mlxlm

PROMPTS = ["Return the number of items", "Sort", "Create a new decimal instance based on value and context for the"]
MAX_TOKENS = 16
# Tiny configs of mlx-lm's ModelArgs, each an architecture of its own; gemma3_text's
# sliding window (8) is shorter than prompt plus output, so its window is exercised.
ARCHS = {
    "llama": {},
    "mistral": dict(model_type="mistral"),  # mlx-lm maps it to its llama module
    "qwen2": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "qwen3": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16),
    "phi3": {},
}
# Besides a draft model with batch 3 and the adaptive schedule, each case runs one of these
# (drafter, batch, schedule), so that together they cover the combinations.
OTHER_RUNS = [("lookup", 1, "constant"), ("draft", 1, "constant"), ("lookup", 3, "adaptive"),
              ("draft", 1, "adaptive"), ("lookup", 1, "adaptive"), ("draft", 3, "constant")]
CASES = [(arch, bits) for arch in ARCHS for bits in (None, 4)]


def tiny_config(arch):
    config = dict(model_type=arch, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=synthetic.tokenizer_size(kind="bpe"),
                  max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0)
    return dict(config, **ARCHS[arch])


def random_model(config, seed, like=None, noise=0.0):
    """mlx-lm's model of `config`, its weights drawn (std 0.2; norms near 1), or `like`'s plus noise."""
    module, args = _get_classes(config)
    built = module(args.from_dict(config))
    drawn = []
    for i, (name, p) in enumerate(tree_flatten(built.parameters())):
        key = mx.random.key(seed * 1000 + i)
        std = 0.2 if p.ndim > 1 else 0.1
        mean = 1.0 if p.ndim == 1 and "norm" in name else 0.0
        base = dict(tree_flatten(like.parameters()))[name] if like is not None else mean
        drawn.append((name, base + (noise if like is not None else std) * mx.random.normal(p.shape, key=key)))
    built.update(tree_unflatten(drawn))
    mx.eval(built.parameters())
    return built


def save_as_mlx_lm(folder, built, config, bits=None):
    """Write `built` as mlx_lm.convert does (quantized to `bits` with mlx-lm's own quantize_model if given)."""
    if bits is not None:
        built, config = quantize_model(built, config, group_size=32, bits=bits)
    save_model(folder, built)
    save_config(dict(config), folder / "config.json")
    synthetic.train_tokenizer(folder, kind="bpe")
    return folder


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory):
    """(arch, bits) -> (target folder, draft folder): the draft is the target with its weights perturbed."""
    made = {}

    def make(arch, bits=None):
        if (arch, bits) not in made:
            root = tmp_path_factory.mktemp(f"{arch}-{bits}")
            config = tiny_config(arch)
            target = random_model(config, seed=1)
            draft = random_model(config, seed=2, like=target, noise=0.01)
            made[arch, bits] = (save_as_mlx_lm(root / "target", target, config, bits),
                                save_as_mlx_lm(root / "draft", draft, config, bits))
        return made[arch, bits]

    return make


def mlx_lm_greedy(folder, prompts, max_tokens=MAX_TOKENS):
    """mlx-lm's own greedy tokens for each prompt (the folder loaded by mlx-lm), up to and with EOS."""
    reference, config = load_model(folder)
    outputs = []
    for ids in prompts:
        tokens = []
        for token, _ in generate_step(mx.array(ids), reference, max_tokens=max_tokens,
                                      sampler=lambda logits: mx.argmax(logits, axis=-1)):
            tokens.append(int(token))
            if tokens[-1] == config["eos_token_id"]:
                break
        outputs.append(tokens)
    return outputs


def decoded(target, drafter, prompts, batch, schedule, num_draft=3, **options):
    """Each prompt's tokens from speculative decoding, `batch` rows at a time."""
    outputs = [[] for _ in prompts]
    for index, token in decoder.speculative_batch(target, drafter, prompts, MAX_TOKENS, num_draft, batch_size=batch,
                                                  schedule=schedule, **options):
        outputs[index].append(token)
    return outputs


@pytest.mark.parametrize("arch,bits", CASES, ids=[f"{a}-{b or 'float'}" for a, b in CASES])
def test_greedy_speculative_output_is_mlx_lm_greedy_output(pair_folders, arch, bits):
    target_dir, draft_dir = pair_folders(arch, bits)
    target, draft, tokenizer = api.load_models(target_dir, draft_dir)
    assert isinstance(target, mlxlm.Model) and isinstance(draft, mlxlm.Model)
    if bits:
        assert "QuantizedLinear" in {type(m).__name__ for _, m in target.named_modules()}
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    expected = mlx_lm_greedy(target_dir, prompts)
    stats = [decoder.Stats() for _ in prompts]
    assert decoded(target, draft, prompts, 3, "adaptive", stats=stats) == expected
    assert sum(s.accepted for s in stats) > 0 and sum(s.drafted - s.accepted for s in stats) > 0  # both verdicts seen
    kind, batch, schedule = OTHER_RUNS[CASES.index((arch, bits)) % len(OTHER_RUNS)]
    drafter = draft if kind == "draft" else drafters.PromptLookupDrafter(3)
    assert decoded(target, drafter, prompts, batch, schedule) == expected


@pytest.mark.parametrize("arch,bits", [("qwen3", None), ("gemma3_text", 4)])
def test_sampled_tokens_lie_in_the_targets_top_k(pair_folders, arch, bits):
    """Sampling with top-k 3: every token is among the target's 3 likeliest after what came before."""
    target_dir, draft_dir = pair_folders(arch, bits)
    target, draft, tokenizer = api.load_models(target_dir, draft_dir)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    outputs = decoded(target, draft, prompts, 3, "adaptive", sampling=decoder.Sampling(1.0, 3, 1.0))
    reference, _ = load_model(target_dir)
    for ids, tokens in zip(prompts, outputs):
        assert tokens
        logits = reference(mx.array([ids + tokens]))[0, len(ids) - 1 : len(ids) + len(tokens) - 1]
        top = np.argsort(-np.array(logits.astype(mx.float32)), axis=-1)[:, :3]
        assert all(token in row for token, row in zip(tokens, top))


def test_left_padded_rows_decode_as_alone(pair_folders):
    """Logits of a left-padded batch, before and after a per-row trim, equal each row's alone
    (the position mask, the sliding window and the per-row RoPE offsets)."""
    target, _ = model.load(pair_folders("gemma3_text")[0])
    prompts = [list(range(5, 17)), [7, 8, 9]]
    steps = [[[30, 31, 32], [40, 41, 42]], [[50, 51], [60, 61]]]
    cache, firsts = target.start(prompts)
    got = [target.decode(mx.array([[f] + s for f, s in zip(firsts, steps[0])]), cache)]
    cache.trim([1, 2])  # rows keep different numbers of their tokens
    got.append(target.decode(mx.array(steps[1]), cache))
    for row, ids in enumerate(prompts):
        alone, first = target.start([ids])
        expected = [target.decode(mx.array([[first[0]] + steps[0][row]]), alone)]
        alone.trim(1 + row)
        expected.append(target.decode(mx.array([steps[1][row]]), alone))
        for ours, theirs in zip(got, expected):
            assert np.allclose(np.array(ours[row]), np.array(theirs[0]), atol=1e-4)


def test_mixed_bits_and_a_padded_vocabulary(pair_folders, tmp_path):
    """A mixed-bit recipe (per-layer entries in config.json) loads as mlx-lm loads it; a draft whose
    embeddings are padded wider over the same tokenizer pairs with the target (Qwen's 0.5B and 7B)."""
    config = tiny_config("qwen2")
    built = random_model(config, seed=3)

    def recipe(path, module):
        return {"group_size": 32, "bits": 8} if "layers.0." in path else True

    built, quantized = quantize_model(built, config, group_size=32, bits=4, quant_predicate=recipe)
    assert any(isinstance(v, dict) for v in quantized["quantization"].values())
    mixed = tmp_path / "mixed"
    save_model(mixed, built)
    save_config(dict(quantized), mixed / "config.json")
    synthetic.train_tokenizer(mixed, kind="bpe")
    wide_config = dict(config, vocab_size=config["vocab_size"] + 64)
    wide = save_as_mlx_lm(tmp_path / "wide", random_model(wide_config, seed=4), wide_config)
    target, draft, tokenizer = api.load_models(wide, mixed)
    assert draft.vocab_size == target.vocab_size == wide_config["vocab_size"]
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert decoded(target, draft, prompts, 3, "adaptive") == mlx_lm_greedy(wide, prompts)
    mixed_model, _ = model.load(mixed)
    assert decoded(mixed_model, None, prompts[:1], 1, "constant") == mlx_lm_greedy(mixed, prompts[:1])


def test_own_llama_folders_keep_their_family(pair_dirs):
    """What convert.py writes loads in the project's own Llama family; mlx-lm's names go to mlx-lm."""
    target, _ = pair_dirs(0.05, family="llama")
    assert model.folder_family(target).__name__ == "models.llama"


def test_server_answers_an_mlx_lm_pair_as_main_does(pair_folders):
    openai = pytest.importorskip("openai")
    from test_server import start_server

    target_dir, draft_dir = pair_folders("qwen3", 4)
    prompt = PROMPTS[2]
    result = run_script("main.py", "--model", target_dir, "--draft-model", draft_dir, "--prompt", prompt,
                        "--max-tokens", MAX_TOKENS, "--json")
    assert result.returncode == 0, result.stderr
    expected = json.loads(result.stdout.splitlines()[0])
    process, url = start_server(target_dir, draft_dir, "--num-draft", "3")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        answer = client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                           max_tokens=MAX_TOKENS, temperature=0)
        assert answer.choices[0].text == expected["text"]
    finally:
        process.kill()
        process.wait()


def hub_cache(root, repo, folder):
    """A Hugging Face hub cache under `root` holding `folder`'s files as repo `repo`'s snapshot."""
    commit = "0" * 40
    cached = root / f"models--{repo.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    shutil.copytree(folder, cached / "snapshots" / commit)
    return root


def test_hub_ids_resolve_from_the_local_cache_offline(pair_folders, tmp_path):
    target_dir, draft_dir = pair_folders("llama")
    cache = hub_cache(tmp_path / "hub", "mlx-community/tiny-target", target_dir)
    hub_cache(cache, "mlx-community/tiny-draft", draft_dir)
    env = dict(__import__("os").environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")

    def main(*args):
        return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args), "--prompt", PROMPTS[0],
                               "--max-tokens", str(MAX_TOKENS), "--json"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    by_id = main("--model", "mlx-community/tiny-target", "--draft-model", "mlx-community/tiny-draft")
    by_folder = main("--model", target_dir, "--draft-model", draft_dir)
    assert by_id.returncode == 0, by_id.stderr
    assert json.loads(by_id.stdout)["tokens"] == json.loads(by_folder.stdout)["tokens"]
    line = one_error_line(main("--model", "mlx-community/absent-7B-4bit", "--regular-decode"))
    assert "not in the Hugging Face cache" in line or "none in the Hugging Face cache" in line
    assert "hf download mlx-community/absent-7B-4bit" in line


def test_refusals_are_one_line(pair_folders, tmp_path):
    """A recurrent architecture, an unknown model_type and --pipeline over ranks: one line each."""
    config = dict(model_type="mamba", vocab_size=synthetic.tokenizer_size(kind="bpe"), hidden_size=32,
                  intermediate_size=64, state_size=8, num_hidden_layers=2, conv_kernel=4, use_bias=False,
                  use_conv_bias=True, time_step_rank=4, tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    recurrent = save_as_mlx_lm(tmp_path / "mamba", random_model(config, seed=5), config)
    line = one_error_line(run_script("main.py", "--model", recurrent, "--regular-decode", "--prompt", "Sort"))
    assert "mamba" in line and "cannot be rolled back" in line
    unknown = shutil.copytree(pair_folders("llama")[0], tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="no_such_arch")))
    line = one_error_line(run_script("main.py", "--model", unknown, "--regular-decode", "--prompt", "Sort"))
    assert "model_type 'no_such_arch' is not supported" in line
    with pytest.raises(model.LoadError, match="--pipeline splits the project's own families"):
        distributed.parts(pair_folders("llama")[0], types.SimpleNamespace(size=2, rank=0))
