"""api.py and the per-row decoder under it: rows with their own settings, joining a running batch."""

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import api
import decoder
import drafters
import policy
from textstream import text_of

PROMPTS = ["Return the number of items.", "Close the file.", "Sort", "Join two paths and return the result",
           "Raise an error when the value is not valid."]
LONGEST = 12


@pytest.fixture(scope="module")
def llama(load_pair):
    target, draft, tokenizer = load_pair(0.05, family="llama")
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    alone = [list(decoder.generate(target, i, LONGEST)) for i in ids]
    return target, draft, tokenizer, ids, alone


row_settings = st.fixed_dictionaries({
    "prompt": st.integers(0, len(PROMPTS) - 1),
    "max_tokens": st.integers(1, LONGEST),
    "greedy": st.booleans(),
    "temperature": st.sampled_from([0.6, 1.0, 1.7]),
    "top_k": st.sampled_from([0, 1, 7]),
    "top_p": st.sampled_from([1.0, 0.9, 0.5]),
    "delta": st.sampled_from([0.0, 0.3]),
    "num_draft": st.integers(1, 4),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "arrives": st.integers(0, 4),  # joins after this many steps of the batch
    "cancel": st.booleans(),  # sampled rows only: leaves after its first step
})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_settings, min_size=1, max_size=6), batch_size=st.integers(1, 4),
       drafter_kind=st.sampled_from(["model", "lookup", "none"]), schedule=st.sampled_from(["constant", "adaptive"]))
def test_rows_with_their_own_settings_join_a_running_batch(llama, rows, batch_size, drafter_kind, schedule):
    """Greedy rows give exactly the target's plain greedy output of their prompt alone, whatever shares the batch."""
    target, draft, _, ids, alone = llama
    requests = []
    for row in rows:
        sampling = decoder.Sampling(0.0 if row["greedy"] else row["temperature"], row["top_k"], row["top_p"])
        delta = 0.0 if row["greedy"] else row["delta"]
        requests.append(decoder.Request(ids[row["prompt"]], row["max_tokens"], sampling, delta, row["num_draft"],
                                        row["seed"]))
    drafter = {"model": lambda: drafters.ModelDrafter(draft), "lookup": drafters.PromptLookupDrafter,
               "none": lambda: None}[drafter_kind]()
    queue = decoder.RequestQueue(r for r, row in zip(requests, rows) if row["arrives"] == 0)
    late = sorted((row["arrives"], n) for n, row in enumerate(rows) if row["arrives"] > 0)
    outputs, done = {}, 0
    schedule_policy = policy.make_policy(schedule, 4)
    while True:
        for step in decoder.speculative_steps(target, drafter, queue, None, schedule_policy, batch_size=batch_size):
            outputs.setdefault(step.index, []).extend(step.tokens)
            row = rows[[r.index for r in requests].index(step.index)]
            if row["cancel"] and not row["greedy"]:
                queue.cancel(step.index)
            done += 1
            while late and late[0][0] <= done:
                queue.put(requests[late.pop(0)[1]])
        if not late:
            break
        queue.put(requests[late.pop(0)[1]])  # the batch ran dry before it arrived: a new run, as the server does
    for request, row in zip(requests, rows):
        tokens = outputs.get(request.index, [])
        assert request.stats.generated == len(tokens) <= row["max_tokens"]
        assert request.stats.accepted <= request.stats.drafted
        assert all(0 <= t < target.vocab_size for t in tokens)
        if row["greedy"]:
            assert tokens == alone[row["prompt"]][: row["max_tokens"]], row
        elif not row["cancel"]:
            assert len(tokens) == row["max_tokens"] or tokens[-1] == target.eos_token_id


def test_a_seeded_row_reproduces_beside_others(llama):
    target, draft, _, ids, _ = llama

    def run(neighbours):
        own = decoder.Request(ids[0], LONGEST, decoder.Sampling(1.0, 0, 0.9), seed=11)
        others = [decoder.Request(ids[i], LONGEST, decoder.Sampling(0.8), seed=None) for i in range(1, 1 + neighbours)]
        tokens = []
        for step in decoder.speculative_steps(target, drafters.ModelDrafter(draft),
                                              decoder.RequestQueue([own] + others), None,
                                              policy.ConstantPolicy(3), batch_size=4):
            if step.index == own.index:
                tokens += step.tokens
        return tokens

    first = run(0)
    assert run(0) == first
    # Alongside unseeded rows of the same length the row's stream is its own.
    assert run(2) == first


