"""No request can kill the process: context limits, chunked prefill, lone surrogates, faults, signals.

Every family has a context limit (GPT-2's table of positions, Llama's max_position_embeddings,
T5's n_positions for its input and, likewise, its output); a prompt past it, or a prompt plus
max_tokens past it, is refused up front, in one line from main.py and api.py and as a 400
naming the field from server.py. A prompt within it is prefilled in chunks, so memory stays
bounded by the chunk.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

import httpx2 as httpx  # the HTTP client the openai package itself uses
import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, one_error_line
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_causal import checkpoints, reference_logits, relative_error  # noqa: F401  (checkpoints: a fixture)
from test_server import start_server

import api
import decoder
import policy
from engine import Engine

FAMILIES = ["gpt2", "llama", "t5"]
LIMIT = 512  # the tiny pairs' limit: GPT-2's n_positions, T5's default n_positions (Llama's is 2048)
LONG = "a " * 50_000  # 50k tokens to the synthetic tokenizers
MEMORY_BOUND = 1.5 * 2**30  # bytes of peak resident memory a refused or chunked long prompt stays under


@pytest.fixture(scope="module")
def pairs(pair_dirs):
    """family -> (target folder, draft folder, api.Pair) of the tests' tiny pairs."""
    made = {}
    for family in FAMILIES:
        target, draft = pair_dirs(0.05, family=family)
        made[family] = (target, draft, api.load(str(target), str(draft)))
    return made


def run_measured(*args, timeout=300):
    """(the finished process, its peak resident memory in bytes) of a script run as a user would."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage, ru_maxrss in KiB
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, process.returncode, out.read(), err.read()), usage.ru_maxrss * 1024


# ----- chunked prefill --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_chunked_prefill_of_left_padded_rows_matches_transformers(checkpoints, name):  # noqa: F811
    """Rows of different lengths, longer than the chunk, left-padded: the logits after the prefill are transformers'."""
    hf, ours, *_ = checkpoints(name)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, ours.vocab_size, n).tolist() for n in (70, 23, 1, 45, 16, 17)]
    ours.prefill_chunk = 16
    try:
        cache, firsts = ours.start(prompts)
        logits = ours.decode(mx.array(firsts)[:, None], cache)[:, -1]
        # One step further: the cache the chunks left serves the next token too.
        nexts = mx.argmax(logits, axis=-1)
        after = ours.decode(nexts[:, None], cache)[:, -1]
    finally:
        del ours.prefill_chunk
    for row, ids in enumerate(prompts):
        expected = reference_logits(hf, [ids + [int(nexts[row])]])[0]
        assert relative_error(logits[row], expected[-2]) < 1e-4, (name, len(ids))
        assert relative_error(after[row], expected[-1]) < 1e-4, (name, len(ids))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_prefill_keeps_greedy_speculative_output(pairs, family):
    """Greedy speculative decoding of a batch with prompts past the chunk equals the target's plain greedy output."""
    *_, pair = pairs[family]
    prompts = [pair.tokenizer("Close the file. " * n).input_ids for n in (30, 3, 12)]
    alone = [list(decoder.generate(pair.target, ids, 12)) for ids in prompts]
    for m in pair.models:
        m.prefill_chunk = 8
    try:
        stats = [decoder.Stats() for _ in prompts]
        tokens = [[] for _ in prompts]
        for step in decoder.speculative_steps(pair.target, decoder.as_drafter(pair.draft), prompts, 12,
                                              policy.make_policy("constant", 3), batch_size=3, stats=stats):
            tokens[step.index] += step.tokens
    finally:
        for m in pair.models:
            del m.prefill_chunk
    assert tokens == alone


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_short_request_does_not_wait_for_a_long_prompts_prefill(pairs, family):
    """A long prompt is prefilled a chunk per step: a short request queued after it decodes meanwhile
    and ends before the long one's first token, and each gets what it gets alone."""
    *_, pair = pairs[family]
    long_ids = pair.tokenizer("Close the file. " * 40).input_ids
    short_ids = pair.tokenizer("Sort the rows").input_ids
    alone = [list(decoder.generate(pair.target, ids, 6)) for ids in (long_ids, short_ids)]
    pair.target.prefill_chunk = 8  # the long prompt takes more chunks than the short one takes steps
    try:
        queue = decoder.RequestQueue([decoder.Request(long_ids, 6), decoder.Request(short_ids, 6)])
        steps = list(decoder.speculative_steps(pair.target, decoder.as_drafter(pair.draft), queue, None,
                                               policy.make_policy("constant", 2), batch_size=4))
    finally:
        del pair.target.prefill_chunk
    assert len(long_ids) > 8 * 12
    order = [step.index for step in steps]
    assert order.index(0) > max(i for i, index in enumerate(order) if index == 1)
    assert [sum((s.tokens for s in steps if s.index == n), []) for n in (0, 1)] == alone


