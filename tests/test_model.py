"""The MLX T5 against Hugging Face transformers' PyTorch T5, and its decoder cache."""

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import convert  # noqa: E402
import model  # noqa: E402
from models import t5  # noqa: E402

TOLERANCE = 1e-4  # max abs difference / max abs reference, float32

VARIANTS = {
    "v1": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "v1.1-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "inner-dim": dict(feed_forward_proj="relu", num_heads=4, d_kv=32),  # 128 != d_model 64
    "deeper-decoder": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=2, num_decoder_layers=4),
}


def hf_t5(folder, **overrides):
    """A random transformers T5 saved to `folder` as Hugging Face writes it."""
    settings = dict(
        vocab_size=320, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**settings)).eval()
    if not settings.get("tie_word_embeddings", True):
        # Untied heads must really differ from the embedding for the test to see them.
        with torch.no_grad():
            hf.lm_head.weight.normal_()
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(Hugging Face model, the same checkpoint converted and loaded in MLX)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = hf_t5(root / "hf", **VARIANTS[request.param])
    convert.convert(str(root / "hf"), str(root / "mlx"), "float32")
    return hf, model.load_model(root / "mlx", mx.float32)


def relative_error(ours, reference):
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def random_ids(batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(2, 320, size=(batch, length))


def test_logits_match_transformers(pair):
    hf, ours = pair
    # Past 128 tokens the far log buckets and the last bucket are used.
    ids, decoder_ids = random_ids(2, 170, seed=1), random_ids(2, 150, seed=2)
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(decoder_ids)).logits.numpy()
    logits = ours(mx.array(ids), mx.array(decoder_ids))
    assert logits.shape == reference.shape
    assert relative_error(logits, reference) <= TOLERANCE


def test_padded_batch_matches_transformers(pair):
    hf, ours = pair
    ids, decoder_ids = random_ids(2, 40, seed=3), random_ids(2, 12, seed=4)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        reference = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(decoder_ids)
        ).logits.numpy()
    logits = ours(mx.array(ids), mx.array(decoder_ids), mx.array(mask))
    assert relative_error(logits, reference) <= TOLERANCE
    # The padded row equals that prompt alone, unpadded.
    alone = ours(mx.array(ids[1:, :25]), mx.array(decoder_ids[1:]))
    assert relative_error(alone, np.asarray(logits[1:])) <= TOLERANCE


def decode_in_chunks(ours, ids, decoder_ids, sizes):
    cache = ours.make_cache(ours.encode(mx.array(ids)))
    pieces, start = [], 0
    for size in sizes:
        pieces.append(ours.decode(mx.array(decoder_ids[:, start : start + size]), cache))
        start += size
    return np.concatenate([np.asarray(p) for p in pieces], axis=1), cache


@pytest.mark.parametrize("sizes", [[1] * 30, [3, 1, 8, 2, 9, 7]], ids=["one-at-a-time", "several-at-a-time"])
def test_cached_decoding_matches_full_forward(pair, sizes):
    _, ours = pair
    ids, decoder_ids = random_ids(1, 20, seed=5), random_ids(1, 30, seed=6)
    full = np.asarray(ours(mx.array(ids), mx.array(decoder_ids)))
    chunked, cache = decode_in_chunks(ours, ids, decoder_ids, sizes)
    assert relative_error(chunked, full) <= TOLERANCE
    assert cache.offset == 30 and cache.lengths.tolist() == [30]


def test_trim_then_decode_matches_fresh(pair):
    _, ours = pair
    ids, decoder_ids = random_ids(1, 20, seed=7), random_ids(1, 40, seed=8)
    other = random_ids(1, 6, seed=9)
    fresh = np.asarray(ours(mx.array(ids), mx.array(np.concatenate([decoder_ids[:, :10], other], axis=1))))
    _, cache = decode_in_chunks(ours, ids, decoder_ids, [10, 5])
    cache.trim(5)
    assert cache.offset == 10
    again = np.asarray(ours.decode(mx.array(other), cache))
    assert relative_error(again, fresh[:, 10:]) <= TOLERANCE


def test_rows_trimmed_by_different_counts_match_fresh(pair):
    """Rows of one batch drop different numbers of tokens, as batched drafting needs."""
    _, ours = pair
    ids, decoder_ids = random_ids(2, 20, seed=10), random_ids(2, 20, seed=11)
    _, cache = decode_in_chunks(ours, ids, decoder_ids, [6, 5])
    cache.trim([1, 4])  # row 0 keeps 10 tokens, row 1 keeps 7
    kept = [10, 7]
    new = random_ids(2, 3, seed=12)
    logits = np.asarray(ours.decode(mx.array(new), cache))
    for row, count in enumerate(kept):
        tokens = np.concatenate([decoder_ids[row : row + 1, :count], new[row : row + 1]], axis=1)
        fresh = np.asarray(ours(mx.array(ids[row : row + 1]), mx.array(tokens)))
        assert relative_error(logits[row], fresh[0, count:]) <= TOLERANCE
    assert cache.lengths.tolist() == [13, 10]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_position_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    args = t5.ModelArgs(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_heads=4, num_layers=1)
    bias = t5.RelativePositionBias(args, bidirectional)
    bias.weight = mx.arange(args.relative_attention_num_buckets)[:, None] * mx.ones((1, 4))
    positions = mx.arange(400)[None]
    ours = np.asarray(bias(positions, positions))[0, 0]
    relative = torch.arange(400)[None, :] - torch.arange(400)[:, None]
    reference = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=32, max_distance=128
    ).numpy()
    if bidirectional:
        np.testing.assert_array_equal(ours, reference)
    else:
        future = relative.numpy() > 0
        np.testing.assert_array_equal(ours[~future], reference[~future])
        assert np.isneginf(ours[future]).all()


def test_missing_model_names_the_convert_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(model.LoadError, match=r"python convert.py --model t5-nonexistent"):
        model.load("t5-nonexistent")


def test_default_dtype_is_float32_on_cpu():
    if mx.default_device() == mx.cpu:
        assert model.default_dtype() == mx.float32
    else:
        assert model.default_dtype() == mx.bfloat16


def test_folder_without_tokenizer_files_is_a_load_error(tmp_path):
    folder = tmp_path / "mlx"
    hf_t5(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(folder))  # transformers' save_pretrained wrote no tokenizer
    assert model.load_model(folder) is not None
    with pytest.raises(model.LoadError, match="tokenizer"):
        model.load(folder)
