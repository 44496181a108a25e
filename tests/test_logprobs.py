"""Log-probabilities: what the verify pass gives for each emitted token is the target's own log-softmax,
whoever drafted and however many tokens a step took (plain decoding and a full forward pass as references)."""

import mlx.core as mx
import pytest
from conftest import OFTEN, RARELY
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoder import PROMPTS, prompt_ids

import api
import decoder
import policy

FAMILIES = ["t5", "gpt2", "llama"]
MAX_TOKENS = 16


def logprobs_of(target, drafter, ids, k, n, max_tokens=MAX_TOKENS):
    """[(token, logprob, top)] of one prompt decoded greedily with k drafts per step."""
    queue = decoder.RequestQueue([decoder.Request(ids, max_tokens, logprobs=n)])
    return [entry for step in decoder.speculative_steps(target, drafter, queue, None, policy.ConstantPolicy(k))
            for entry in step.logprobs]


def full_forward_logprobs(target, ids, tokens):
    """Log-softmax of a decoder-only target's logits over prompt + tokens in one pass from an empty cache."""
    logits = target(mx.array([ids + tokens[:-1]]))[0, len(ids) - 1 :]
    return (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eps", [OFTEN, RARELY])
def test_speculative_logprobs_are_plain_decodings(load_pair, family, eps):
    target, draft, tokenizer = load_pair(eps, family=family)
    for ids in prompt_ids(tokenizer):
        plain = logprobs_of(target, None, ids, 0, 4)
        for k in (1, 3):
            speculative = logprobs_of(target, decoder.as_drafter(draft), ids, k, 4)
            assert [token for token, _, _ in speculative] == [token for token, _, _ in plain]
            for (token, logprob, top), (_, want, want_top) in zip(speculative, plain):
                assert logprob == pytest.approx(want, abs=1e-4)
                assert [lp for _, lp in top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)
                assert top[0][0] == token and len(top) == 4  # greedy: the emitted token is the most likely
                assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logprobs_equal_a_full_forward_pass(load_pair, family):
    """The independent reference: the target's logits over the whole text at once."""
    target, draft, tokenizer = load_pair(OFTEN, family=family)
    for ids in prompt_ids(tokenizer):
        entries = logprobs_of(target, decoder.as_drafter(draft), ids, 3, 2)
        tokens = [token for token, _, _ in entries]
        reference = full_forward_logprobs(target, ids, tokens)
        for position, (token, logprob, top) in enumerate(entries):
            assert logprob == pytest.approx(reference[position][token], abs=1e-4)
            for other, lp in top:
                assert lp == pytest.approx(reference[position][other], abs=1e-4)


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), wanted=st.lists(st.sampled_from([None, 0, 1, 5]), min_size=1, max_size=3),
       k=st.integers(0, 4), temperature=st.sampled_from([0.0, 0.8]))
def test_each_row_gets_the_logprobs_it_asked_for(load_pair, family, wanted, k, temperature):
    """Rows of one batch asking for none, 0 or n alternatives each get theirs: one entry per token they
    receive, the emitted token's own log-probability at most the best one's."""
    target, draft, tokenizer = load_pair(OFTEN, family=family)
    ids = prompt_ids(tokenizer)
    sampling = decoder.Sampling(temperature)
    queue = decoder.RequestQueue([decoder.Request(ids[n % len(ids)], 10, sampling, logprobs=n_top, seed=n)
                                  for n, n_top in enumerate(wanted)])
    got = {}
    for step in decoder.speculative_steps(target, decoder.as_drafter(draft), queue, None, policy.ConstantPolicy(k),
                                          batch_size=len(wanted)):
        if wanted[step.index] is None:
            assert step.logprobs is None
            continue
        assert [token for token, _, _ in step.logprobs] == step.tokens
        got.setdefault(step.index, []).extend(step.logprobs)
    for index, entries in got.items():
        for token, logprob, top in entries:
            assert logprob <= 0 and len(top) == wanted[index]
            assert all(lp <= 0 and lp <= top[0][1] + 1e-5 for _, lp in top) and (not top or logprob <= top[0][1] + 1e-5)


def test_the_python_api_gives_one_entry_per_token_cut_at_a_stop_string(load_pair):
    target, draft, tokenizer = load_pair(OFTEN, family="llama")
    pair = api.Pair(target, draft, tokenizer, "llama")
    whole = api.generate(pair, PROMPTS[0], max_tokens=MAX_TOKENS, logprobs=1, schedule="constant", num_draft=3)
    assert [token for token, _, _ in whole.logprobs] == whole.tokens
    stop = api.text_of(tokenizer, whole.tokens[4:6])
    cut = api.generate(pair, PROMPTS[0], max_tokens=MAX_TOKENS, logprobs=1, stop=stop, schedule="constant",
                       num_draft=3)
    assert [token for token, _, _ in cut.logprobs] == cut.tokens and len(cut.tokens) < len(whole.tokens)
    assert api.generate(pair, PROMPTS[0], max_tokens=4).logprobs is None
