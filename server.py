"""An OpenAI-compatible HTTP server over speculative decoding, batching concurrent requests.

    python server.py --model M [--draft-model D | --prompt-lookup] [--num-draft 5]
        [--host 127.0.0.1] [--port 8080] [--max-batch 8] [--max-queue 64]

GET /health, GET /metrics (metrics.py), GET /v1/models[/{id}], POST /v1/completions,
POST /v1/chat/completions. One thread owns MLX (engine.Engine): a request joins the running
batch at the next step and keeps its own settings. Bad requests, an OpenAI field this
server does not honour among them, get OpenAI-style error JSON with status 400 and
`param` naming the field (429 with Retry-After when the queue is full) and one line in
the log; every answered request leaves one log line too.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import asyncio
import json
import logging
import signal
import socket
import sys
import time
import uuid
from typing import Optional, Union

import mlx.core as mx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

import api
import cli
import metrics
from engine import Engine, QueueFull

log = logging.getLogger("server")


def refused_unless(*allowed, why):
    """An OpenAI field this server does not honour: null and `allowed` pass, any other value is a 400 naming it."""
    return Field(None, json_schema_extra={"allowed": list(allowed), "refused": why})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: Optional[bool] = None


class Body(BaseModel):
    """Fields both endpoints take: OpenAI's (each honoured, or refused by refused_unless), plus top_k,
    num_draft and delta. Names OpenAI does not have are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    num_draft: Optional[int] = None
    delta: Optional[float] = None
    n: Optional[int] = refused_unless(1, why="must be 1 (one completion per request)")
    logit_bias: Optional[dict[str, float]] = None  # {token id as a string: added to its logit}
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    response_format: Optional[dict] = refused_unless({"type": "text"}, why='must be {"type": "text"}: no JSON mode')


class CompletionBody(Body):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = False
    best_of: Optional[int] = refused_unless(1, why="must be 1 (one completion per request)")
    logprobs: Optional[int] = None  # each token's log-probability and the n most likely tokens' (0..20)
    suffix: Optional[str] = refused_unless("", why="is not supported (no insertion)")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    @property
    def text(self):
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatBody(Body):
    messages: list[Message]
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None  # with logprobs: the n most likely tokens' too (0..20)
    tools: Optional[list] = refused_unless([], why="is not supported (no tool calls)")
    tool_choice: Union[str, dict, None] = refused_unless("none", why='is not supported (no tool calls): "none" only')
    functions: Optional[list] = refused_unless([], why="is not supported (no function calls)")
    function_call: Union[str, dict, None] = refused_unless("none", why='is not supported (no function calls): '
                                                                       '"none" only')
    modalities: Optional[list[str]] = refused_unless(["text"], why='must be ["text"]')
    audio: Optional[dict] = refused_unless(why="is not supported (text only)")
    prediction: Optional[dict] = refused_unless(why="is not supported")


