"""Batched speculative decoding: each prompt gets exactly what it gets alone."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import OFTEN, RARELY
from test_decoder import assert_follows

import decoder
import model
from models.cache import Cache

SENTENCES = [
    "Return the number of items.",
    "Close the file.",
    "Create a new parser with the given options and a default formatter for the help text of every command",
    "Parse",
    "Write the rows to the CSV file using the dialect given, quoting every field that needs it",
    "Return a copy of the string with leading whitespace removed.",
    "Sort the list in place.",
    "Decode the bytes using the codec registered for encoding.",
    "Join two paths.",
    "Raise an error when the value is not valid for this field of the dataclass.",
    "Open the URL.",
]
MAX_TOKENS = 30


@pytest.fixture(scope="module")
def setup(load_pair):
    # A two-layer draft: with one layer, a bug that spoils only deeper layers' keys and
    # values (from a padded query that sees nothing) would go unseen.
    # At eps 0.1 this pair's acceptance ranges from about 0.45 to 1.0 over SENTENCES.
    target, draft, tokenizer = load_pair(0.1, draft_layers=2, target_layers=4)
    prompts = [tokenizer(s).input_ids for s in SENTENCES]
    alone = [list(decoder.generate(target, ids, MAX_TOKENS)) for ids in prompts]
    return target, draft, prompts, alone


def counters(stats):
    return [(s.generated, s.drafted, s.accepted, s.target_calls, s.draft_calls) for s in stats]


@pytest.fixture(scope="module")
def alone_counters(setup):
    """Each prompt's speculative counters when it is decoded by itself (num-draft 4)."""
    target, draft, prompts, _ = setup
    stats = [decoder.Stats() for _ in prompts]
    for ids, s in zip(prompts, stats):
        list(decoder.speculative_generate(target, draft, ids, MAX_TOKENS, 4, stats=s, schedule="constant"))
    return counters(stats)


def run_batch(target, draft, prompts, batch_size, num_draft=4, stats=None, **kwargs):
    outputs = [[] for _ in prompts]
    for index, token in decoder.speculative_batch(
        target, draft, prompts, MAX_TOKENS, num_draft, batch_size=batch_size, stats=stats, schedule="constant", **kwargs
    ):
        outputs[index].append(token)
    return outputs


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
def test_greedy_batches_equal_each_prompt_alone(setup, alone_counters, batch_size):
    target, draft, prompts, alone = setup
    stats = [decoder.Stats() for _ in prompts]
    assert run_batch(target, draft, prompts, batch_size, stats=stats) == alone
    # The draft proposes in a batch what it proposes alone, also for prompts that join
    # mid-way (left-padded next to rows that carry an unseen draft): same acceptance.
    assert counters(stats) == alone_counters
    rates = [s.acceptance_rate for s in stats]
    assert max(rates) - min(rates) > 0.3, rates  # the pair's agreement varies between prompts
    for s, tokens in zip(stats, alone):
        assert s.generated == len(tokens) and s.accepted <= s.drafted


@pytest.mark.parametrize("batch_size", [3, 8])
def test_batches_survive_cache_growth_and_compaction(setup, monkeypatch, batch_size):
    """Tiny preallocation steps make the caches grow, hide many slots, and compact often."""
    target, draft, prompts, alone = setup
    monkeypatch.setattr(Cache, "step", 4)
    compactions = []
    original = Cache.compact
    monkeypatch.setattr(Cache, "compact", lambda cache: (compactions.append(1), original(cache)))
    assert run_batch(target, draft, prompts, batch_size, num_draft=6) == alone
    assert compactions


@pytest.mark.parametrize("batch_size", [2, 8])
def test_plain_batches_equal_each_prompt_alone(setup, batch_size):
    target, _, prompts, alone = setup
    assert run_batch(target, None, prompts, batch_size) == alone


def test_rows_sample_from_their_own_streams(load_pair):
    """The same prompt eight times in one batch: rows draw different tokens, each distributed as p."""
    target, draft, tokenizer = load_pair(RARELY)
    ids = tokenizer(SENTENCES[0]).input_ids
    sampling = decoder.Sampling(temperature=1.0, top_k=6)
    cache = target.make_cache(target.encode(mx.array([ids])))
    expected = np.asarray(decoder.distribution(target.decode(mx.array([[0]]), cache)[0, -1], sampling))
    mx.random.seed(5)
    firsts = []
    for _ in range(150):
        outputs = [[] for _ in range(8)]
        for index, token in decoder.speculative_batch(target, draft, [ids] * 8, 2, 1, sampling=sampling, batch_size=8,
                                                      schedule="constant"):
            outputs[index].append(token)
        firsts.extend(tokens[0] for tokens in outputs)
    assert len(set(map(tuple, outputs))) > 1
    assert_follows(np.array(firsts), expected)


def test_bfloat16_batches_run_like_a_gpu_would(pair_dirs):
    """bfloat16 is the default on a GPU: padded masks and refills must keep that dtype."""
    target_dir, draft_dir = pair_dirs(OFTEN)
    target, draft = model.load_model(target_dir, mx.bfloat16), model.load_model(draft_dir, mx.bfloat16)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    prompts = [tokenizer(s).input_ids for s in SENTENCES[:6]]
    alone = [list(decoder.generate(target, ids, 12)) for ids in prompts]
    outputs = [[] for _ in prompts]
    for index, token in decoder.speculative_batch(target, draft, prompts, 12, 3, batch_size=4):
        outputs[index].append(token)
    assert outputs == alone
