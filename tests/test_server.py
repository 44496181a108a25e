"""server.py through the official openai client: continuous batching gives every request the target's own output."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package itself uses
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import ROOT, one_error_line, run_script

import api
import decoder
import server

openai = pytest.importorskip("openai")

# A template of our own: the chat test can tell that it was applied.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPTS = [
    "Return the number of items.",
    "Close the file.",
    "Create a new parser with the given options",
    "Sort",
    "Write the rows to the CSV file using the dialect given",
    "Join two paths.",
]
LONGEST = 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(pair_dirs, tmp_path_factory):
    """A GPT-2 pair (learned positions: a prompt can run past them), the target's tokenizer given a chat template."""
    target, draft = pair_dirs(0.05, family="gpt2")
    root = tmp_path_factory.mktemp("served")
    target = shutil.copytree(target, root / "target")
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=TEMPLATE)))
    return target, draft


def start_server(target, draft, *flags):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "--model", str(target), "--draft-model", str(draft),
         "--port", str(port), *flags], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up")


@pytest.fixture(scope="module")
def served(folders):
    """(process, base url, client): a server batching up to 4 requests, 3 drafts per step, constant schedule."""
    process, url = start_server(*folders, "--max-batch", "4", "--num-draft", "3", "--draft-schedule", "constant")
    yield process, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def loaded(folders):
    """The same pair loaded here (the tokenizer and the name the server uses)."""
    return api.load(str(folders[0]), str(folders[1]))


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory):
    """main.py's greedy tokens (--regular-decode: the target alone) for every prompt, LONGEST tokens each."""
    prompt_file = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    result = run_script("main.py", "--model", folders[0], "--regular-decode", "--prompt-file", prompt_file,
                        "--max-tokens", LONGEST, "--json")
    assert result.returncode == 0, result.stderr
    return {record["prompt"]: record["tokens"] for record in map(json.loads, result.stdout.splitlines())}


def expected_text(loaded, reference, prompt, max_tokens):
    return api.text_of(loaded.tokenizer, reference[prompt][:max_tokens])


def complete(client, model, prompt, **settings):
    return client.completions.create(model=model, prompt=prompt, **settings)


def test_models_and_health(served, loaded):
    _, url, client = served
    assert [m.id for m in client.models.list().data] == [loaded.name]
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_concurrent_greedy_requests_equal_main_alone(served, loaded, reference):
    """Mixed lengths and settings share batches (some rows sample); every greedy one is main.py's output."""
    _, _, client = served
    jobs = []
    for i, prompt in enumerate(PROMPTS * 2):
        settings = dict(max_tokens=[LONGEST, 5, 17, 1, 11, 24][i % 6], temperature=0.0,
                        extra_body=dict(num_draft=1 + i % 3, top_k=[0, 5][i % 2]))
        jobs.append((prompt, settings))
    sampled = [(PROMPTS[0], dict(max_tokens=20, temperature=1.0, seed=i)) for i in range(3)]
    with ThreadPoolExecutor(len(jobs) + len(sampled)) as pool:
        futures = [pool.submit(complete, client, loaded.name, prompt, **settings) for prompt, settings in jobs + sampled]
        responses = [f.result() for f in futures]
    for (prompt, settings), response in zip(jobs, responses):
        choice = response.choices[0]
        assert choice.text == expected_text(loaded, reference, prompt, settings["max_tokens"]), (prompt, settings)
        assert response.usage.completion_tokens <= settings["max_tokens"]
        spec = response.model_extra["speculative"]
        assert spec["accepted"] <= spec["drafted"] and spec["target_calls"] >= 1
        full = len(reference[prompt][: settings["max_tokens"]]) == settings["max_tokens"]
        assert choice.finish_reason == ("length" if full else "stop")