class BadRequest(Exception):
    """A request the server refuses: status, one-line message, the field at fault, extra headers."""

    def __init__(self, message, status=400, kind="invalid_request_error", param=None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def error_response(status, message, kind="invalid_request_error", param=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status,
                        headers=headers)


def refuse_unsupported(body):
    """BadRequest naming the first field declared with refused_unless whose value is not one it allows."""
    for name, info in type(body).model_fields.items():
        rule = info.json_schema_extra or {}
        value = getattr(body, name)
        if "refused" in rule and value is not None and value not in rule["allowed"]:
            shown = json.dumps(value)
            raise BadRequest(f"{name} {rule['refused']}, got {shown if len(shown) <= 60 else shown[:57] + '...'}",
                             param=name)


def chosen_settings(body, defaults, most_drafts):
    """api.Settings of a request: its fields over the server's defaults; BadRequest naming a field this
    server does not honour or a value out of range (num_draft above the server's `most_drafts` too)."""
    refuse_unsupported(body)
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed with stream: true", param="stream_options")
    if body.num_draft is not None and body.num_draft > most_drafts:
        raise BadRequest(f"num_draft must be at most {most_drafts} (the server's --num-draft), got {body.num_draft}",
                         param="num_draft")
    values = {name: getattr(body, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "delta",
                                                     "num_draft", "presence_penalty", "frequency_penalty", "min_p")}
    values["logit_bias"] = token_biases(body.logit_bias)
    length = "max_tokens"
    if values["max_tokens"] is None and body.max_completion_tokens is not None:
        values["max_tokens"], length = body.max_completion_tokens, "max_completion_tokens"
    values["logprobs"], logprobs = requested_logprobs(body)
    chosen = api.Settings(**{**defaults, **{k: v for k, v in values.items() if v is not None}})
    chosen.stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    fields = {"max_tokens": length, "logprobs": logprobs}
    problem = chosen.invalid(lambda name: fields.get(name, name))
    if problem:
        field, message = problem
        raise BadRequest(message, param=fields.get(field, field))
    return chosen, length


def token_biases(logit_bias):
    """{token id: bias} of a request's logit_bias, whose keys are token ids written as strings; BadRequest else."""
    if logit_bias is None:
        return None
    bad = next((key for key in logit_bias if not key.isdecimal()), None)
    if bad is not None:
        raise BadRequest(f"logit_bias keys must be token ids, got {bad[:40]!r}", param="logit_bias")
    return {int(key): value for key, value in logit_bias.items()}


def requested_logprobs(body):
    """(Settings.logprobs, the field that set it): a completion's `logprobs` n, or a chat's
    `top_logprobs` (0 if not given) where its `logprobs` is true; BadRequest for top_logprobs alone."""
    if not isinstance(body, ChatBody):
        return body.logprobs, "logprobs"
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None, "top_logprobs"


def chat_prompt(tokenizer, messages):
    """The prompt text of a chat: the tokenizer's chat template with the generation prompt; without a
    template (T5, GPT-2, base models) the contents joined by newlines, special tokens added as for a prompt."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": m.role, "content": m.text} for m in messages]
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), False
    return "\n".join(m.text for m in messages), True


# Endpoints whose requests the metrics count (by path); Retry-After on a 429, in seconds.
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
RETRY_AFTER_SECONDS = 1
# The finish reason engine.Engine.close gives the requests it ends: not OpenAI's, so not the client's.
SHUT_DOWN = "abort"


def build_app(engine, defaults=None):
    """The FastAPI application serving `engine` (an engine.Engine), with its own metrics."""
    pair, defaults = engine.pair, dict(defaults or {})
    app = FastAPI(title="speculative decoding server")
    app.state.engine = engine
    app.state.metrics = counted = metrics.Metrics(engine)
    if not getattr(pair.tokenizer, "chat_template", None):
        log.info(f"{pair.name} has no chat template: a chat's prompt is its messages' contents joined by newlines")

    def refused(request, status, message, kind="invalid_request_error", param=None, headers=None):
        log.warning("%d %s %s: %s", status, request.method, request.url.path, message)
        if request.url.path in ENDPOINTS:
            counted.refused(request.url.path, status)
        return error_response(status, message, kind, param, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error):
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", first.get("msg"))
            at = f" at character {where[0]}" if where else ""
            return refused(request, 400, f"malformed JSON in the request body: {detail}{at}")
        return refused(request, 400, f"{'.'.join(where) or 'body'}: {first.get('msg')}",
                       param=where[0] if where else None)

    @app.exception_handler(BadRequest)
    async def bad_request(request, error):
        return refused(request, error.status, str(error), error.kind, error.param, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        return refused(request, error.status_code, str(error.detail))

    @app.get("/health")
    async def health():
        if engine.thread.is_alive() and not engine.closed:
            return {"status": "ok"}
        return JSONResponse({"status": "the decoding engine has stopped"}, 503)

    @app.get("/metrics")
    async def metrics_text():
        body, content_type = counted.exposition()
        return Response(body, media_type=content_type)

    def model_card():
        return {"id": pair.name, "object": "model", "created": 0, "owned_by": "local"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != pair.name:
            return error_response(404, f"the model {model_id!r} does not exist; this server has {pair.name!r}",
                                  param="model")
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise BadRequest(f"prompt must be one string, got a list of {len(prompts)}", param="prompt")
        return await serve(request, body, prompts[0], True, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        if not body.messages:
            raise BadRequest("messages must not be empty", param="messages")
        kinds = {p.type for m in body.messages if isinstance(m.content, list) for p in m.content} - {"text"}
        if kinds:
            raise BadRequest(f"messages: only text content is supported, got {sorted(kinds)[0]!r}", param="messages")
        text, special = chat_prompt(pair.tokenizer, body.messages)
        return await serve(request, body, text, special, chat=True)

    async def serve(request, body, prompt, special_tokens, chat):
        if body.model is not None and body.model != pair.name:
            raise BadRequest(f"unknown model {body.model!r}; this server has {pair.name!r}", param="model")
        chosen, length = chosen_settings(body, defaults, engine.num_draft)
        try:
            ids = api.encode(pair, prompt, chosen.max_tokens, length, add_special_tokens=special_tokens,
                             max_context=engine.max_context, param="messages" if chat else "prompt")
        except api.UsageError as error:
            raise BadRequest(str(error), param=length if error.param == "max_tokens" else error.param) from None
        if engine.closed:
            raise BadRequest("the server is shutting down", 503, "server_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        tracker = metrics.Tracker(counted, request.url.path, len(ids))

        def listener(event):  # on the engine's thread
            tracker.saw(event)
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            index = engine.submit(ids, chosen, listener)
        except api.UsageError as error:
            raise BadRequest(str(error), param=error.param) from None
        except QueueFull as error:
            if engine.closed:
                raise BadRequest("the server is shutting down", 503, "server_error") from None
            raise BadRequest(str(error), 429, "rate_limit_error",
                             headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        echoed = prompt if getattr(body, "echo", False) else ""
        shape = Shape(chat, pair.name, len(ids), pair.tokenizer, len(echoed))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(stream_events(engine, index, events, shape, tracker, usage, echoed), ping=15)
        try:
            text, checked, entries = echoed, time.monotonic(), None
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None  # the client went away: `finally` takes its row back
                if event is None:
                    continue
                text += event.text
                if event.logprobs is not None:
                    entries = (entries or []) + event.logprobs
                if event.error:
                    tracker.done(500)
                    return error_response(500, event.error, "server_error")
                if event.finish_reason == SHUT_DOWN:
                    tracker.done(metrics.SHUTTING_DOWN)
                    return error_response(503, "the server shut down before the request finished", "server_error")
                if event.finish_reason:
                    tracker.done(200, event.finish_reason)
                    # A stop string may cut tokens told of before: the response holds the usage's tokens.
                    return shape.whole(text, event, entries and entries[: event.stats.generated])
        finally:
            engine.cancel(index)
            tracker.done(metrics.CLIENT_GONE)

    return app


# How often a whole (non-streamed) response's handler checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


class Shape:
    """OpenAI's response objects for one request: whole, and as stream chunks."""

    def __init__(self, chat, model, prompt_tokens, tokenizer=None, offset=0):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.tokenizer = tokenizer  # spells the tokens of log-probabilities
        self.offset = offset  # characters before the next token's text (a completion's text_offset)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, kind, choices):
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def usage(self, stats):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": stats.generated,
                "total_tokens": self.prompt_tokens + stats.generated}

    @staticmethod
    def speculative(stats):
        return {"drafted": stats.drafted, "accepted": stats.accepted, "acceptance_rate": stats.acceptance_rate,
                "target_calls": stats.target_calls}

    def spelled(self, token):
        return api.text_of(self.tokenizer, [token])

    def spelled_top(self, top):
        """{spelling: logprob} of the most likely tokens, most likely first; where two spell alike (partial
        UTF-8 pieces spell ''), the likelier keeps the key."""
        spelled = {}
        for token, logprob in top:
            spelled.setdefault(self.spelled(token), logprob)
        return spelled

    def logprobs(self, entries):
        """OpenAI's logprobs object of decoder.Step.logprobs entries (None: none asked for): a chat's
        {"content": [{token, logprob, bytes, top_logprobs}]}, a completion's {tokens, token_logprobs,
        top_logprobs, text_offset}. A token is spelled as it decodes alone."""
        if entries is None:
            return None
        if self.chat:
            def one(token, logprob):
                spelled = self.spelled(token)
                return {"token": spelled, "logprob": logprob, "bytes": list(spelled.encode("utf-8"))}
            return {"content": [{**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}
                                for token, logprob, top in entries], "refusal": None}
        tokens = [self.spelled(token) for token, _, _ in entries]
        offsets = []
        for spelled in tokens:
            offsets.append(self.offset)
            self.offset += len(spelled)
        return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": [self.spelled_top(top) for _, _, top in entries],
                "text_offset": offsets}

    def whole(self, text, event, entries=None):
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": event.finish_reason, "logprobs": self.logprobs(entries)}
        else:
            choice = {"index": 0, "text": text, "finish_reason": event.finish_reason,
                      "logprobs": self.logprobs(entries)}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.envelope(kind, [choice]), "usage": self.usage(event.stats),
                "speculative": self.speculative(event.stats)}

    def chunk(self, text, finish_reason=None, first=False, entries=None):
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason:
                delta = {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": self.logprobs(entries)}
            return self.envelope("chat.completion.chunk", [choice])
        return self.envelope("text_completion", [{"index": 0, "text": text, "finish_reason": finish_reason,
                                                  "logprobs": self.logprobs(entries)}])

    def usage_chunk(self, stats):
        """stream_options.include_usage: the last chunk, with no choices and the usage."""
        return {**self.envelope("chat.completion.chunk" if self.chat else "text_completion", []),
                "usage": self.usage(stats)}


def sse(data):
    return {"data": data if isinstance(data, str) else json.dumps(data)}


async def stream_events(engine, index, events, shape, tracker, include_usage=False, echoed=""):
    """Server-sent events of one request: the echoed prompt if asked, its text in whole characters, a chunk
    with the finish reason (and the `speculative` object), with include_usage a last chunk with no choices
    and the usage (every other chunk has usage null, as OpenAI's), then [DONE]. A server error or a shutdown
    under way ends it with an error event, then [DONE]. A client that goes away cancels its request."""
    usage = {"usage": None} if include_usage else {}
    try:
        first = True
        if echoed:
            yield sse({**shape.chunk(echoed, first=True), **usage})
            first = False
        entries = None  # log-probabilities of tokens whose text has not gone out yet (None: not asked)
        while True:
            event = await events.get()
            if event.logprobs is not None:
                entries = (entries or []) + event.logprobs
            if event.error or event.finish_reason == SHUT_DOWN:
                status = 500 if event.error else metrics.SHUTTING_DOWN
                message = event.error or "the server shut down before the request finished"
                yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                tracker.done(status)
                break
            if event.text or (first and shape.chat):
                yield sse({**shape.chunk(event.text, first=first, entries=entries), **usage})
                first, entries = False, entries and []
            if event.finish_reason:
                yield sse({**shape.chunk("", event.finish_reason, entries=entries or None), **usage,
                           "speculative": shape.speculative(event.stats)})
                if include_usage:
                    yield sse(shape.usage_chunk(event.stats))
                tracker.done(200, event.finish_reason)
                break
        yield sse("[DONE]")
    finally:
        engine.cancel(index)
        tracker.done(metrics.CLIENT_GONE)


class Server(uvicorn.Server):
    """uvicorn's server; on SIGINT or SIGTERM the engine first ends the open requests."""

    def handle_exit(self, sig, frame):
        self.config.app.state.engine.close()
        super().handle_exit(sig, frame)


def build_parser():
    parser = cli.ArgumentParser(description="An OpenAI-compatible server over speculative decoding, batching "
                                            "concurrent requests (continuous batching).")
    parser.add_argument("--model", required=True, metavar="NAME_OR_DIR",
                        help="target: converted folder or name under mlx_models/")
    parser.add_argument("--draft-model", metavar="NAME_OR_DIR", help="draft: converted folder or name under mlx_models/")
    cli.add_drafting_flags(parser, "draft tokens per step at most (a request's num_draft may ask for fewer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a place at most (then 429)")
    parser.add_argument("--max-context", type=int, metavar="TOKENS",
                        help="prompt plus output tokens per request at most, below the model's own limit "
                             "(a T5 prompt and its output each; default: the model's)")
    return parser


def check(args):
    rules = [
        (not (args.draft_model and args.prompt_lookup), "give --draft-model or --prompt-lookup, not both"),
        *cli.drafting_problems(args),
        (0 <= args.port < 65536, f"--port must lie in [0, 65536), got {args.port}"),
        (args.max_batch >= 1, f"--max-batch must be at least 1, got {args.max_batch}"),
        (args.max_queue >= 1, f"--max-queue must be at least 1, got {args.max_queue}"),
        (args.max_context is None or args.max_context >= 1, f"--max-context must be at least 1, got {args.max_context}"),
    ]
    for ok, message in rules:
        if not ok:
            cli.fail(message)
    check_address(args.host, args.port)


def check_address(host, port):
    """One error line, before the models load, when the address cannot be listened on (taken, unknown)."""
    try:
        socket.create_server((host, port), reuse_port=False).close()
    except OSError as error:
        cli.fail(f"cannot listen on {host}:{port}: {error.strerror or error}")


def main(argv=None):
    """Parse, load the pair, serve until SIGINT or SIGTERM; exit 0."""
    args = build_parser().parse_args(argv)
    check(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        pair = api.load(args.model, args.draft_model, args.prompt_lookup, args.ngram_max)
    except api.UsageError as error:
        cli.fail(error)
    engine = Engine(pair, args.max_batch, args.max_queue, args.num_draft, args.draft_schedule,
                        log=log.error, max_context=args.max_context)
    app = build_app(engine, {"num_draft": args.num_draft, "schedule": args.draft_schedule})
    # uvicorn restores the handlers it found and raises the signal again once it has shut
    # down: with these, that second delivery does nothing and the process exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    log.info(f"serving {pair.name} on http://{args.host}:{args.port}/v1 (Ctrl-C to stop)")
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                          timeout_graceful_shutdown=5)).run()
    engine.close()
    engine.join()  # a process that exits while the engine's thread is inside MLX aborts (exit -6)
    mx.clear_streams()  # and this thread's streams, as MLX asks, before the interpreter's teardown
    log.info("stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