# ----- limits: main.py and api.py ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_a_50k_token_prompt_to_main_is_one_line_naming_the_limit(pairs, family, tmp_path):
    target, draft, pair = pairs[family]
    assert len(pair.tokenizer(LONG).input_ids) > 40_000
    prompt_file = tmp_path / "long.jsonl"
    prompt_file.write_text(json.dumps({"prompt": LONG}) + "\n")
    result, peak = run_measured(ROOT / "main.py", "--model", target, "--draft-model", draft,
                                "--prompt-file", prompt_file, "--max-tokens", 3)
    line = one_error_line(result)
    limit = pair.target.max_source_positions or pair.target.max_positions
    assert "prompt" in line and f"{limit} positions" in line, line
    assert peak < MEMORY_BOUND


def test_a_long_prompt_within_the_limit_runs_in_bounded_memory(pair_dirs, tmp_path):
    """A Llama whose context holds 12k tokens: a 12k-token prompt runs, prefilled in chunks of 512 tokens."""
    target, _ = pair_dirs(0.05, family="llama")
    wide = tmp_path / "wide"
    subprocess.run(["cp", "-r", str(target), str(wide)], check=True)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=16384)))
    prompt_file = tmp_path / "long.jsonl"
    prompt_file.write_text(json.dumps({"prompt": "a " * 12_000}) + "\n")
    result, peak = run_measured(ROOT / "main.py", "--model", wide, "--regular-decode",
                                "--prompt-file", prompt_file, "--max-tokens", 2, "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["tokens"]) == 2
    # One pass over 12k tokens would hold (4 heads x 12k x 12k) float32 scores per layer: 2.3 GB.
    assert peak < MEMORY_BOUND


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(FAMILIES), data=st.data())
def test_a_request_past_the_context_is_refused_naming_the_field(pairs, family, data):
    """api.request, which Engine.submit and the server use: refused exactly when the family's rule says, with param."""
    *_, pair = pairs[family]
    limit = pair.target.max_positions
    around = [st.integers(0, 8), st.integers(limit - 8, limit + 8), st.integers(limit, 100_000)]
    length = data.draw(st.one_of(around), label="prompt tokens")
    max_tokens = data.draw(st.one_of(st.integers(-3, 8), *around[1:], st.integers(limit, 2**70)), label="max_tokens")
    if max_tokens < 1:
        expected = "settings"
    elif family == "t5":  # the prompt and the output each have n_positions
        expected = "prompt" if max(length, 1) > limit else "max_tokens" if max_tokens > limit else "ok"
    else:  # they share the positions
        expected = ("prompt" if max(length, 1) > limit else
                    "max_tokens" if max(length, 1) + max_tokens - 1 > limit else "ok")
    try:
        api.request(pair, [5] * length, api.Settings(max_tokens=max_tokens))
        assert expected == "ok"
    except api.UsageError as error:
        assert expected != "ok"
        if expected != "settings":
            assert error.param == expected and str(limit) in str(error)


@pytest.mark.parametrize("prompt", ["\ud800 x", "x \udfff", "ok \udcff"])
def test_a_lone_surrogate_is_a_usage_error_naming_the_prompt(pairs, prompt):
    *_, pair = pairs["llama"]
    with pytest.raises(api.UsageError, match="surrogate") as error:
        api.generate(pair, prompt, max_tokens=2)
    assert error.value.param == "prompt"


def test_a_lone_surrogate_in_a_prompt_file_is_one_line(pairs, tmp_path):
    target, draft, _ = pairs["t5"]
    prompt_file = tmp_path / "odd.jsonl"
    prompt_file.write_text('{"prompt": "\\ud800 x"}\n')
    result, _ = run_measured(ROOT / "main.py", "--model", target, "--draft-model", draft,
                             "--prompt-file", prompt_file, "--max-tokens", 2)
    assert "U+D800" in one_error_line(result)


# ----- the engine: one request's fault is its own -------------------------------------------

class Faulty:
    """A model whose prefill fails for any prompt holding token `poison` (a fault inside one request)."""

    def __init__(self, model, poison):
        self.model, self.poison = model, poison

    def __getattr__(self, name):
        return getattr(self.model, name)

    def start(self, prompts):
        if any(self.poison in ids for ids in prompts):
            raise RuntimeError("injected fault")
        return self.model.start(prompts)