def test_stream_equals_whole_response(served, loaded):
    _, _, client = served
    for prompt in PROMPTS[:3]:
        whole = complete(client, loaded.name, prompt, max_tokens=LONGEST, temperature=0)
        pieces = list(complete(client, loaded.name, prompt, max_tokens=LONGEST, temperature=0, stream=True))
        texts = [p.choices[0].text for p in pieces]
        assert "".join(texts) == whole.choices[0].text
        assert "\ufffd" not in "".join(texts[:-1]) or "\ufffd" in whole.choices[0].text
        assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(served, loaded, reference):
    _, _, client = served
    prompt = PROMPTS[2]
    full = expected_text(loaded, reference, prompt, LONGEST)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    want = full[: full.find(stop)]
    response = complete(client, loaded.name, prompt, max_tokens=LONGEST, temperature=0, stop=[stop, "\x00never"])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (want, "stop")
    streamed = complete(client, loaded.name, prompt, max_tokens=LONGEST, temperature=0, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in streamed) == want


def test_chat_applies_the_template(served, loaded):
    _, _, client = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Close the file."}]
    response = client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=12, temperature=0)
    text = "<system> Be brief.\n<user> Close the file.\n<assistant> "
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    plain = api.text_of(loaded.tokenizer, list(decoder.generate(loaded.target, ids, 12)))
    assert response.choices[0].message.content == plain
    assert response.usage.prompt_tokens == len(ids)
    streamed = client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain


def test_seeded_sampling_reproduces(served, loaded):
    _, _, client = served
    runs = [complete(client, loaded.name, PROMPTS[1], max_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
            .choices[0].text for seed in (3, 3, 4, 5)]
    assert runs[0] == runs[1]
    assert len(set(runs)) > 1  # three seeds all giving one text would mean the seed is ignored


@pytest.mark.parametrize("body, needle, param", [
    (b"{not json", "malformed JSON", None),
    (dict(prompt="x", max_tokens="ten"), "max_tokens", "max_tokens"),
    (dict(prompt="x", temperature=-1), "temperature", "temperature"),
    (dict(prompt="x", top_p=0), "top_p", "top_p"),
    (dict(prompt="x", seed=2**64), "seed", "seed"),
    (dict(prompt="x", max_completion_tokens=0), "max_completion_tokens", "max_completion_tokens"),
    (dict(prompt="x", n=2), "n must be 1", "n"),
    (dict(prompt="x", max_tokens=600), "positions", "max_tokens"),
    (dict(prompt="x", num_draft=4), "at most 3", "num_draft"),
    (dict(prompt="x", model="no-such-model"), "unknown model", "model"),
    (dict(prompt="x", stream_options={"include_usage": True}), "stream: true", "stream_options"),
    (dict(max_tokens=3), "prompt", "prompt"),
])
def test_bad_requests_get_400_naming_the_field_and_the_server_goes_on(served, loaded, body, needle, param):
    process, url, client = served
    if isinstance(body, dict):
        body = json.dumps({"model": loaded.name, **body}).encode()
    reply = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert complete(client, loaded.name, "Sort", max_tokens=2).choices[0].text is not None
    assert process.poll() is None


# OpenAI fields this server does not honour: (endpoint, field, a value refused, a value accepted).
REFUSED = [
    ("completions", "best_of", 2, 1),
    ("completions", "suffix", "end", ""),
    ("completions", "n", 3, 1),
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}], []),
    ("chat/completions", "tool_choice", "auto", "none"),
    ("chat/completions", "functions", [{"name": "f"}], []),
    ("chat/completions", "response_format", {"type": "json_object"}, {"type": "text"}),
    ("chat/completions", "audio", {"voice": "alloy"}, None),
]


def plain_logprobs(loaded, prompt, n, max_tokens=12):
    """The target's own log-probabilities under plain decoding in this process (no draft, no server):
    [(token, logprob, [(token, logprob)] * n)]."""
    plain = api.Pair(loaded.target, None, loaded.tokenizer, loaded.name)
    return api.generate(plain, prompt, max_tokens=max_tokens, logprobs=n).logprobs


