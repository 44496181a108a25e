"""The real T5 shapes behind the README's memory table, and the widened pair behind --preset."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import convert
import model
import synthetic


@pytest.mark.parametrize("name", sorted(synthetic.T5_SHAPES))
def test_parameter_count_matches_transformers(name):
    """Counted on the MLX model built lazily; transformers builds its T5 on the meta device (no memory)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = synthetic.real_config(name)
    with torch.device("meta"):
        reference = T5ForConditionalGeneration(T5Config(**config))
    assert model.parameter_count(config) == reference.num_parameters()


def test_weight_bytes_match_a_loaded_quantized_model(tmp_path):
    config = synthetic.t5_config(d_model=128, d_kv=16, num_heads=8, d_ff=256, gated=True)
    source = synthetic.save_checkpoint(tmp_path / "hf", config, synthetic.random_weights(config))
    for bits in (4, 8):
        quantization = convert.quantization_settings(bits)
        folder = convert.convert(str(source), str(tmp_path / f"q{bits}"), "bfloat16", quantization=quantization)
        loaded, _ = model.load(folder, mx.bfloat16)
        stored = sum(p.nbytes for _, p in tree_flatten(loaded.parameters()))
        assert model.weight_bytes(config, 2, quantization) == stored


TINY_DRAFT = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2)
TINY_TARGET = dict(d_model=128, d_kv=32, num_heads=8, d_ff=512, num_layers=4, num_decoder_layers=4)


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    """eps -> (target, draft, tokenizer) of a tiny widened pair, loaded."""
    made = {}

    def load(eps):
        if eps not in made:
            root = tmp_path_factory.mktemp("widened")
            configs = [synthetic.t5_config(**shape, **synthetic.PRESET_SETTINGS) for shape in (TINY_DRAFT, TINY_TARGET)]
            draft, target = synthetic.widened_pair(root / "hf", *configs, eps)
            target_model, tokenizer = model.load(convert.convert(str(target), str(root / "target")))
            made[eps] = target_model, model.load(convert.convert(str(draft), str(root / "draft")))[0], tokenizer
        return made[eps]

    return load


def logits(mlx_model, tokenizer):
    encoder_ids = mx.array([tokenizer("Return the number of items in the collection.").input_ids])
    decoder_ids = mx.array([[0] + tokenizer("Create a new parser with the given options").input_ids])
    return mlx_model(encoder_ids, decoder_ids)


def test_widened_target_computes_the_draft_at_eps_zero(widened):
    target, draft, tokenizer = widened(0.0)
    assert target.args.d_model == 2 * draft.args.d_model and len(target.decoder.layers) == 4
    expected, got = logits(draft, tokenizer), logits(target, tokenizer)
    assert mx.abs(got - expected).max().item() <= 1e-4 * mx.abs(expected).max().item()


def test_widened_target_departs_from_the_draft_with_eps(widened):
    target, draft, tokenizer = widened(0.05)
    expected, got = logits(draft, tokenizer), logits(target, tokenizer)
    assert mx.abs(got - expected).max().item() > 0.01 * mx.abs(expected).max().item()


def test_ids_past_the_tokenizer_are_never_chosen(widened):
    """Their head rows are zero: logit 0, below the best of the tokenizer's own ids."""
    target, draft, tokenizer = widened(0.05)
    for mlx_model in (target, draft):
        scores = logits(mlx_model, tokenizer)
        assert mlx_model.vocab_size > len(tokenizer)
        assert mx.all(scores[..., len(tokenizer):] == 0).item()
        assert mx.all(scores.argmax(-1) < len(tokenizer)).item()


def test_benchmark_lists_presets_and_refuses_unknown_ones():
    from conftest import one_error_line, run_script

    listed = run_script("benchmark.py", "--preset")
    assert listed.returncode == 0 and "t5-3b" in listed.stdout
    assert "unknown --preset 't5-4b'" in one_error_line(run_script("benchmark.py", "--preset", "t5-4b"))
    assert "exclude each other" in one_error_line(run_script("benchmark.py", "--preset", "t5-3b", "--model", "x",
                                                             "--draft-model", "y"))
