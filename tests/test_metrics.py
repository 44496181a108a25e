"""server.py's /metrics, /health and usage, in this process: apps over api.Engines, called through the official
openai client over httpx's ASGI transport (each app has a metrics registry of its own)."""

import asyncio

import httpx2 as httpx  # the HTTP client the openai package itself uses
import pytest
from prometheus_client.parser import text_string_to_metric_families

import api
import decoder
import server
from engine import Engine

openai = pytest.importorskip("openai")

PROMPTS = ["Return the number of items.", "Close the file.", "Join two paths.", "Sort"]


@pytest.fixture(scope="module")
def pair(pair_dirs):
    target, draft = pair_dirs(0.05, family="gpt2")
    return api.load(str(target), str(draft)), api.load(str(target))


def make_app(pair, **engine_settings):
    settings = dict(max_batch=4, max_queue=16, num_draft=3, schedule="constant") | engine_settings
    engine = Engine(pair, settings["max_batch"], settings["max_queue"], settings["num_draft"],
                        settings["schedule"])
    return server.build_app(engine, {"num_draft": settings["num_draft"], "schedule": settings["schedule"]})


@pytest.fixture(scope="module")
def apps(pair):
    """(speculative app, plain app) over the same target; their engines end with the module."""
    made = [make_app(pair[0]), make_app(pair[1])]
    yield made
    for app in made:
        app.state.engine.close()


def client(app):
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120)


def openai_client(app):
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="none", max_retries=0,
                              http_client=client(app))


def run(coroutine):
    return asyncio.run(coroutine)


def scrape(app):
    """{(name, labels as a sorted tuple): value} of every sample /metrics gives, parsed by prometheus_client."""
    async def get():
        async with client(app) as http:
            reply = await http.get("/metrics")
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
            return reply.text

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(run(get())) for sample in family.samples}