def test_completion_logprobs_are_the_targets_own(served, loaded):
    """Speculative decoding through the server gives plain decoding's log-probabilities, whole and streamed."""
    _, _, client = served
    expected = plain_logprobs(loaded, PROMPTS[2], 3)
    spell = lambda token: api.text_of(loaded.tokenizer, [token])  # noqa: E731
    got = complete(client, loaded.name, PROMPTS[2], max_tokens=12, logprobs=3).choices[0].logprobs
    assert got.tokens == [spell(token) for token, _, _ in expected]
    assert got.token_logprobs == pytest.approx([logprob for _, logprob, _ in expected], abs=1e-4)
    for top, spelled, (_, _, want) in zip(got.top_logprobs, got.tokens, expected):
        assert sorted(top.values(), reverse=True) == pytest.approx([lp for _, lp in want], abs=1e-4)
        assert max(top, key=top.get) == spelled  # greedy: the token given is the most likely
    assert got.text_offset == [sum(map(len, got.tokens[:i])) for i in range(len(got.tokens))]
    chunks = complete(client, loaded.name, PROMPTS[2], max_tokens=12, logprobs=3, stream=True)
    streamed = [lp for chunk in chunks for choice in chunk.choices if choice.logprobs
                for lp in choice.logprobs.token_logprobs]
    assert streamed == pytest.approx(got.token_logprobs, abs=1e-4)


def test_chat_logprobs_are_the_targets_own(served, loaded):
    _, _, client = served
    messages = [{"role": "user", "content": "Sort the rows"}]
    text, special = server.chat_prompt(loaded.tokenizer, [server.Message(**m) for m in messages])
    expected = plain_logprobs(loaded, api.encode_text(loaded.tokenizer, text, add_special_tokens=special), 2)
    reply = client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=12, logprobs=True,
                                           top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx([lp for _, lp, _ in expected], abs=1e-4)
    for entry, (token, _, top) in zip(content, expected):
        assert entry.token == api.text_of(loaded.tokenizer, [token]) and bytes(entry.bytes) == entry.token.encode()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-4)
    plain = client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_bias_and_penalties_give_plain_decodings_output(served, loaded):
    """Through the server (a draft, batching) as plain decoding with the same settings gives it here."""
    _, _, client = served
    plain = api.Pair(loaded.target, None, loaded.tokenizer, loaded.name)
    first = api.generate(plain, PROMPTS[1], max_tokens=1).tokens[0]
    for fields in [dict(logit_bias={str(first): -100}), dict(presence_penalty=1.5, frequency_penalty=0.5),
                   dict(logit_bias={"7": 3.0}, frequency_penalty=-0.5)]:
        want = api.generate(plain, PROMPTS[1], max_tokens=12, **{
            **fields, "logit_bias": {int(t): b for t, b in fields.get("logit_bias", {}).items()} or None})
        assert complete(client, loaded.name, PROMPTS[1], max_tokens=12, **fields).choices[0].text == want.text
    messages = [{"role": "user", "content": "Sort the rows"}]
    chat = client.chat.completions.create(model=loaded.name, messages=messages, max_tokens=8,
                                          logit_bias={str(first): -100})
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize("endpoint, fields, param", [
    ("completions", {"logit_bias": {"x1": 1}}, "logit_bias"), ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"logprobs": 21}, "logprobs"), ("completions", {"logprobs": -1}, "logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs")])
def test_fields_out_of_range_are_400s_naming_the_field(served, loaded, endpoint, fields, param):
    _, url, _ = served
    reply = httpx.post(f"{url}/v1/{endpoint}", json=request_body(loaded, endpoint, **fields))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def request_body(loaded, endpoint, **fields):
    base = {"prompt": "Sort"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "Sort"}]}
    return {"model": loaded.name, "max_tokens": 2, **base, **fields}