def test_a_fault_in_one_request_ends_only_that_request(pairs):
    *_, pair = pairs["llama"]
    good = [pair.tokenizer(p).input_ids for p in ("Close the file.", "Sort the rows", "Join two paths.")]
    alone = [list(decoder.generate(pair.target, ids, 10)) for ids in good]
    poison = pair.target.vocab_size - 1
    faulty = api.Pair(Faulty(pair.target, poison), pair.draft, pair.tokenizer, pair.name)
    engine = Engine(faulty, max_batch=4, num_draft=3, schedule="constant")
    done, events = threading.Event(), {}

    def listener(name):
        def hear(event):
            events.setdefault(name, []).append(event)
            if len(events) == 4 and all(e[-1].finish_reason or e[-1].error for e in events.values()):
                done.set()
        return hear

    try:
        # The first runs; the bad one and the two others arrive while it decodes, and are admitted together.
        engine.submit(good[0], api.Settings(max_tokens=10), listener(0))
        engine.submit(good[1][:2] + [poison], api.Settings(max_tokens=10), listener("bad"))
        engine.submit(good[1], api.Settings(max_tokens=10), listener(1))
        engine.submit(good[2], api.Settings(max_tokens=10), listener(2))
        assert done.wait(120)
    finally:
        engine.close()
        engine.join()
    assert events["bad"][-1].error and "injected fault" in events["bad"][-1].error
    for n, ids in enumerate(good):
        assert events[n][-1].finish_reason in ("stop", "length")
        assert "".join(e.text for e in events[n]) == api.text_of(pair.tokenizer, alone[n])
    assert not engine.thread.is_alive()


@pytest.mark.parametrize("ids, param", [([10**9], "prompt"), ([-1], "prompt"), ([5] * 600, "prompt"),
                                        ([5], "max_tokens")])
def test_the_engine_checks_each_request_at_submit(pairs, ids, param):
    *_, pair = pairs["gpt2"]
    engine = Engine(pair, max_context=None)
    try:
        with pytest.raises(api.UsageError) as error:
            engine.submit(ids, api.Settings(max_tokens=LIMIT + 1), lambda event: None)
        assert error.value.param == param
    finally:
        engine.close()
        engine.join()


# ----- the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(pairs):
    """(process, url) of a T5 server whose context --max-context lowers to 256 tokens."""
    target, draft, _ = pairs["t5"]
    process, url = start_server(target, draft, "--max-context", "256", "--max-batch", "2")
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def post(url, path, body):
    return httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=120)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": LONG, "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "a " * 300, "max_tokens": 3}, "prompt"),  # past --max-context, within 512
    ("/v1/completions", {"prompt": "x", "max_tokens": 257}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"prompt": "\ud800 x", "max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "b" * 1_000_000}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800 x"}], "max_tokens": 3}, "messages"),
])
def test_the_server_refuses_with_400_naming_the_field(served, path, body, param):
    process, url = served
    reply = post(url, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert post(url, "/v1/completions", {"prompt": "Sort", "max_tokens": 2}).status_code == 200
    assert process.poll() is None


odd_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.one_of(odd_text, st.integers(0, 60_000).map(lambda n: "a " * n),
                        st.tuples(odd_text, st.integers(0, 4)).map(lambda t: t[0] + "\ud800" * t[1])),
       max_tokens=st.one_of(st.none(), st.integers(-3, 3), st.integers(250, 2**70)), chat=st.booleans())
def test_whatever_the_prompt_the_server_answers_json(served, prompt, max_tokens, chat):
    """Odd Unicode, lone surrogates, lengths past every limit, max_tokens out of range: a 200 or a 400 with param."""
    process, url = served
    body = {"max_tokens": max_tokens if max_tokens is not None else 2}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    reply = post(url, path, body)
    assert reply.status_code in (200, 400), reply.text
    answer = reply.json()
    if reply.status_code == 400:
        assert answer["error"]["param"] in ("prompt", "messages", "max_tokens"), answer
    else:
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert process.poll() is None


def stop_once(pairs, sig, during_stream):
    """Start a server, give it a request (or open a stream), stop it with `sig`: its exit code and stderr."""
    target, draft, _ = pairs["gpt2"]
    process, url = start_server(target, draft)
    try:
        if during_stream:
            body = {"prompt": "Close the file.", "max_tokens": 450, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
                lines = reply.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                process.send_signal(sig)
                assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
        else:
            assert post(url, "/v1/completions", {"prompt": "Sort", "max_tokens": 5}).status_code == 200
            process.send_signal(sig)
        return process.wait(timeout=60), process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_server_exits_0_on_every_stop(pairs, sig):
    """The engine's thread is joined before the interpreter exits (a thread left inside MLX aborted it: exit -6)."""
    for during_stream in (True, False, True):
        code, err = stop_once(pairs, sig, during_stream)
        assert code == 0 and "terminate called" not in err and "Traceback" not in err, err