def test_generate_and_stream_agree_with_plain_greedy(llama, load_pair):
    target, draft, tokenizer, ids, alone = llama
    pair = api.Pair(target, draft, tokenizer, "llama")
    done = api.generate(pair, PROMPTS[3], max_tokens=LONGEST, num_draft=3)
    assert done.tokens == alone[3]
    assert done.text == text_of(tokenizer, alone[3])
    assert done.finish_reason == ("length" if len(alone[3]) == LONGEST else "stop")
    assert done.stats.generated == len(alone[3]) and done.stats.target_calls >= 1
    stats = decoder.Stats()
    assert "".join(api.stream(pair, PROMPTS[3], stats=stats, max_tokens=LONGEST)) == done.text
    assert stats.generated == done.stats.generated
    lookup = api.Pair(target, None, tokenizer, "llama", prompt_lookup=True)
    assert api.generate(lookup, PROMPTS[3], max_tokens=LONGEST).tokens == alone[3]


def test_characters_split_across_tokens_stream_whole(llama):
    """The byte-level BPE spells an emoji or CJK character with several tokens: never half a character."""
    _, _, tokenizer, _, _ = llama
    text = "caf\u00e9 \U0001F600 \u4e16\u754c done"
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in text_of(tokenizer, tokens[:n]) for n in range(len(tokens)))  # the case is real
    for stop in ([], ["\u754c"], ["\U0001F600 "]):
        generation = api.Generation(tokenizer, frozenset(), stop)
        pieces = [generation.add(decoder.Step(0, [t], 0, 0, 0, n == len(tokens) - 1, 0, 0))
                  for n, t in enumerate(tokens)]
        want = text[: text.find(stop[0])] if stop else text
        assert "".join(pieces) == want
        assert not any("\ufffd" in p for p in pieces)
        assert generation.finish_reason == ("stop" if stop else "length")


@given(text=st.text(alphabet="ab\u00e9\n", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=6),
       stops=st.lists(st.text(alphabet="ab\u00e9\n", min_size=1, max_size=3), max_size=3))
def test_stop_text_cuts_at_the_first_stop(text, cuts, stops):
    """Fed in any chunks, StopText hands on exactly the text before the earliest stop string."""
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    stop_text = api.StopText(stops)
    given_out = "".join(stop_text.feed(chunk) for chunk in chunks) + stop_text.feed("", final=True)
    found = [text.find(s) for s in stops if s in text]
    assert given_out == (text[: min(found)] if found else text)
    assert stop_text.stopped == bool(found)


@pytest.mark.parametrize("values, needle", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(delta=2.0), "delta"), (dict(seed=-1), "seed"), (dict(num_draft=0), "num_draft"),
    (dict(schedule="fast"), "schedule"), (dict(temperature=float("nan")), "finite"), (dict(colour=1), "unknown"),
])
def test_settings_out_of_range_are_one_line_errors(values, needle):
    with pytest.raises(api.UsageError, match=needle):
        api.settings(**values)


def test_load_refuses_two_drafters():
    with pytest.raises(api.UsageError, match="not both"):
        api.load("anything", draft="other", prompt_lookup=True)


def test_per_row_sampling_matches_one_setting_per_row():
    """A batch of per-row settings gives each row what its own setting gives it alone."""
    logits = mx.random.normal((3, 2, 40), key=mx.random.key(0))
    settings_ = [decoder.Sampling(0.7, 5, 0.9), decoder.Sampling(0.0, 0, 1.0), decoder.Sampling(1.3, 0, 0.5)]
    together = decoder.distribution(logits, decoder.Sampling.of_rows(settings_))
    for row, one in enumerate(settings_):
        alone = decoder.distribution(logits[row], decoder.Sampling(one.temperature or 1.0, one.top_k, one.top_p))
        assert mx.allclose(together[row], alone).item()