@pytest.mark.parametrize("endpoint, field, refused, accepted", REFUSED)
def test_fields_it_does_not_honour_are_400s_naming_them(served, loaded, endpoint, field, refused, accepted):
    _, url, _ = served
    reply = httpx.post(f"{url}/v1/{endpoint}", json=request_body(loaded, endpoint, **{field: refused}))
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field and field in reply.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/{endpoint}", json=request_body(loaded, endpoint, **{field: accepted})).status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@given(data=st.data())
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_value_of_any_field_is_answered_and_a_400_names_it(served, loaded, data):
    """Each field of the request schema (server.CompletionBody, server.ChatBody) drawn with any JSON value."""
    process, url, _ = served
    endpoint = data.draw(st.sampled_from(["completions", "chat/completions"]))
    schema = server.CompletionBody if endpoint == "completions" else server.ChatBody
    field = data.draw(st.sampled_from(sorted(schema.model_fields)))
    value = data.draw(JSON_VALUES)
    if field in ("max_tokens", "max_completion_tokens") and isinstance(value, int) and 2 < value < 600:
        value = -value  # a run of hundreds of tokens would only slow the test down
    reply = httpx.post(f"{url}/v1/{endpoint}", json=request_body(loaded, endpoint, **{field: value}), timeout=60)
    assert reply.status_code in (200, 400), reply.text
    if reply.status_code == 400:
        assert reply.json()["error"]["param"] == field, reply.text
    assert process.poll() is None


def test_include_usage_gives_a_last_chunk_of_usage_alone(served, loaded):
    _, _, client = served
    whole = complete(client, loaded.name, PROMPTS[0], max_tokens=9, temperature=0)
    chunks = list(complete(client, loaded.name, PROMPTS[0], max_tokens=9, temperature=0, stream=True,
                           stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    plain = list(complete(client, loaded.name, PROMPTS[0], max_tokens=9, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)
    chat = list(client.chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": "Sort"}],
                                               max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens <= 4


def test_one_model_by_id(served, loaded):
    _, _, client = served
    assert client.models.retrieve(loaded.name).id == loaded.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_echo_puts_the_prompt_before_the_completion(served, loaded, reference):
    _, _, client = served
    prompt = PROMPTS[1]
    want = prompt + expected_text(loaded, reference, prompt, 8)
    assert complete(client, loaded.name, prompt, max_tokens=8, temperature=0, echo=True).choices[0].text == want
    streamed = complete(client, loaded.name, prompt, max_tokens=8, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_a_client_leaving_mid_stream_harms_no_one(served, loaded, reference):
    _, url, client = served

    def leave():
        body = {"model": loaded.name, "prompt": PROMPTS[4], "max_tokens": 400, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        return True  # closed after the first chunk

    with ThreadPoolExecutor(4) as pool:
        leaving = [pool.submit(leave) for _ in range(2)]
        staying = [pool.submit(complete, client, loaded.name, p, max_tokens=LONGEST, temperature=0) for p in PROMPTS[:3]]
        assert all(f.result() for f in leaving)
        for prompt, future in zip(PROMPTS, staying):
            assert future.result().choices[0].text == expected_text(loaded, reference, prompt, LONGEST)
    assert complete(client, loaded.name, "Sort", max_tokens=3).choices[0].text is not None


def test_sigterm_ends_open_streams_and_exits_0(folders, loaded):
    process, url = start_server(*folders, "--max-batch", "2")
    body = {"model": loaded.name, "prompt": PROMPTS[0], "max_tokens": 450, "stream": True, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    # Not OpenAI's finish reasons: an error event (the openai client raises it), then [DONE].
    assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][5:])
    assert not any('"abort"' in line for line in rest)
    assert process.wait(timeout=30) == 0
    assert "Traceback" not in process.stderr.read()


def test_without_a_template_chat_joins_the_contents(loaded):
    """T5 and base models have no chat template: the messages' contents joined by newlines."""
    bare = type("Bare", (), {"chat_template": None})()
    messages = [server.Message(role="user", content="one"), server.Message(role="user", content="two")]
    assert server.chat_prompt(bare, messages) == ("one\ntwo", True)
    assert server.chat_prompt(loaded.tokenizer, messages)[0] == "<user> one\n<user> two\n<assistant> "


def test_an_address_it_cannot_listen_on_is_one_error_line(tmp_path):
    # Checked before the models load: the folder named here does not even exist.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = one_error_line(run_script("server.py", "--model", tmp_path / "none", "--port", port))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
