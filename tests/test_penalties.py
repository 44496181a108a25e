"""logit_bias and presence/frequency penalties (OpenAI's): speculative decoding gives exactly what plain
decoding with the same adjusted logits gives, and both equal an independent greedy loop over full passes."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import OFTEN
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoder import PROMPTS

import api
import decoder
import policy

MAX_TOKENS = 16


def reference(target, ids, max_tokens, bias=None, presence=0.0, frequency=0.0):
    """Greedy tokens of a decoder-only target, each from a full forward pass over prompt + output, its
    logits adjusted here in numpy: + bias, - frequency x count - presence x (count > 0) over the output."""
    output = []
    while len(output) < max_tokens:
        logits = np.array(target(mx.array([ids + output]))[0, -1], np.float64)
        for token, value in (bias or {}).items():
            logits[token] += value
        counts = np.bincount(np.array(output, np.int64), minlength=logits.shape[0])[: logits.shape[0]]
        logits -= frequency * counts + presence * (counts > 0)
        output.append(int(np.argmax(logits)))
        if output[-1] in target.eos_token_ids:
            break
    return output


def decoded(target, drafter, ids, k, sampling, max_tokens=MAX_TOKENS):
    queue = decoder.RequestQueue([decoder.Request(ids, max_tokens, sampling)])
    return [t for step in decoder.speculative_steps(target, drafter, queue, None, policy.ConstantPolicy(k))
            for t in step.tokens]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_penalties_and_bias_match_an_independent_greedy_loop(load_pair, family):
    target, draft, tokenizer = load_pair(OFTEN, family=family)
    ids = tokenizer(PROMPTS[0]).input_ids
    plain_first = decoded(target, None, ids, 0, decoder.Sampling())[0]
    cases = [dict(frequency=1.5), dict(presence=2.0), dict(bias={plain_first: -100.0, 7: 5.0}),
             dict(bias={3: 2.0}, presence=-0.5, frequency=0.7)]
    for case in cases:
        want = reference(target, ids, MAX_TOKENS, **case)
        sampling = decoder.Sampling(logit_bias=case.get("bias"), presence_penalty=case.get("presence", 0.0),
                                    frequency_penalty=case.get("frequency", 0.0))
        assert decoded(target, None, ids, 0, sampling) == want, case
        for k in (1, 3):
            assert decoded(target, decoder.as_drafter(draft), ids, k, sampling) == want, (case, k)
    assert reference(target, ids, MAX_TOKENS, frequency=1.5) != reference(target, ids, MAX_TOKENS)


@settings(max_examples=15, deadline=None)
@given(family=st.sampled_from(["t5", "gpt2", "llama"]),
       rows=st.lists(st.tuples(st.dictionaries(st.integers(0, 60), st.floats(-100, 100), max_size=3),
                               st.floats(-2, 2), st.floats(-2, 2)), min_size=1, max_size=3),
       k=st.integers(1, 4))
def test_a_batch_with_its_own_biases_and_penalties_per_row_is_plain_decoding(load_pair, family, rows, k):
    """Each row of a batch, with its own bias and penalties, gets what plain decoding gives it alone."""
    target, draft, tokenizer = load_pair(OFTEN, family=family)
    samplings = [decoder.Sampling(logit_bias=bias or None, presence_penalty=presence, frequency_penalty=frequency)
                 for bias, presence, frequency in rows]
    prompts = [tokenizer(PROMPTS[n % len(PROMPTS)]).input_ids for n in range(len(rows))]
    alone = [decoded(target, None, ids, 0, sampling, 12) for ids, sampling in zip(prompts, samplings)]
    queue = decoder.RequestQueue([decoder.Request(ids, 12, sampling) for ids, sampling in zip(prompts, samplings)])
    together = [[] for _ in rows]
    for step in decoder.speculative_steps(target, decoder.as_drafter(draft), queue, None, policy.ConstantPolicy(k),
                                          batch_size=len(rows)):
        together[step.index] += step.tokens
    assert together == alone


def test_the_api_checks_biases_and_penalties(load_pair):
    target, draft, tokenizer = load_pair(OFTEN, family="llama")
    pair = api.Pair(target, draft, tokenizer, "llama")
    for values, needle in [(dict(presence_penalty=2.5), "presence_penalty"),
                           (dict(frequency_penalty=-3), "frequency_penalty"),
                           (dict(logit_bias={5: 101}), "logit_bias"),
                           (dict(logit_bias={target.vocab_size: 1}), "logit_bias")]:
        with pytest.raises(api.UsageError, match=needle):
            api.generate(pair, PROMPTS[0], max_tokens=2, **values)
    ids = tokenizer(PROMPTS[0]).input_ids
    banned = reference(target, ids, 1)[0]
    text = api.generate(pair, PROMPTS[0], max_tokens=6, logit_bias={banned: -100})
    assert text.tokens[0] != banned and text.tokens == reference(target, ids, 6, bias={banned: -100})