def delta(after, before, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_agree_with_the_responses_usage(apps, pair):
    app = apps[0]
    name = pair[0].name

    async def requests():
        ai = openai_client(app)
        jobs = [ai.completions.create(model=name, prompt=p, max_tokens=6 + 3 * i, temperature=0)
                for i, p in enumerate(PROMPTS)]
        jobs.append(ai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Sort"}],
                                               max_tokens=5))
        whole = await asyncio.gather(*jobs)
        chunks = [c async for c in await ai.completions.create(
            model=name, prompt=PROMPTS[0], max_tokens=7, stream=True, stream_options={"include_usage": True})]
        with pytest.raises(openai.BadRequestError):
            await ai.completions.create(model=name, prompt="x", max_tokens=2, temperature=-1)
        return whole, chunks

    before = scrape(app)
    whole, chunks = run(requests())
    after = scrape(app)
    usages = [r.usage for r in whole] + [chunks[-1].usage]
    speculative = [r.model_extra["speculative"] for r in whole] + [chunks[-2].model_extra["speculative"]]
    finished = [r.choices[0].finish_reason for r in whole] + [chunks[-2].choices[0].finish_reason]
    by_endpoint = {"/v1/completions": finished[:4] + finished[5:], "/v1/chat/completions": finished[4:5]}
    for endpoint, reasons in by_endpoint.items():
        for reason in set(reasons):
            counted = delta(after, before, "speculative_requests_total", endpoint=endpoint, status="200",
                            finish_reason=reason)
            assert counted == reasons.count(reason), (endpoint, reason)
    assert delta(after, before, "speculative_requests_total", endpoint="/v1/completions", status="400",
                 finish_reason="") == 1
    assert delta(after, before, "speculative_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta(after, before, "speculative_completion_tokens_total") == sum(u.completion_tokens for u in usages)
    assert delta(after, before, "speculative_drafted_tokens_total") == sum(s["drafted"] for s in speculative)
    assert delta(after, before, "speculative_accepted_tokens_total") == sum(s["accepted"] for s in speculative)
    assert delta(after, before, "speculative_time_to_first_token_seconds_count") == len(usages)
    # The constant schedule asks k = 3 of every step; a row that has 1 token left gets k 0.
    steps = delta(after, before, "speculative_num_draft_count")
    assert steps >= len(usages) and delta(after, before, "speculative_num_draft_bucket", le="3.0") == steps
    per_token = delta(after, before, "speculative_time_per_output_token_seconds_count")
    assert 0 < per_token <= sum(u.completion_tokens for u in usages) - len(usages)
    assert after[("speculative_queue_depth", ())] == 0 and after[("speculative_running_rows", ())] == 0


def test_usage_with_a_stop_string_counts_what_the_client_received(apps, pair):
    """A plain and a speculative server hand on one text and count the same tokens: those the text is made of."""
    loaded = pair[0]
    for prompt in PROMPTS[:3]:
        ids = loaded.tokenizer(prompt).input_ids
        tokens = list(decoder.generate(loaded.target, ids, 24))
        full = api.text_of(loaded.tokenizer, tokens)
        stop = full[len(full) // 2 : len(full) // 2 + 2]
        want = full[: full.find(stop)]
        # The fewest of the target's tokens whose text holds what is handed on.
        fewest = next(n for n in range(len(tokens) + 1) if len(api.text_of(loaded.tokenizer, tokens[:n])) >= len(want))

        async def ask(app):
            ai = openai_client(app)
            return await ai.completions.create(model=loaded.name, prompt=prompt, max_tokens=24, temperature=0,
                                               stop=stop)

        replies = [run(ask(app)) for app in apps]
        for reply in replies:
            assert (reply.choices[0].text, reply.choices[0].finish_reason) == (want, "stop")
            assert reply.usage.completion_tokens == fewest, prompt


def test_generation_counts_alike_one_token_or_many_per_step(pair):
    """api.Generation: the same tokens fed one per step or all in one step give the same text and count."""
    tokenizer = pair[0].tokenizer
    tokens = tokenizer("Close the file. Join two paths. Sort the rows.", add_special_tokens=False).input_ids
    text = api.text_of(tokenizer, tokens)
    for stop in (". J", "Sort", "rows.", "Close", "absent"):
        one = api.Generation(tokenizer, frozenset(), [stop], decoder.Stats(generated=len(tokens)))
        pieces = [one.add(decoder.Step(0, [t], 0, 0, 0, n == len(tokens) - 1, 0, 0)) for n, t in enumerate(tokens)]
        many = api.Generation(tokenizer, frozenset(), [stop], decoder.Stats(generated=len(tokens)))
        assert many.add(decoder.Step(0, tokens, 0, 0, 0, True, 0, 0)) == "".join(pieces)
        want = text[: text.find(stop)] if stop in text else text
        assert "".join(pieces) == want and one.tokens == many.tokens
        assert one.stats.generated == many.stats.generated == len(one.tokens)
        assert api.text_of(tokenizer, one.tokens).startswith(want)
        assert len(api.text_of(tokenizer, one.tokens[:-1])) < len(want) or not one.tokens


def test_health_fails_when_the_engine_thread_is_dead(pair, apps):
    app = make_app(pair[1])
    engine = app.state.engine

    async def health(app):
        async with client(app) as http:
            reply = await http.get("/health")
            return reply.status_code, reply.json()

    assert run(health(app)) == (200, {"status": "ok"})
    engine.closed = True  # the thread's loop ends, as when it dies
    engine.thread.join(timeout=10)
    engine.closed = False
    assert not engine.thread.is_alive()
    status, body = run(health(app))
    assert status == 503 and "stopped" in body["status"]
    assert run(health(apps[0])) == (200, {"status": "ok"})  # another app, another engine


def test_a_full_queue_is_429_with_retry_after(pair):
    app = make_app(pair[1], max_batch=1, max_queue=1)

    async def burst():
        async with client(app) as http:
            body = {"prompt": PROMPTS[0], "max_tokens": 40}
            return await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(5)])

    try:
        replies = run(burst())
    finally:
        app.state.engine.close()
    refused = [r for r in replies if r.status_code == 429]
    assert refused and all(r.status_code == 200 for r in replies if r not in refused)
    for reply in refused:
        assert int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"]["type"] == "rate_limit_error"
    counted = scrape(app)
    assert counted[("speculative_requests_total", (("endpoint", "/v1/completions"), ("finish_reason", ""),
                                                   ("status", "429")))] == len(refused)
