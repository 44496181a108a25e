"""An OpenAI-compatible HTTP server over speculative decoding, batching concurrent requests.

    python server.py --model M [--draft-model D | --prompt-lookup] [--num-draft 5]
        [--host 127.0.0.1] [--port 8080] [--max-batch 8] [--max-queue 64]

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions. One thread
owns MLX (api.Engine): a request joins the running batch at the next step and keeps its
own settings. Bad requests get OpenAI-style error JSON with status 400 (429 when the
queue is full) and one line in the log.
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

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

import api
import cli

log = logging.getLogger("server")


class Body(BaseModel):
    """Fields both endpoints take (OpenAI's, plus top_k, num_draft and delta); others are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = False
    n: Optional[int] = 1
    num_draft: Optional[int] = None
    delta: Optional[float] = None


class CompletionBody(Body):
    prompt: Union[str, list[str]]


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


class BadRequest(Exception):
    """A request the server refuses: status and one-line message."""

    def __init__(self, message, status=400, kind="invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def error_response(status, message, kind="invalid_request_error", param=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def chosen_settings(body, defaults):
    """api.Settings of a request: its fields over the server's defaults; BadRequest when out of range."""
    values = {name: getattr(body, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "delta",
                                                     "num_draft")}
    if values["max_tokens"] is None:
        values["max_tokens"] = body.max_completion_tokens
    if body.n not in (None, 1):
        raise BadRequest(f"n must be 1, got {body.n}", param="n")
    chosen = api.Settings(**{**defaults, **{k: v for k, v in values.items() if v is not None}})
    chosen.stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    problem = chosen.problem()
    if problem:
        raise BadRequest(problem, param=problem.split()[0])  # each message begins with its field's name
    return chosen


def chat_prompt(tokenizer, messages):
    """The prompt text of a chat: the tokenizer's chat template with the generation prompt, or the contents joined."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": m.role, "content": m.text} for m in messages]
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), False
    return "\n".join(m.text for m in messages), True


def build_app(engine, defaults=None):
    """The FastAPI application serving `engine` (an api.Engine)."""
    pair, defaults = engine.pair, dict(defaults or {})
    app = FastAPI(title="speculative decoding server")
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = ("malformed JSON in the request body" if first.get("type") == "json_invalid"
                   else f"{where or 'body'}: {first.get('msg')}")
        log.warning("400 %s %s: %s", request.method, request.url.path, message)
        return error_response(400, message, param=where or None)

    @app.exception_handler(BadRequest)
    async def refused(request, error):
        log.warning("%d %s %s: %s", error.status, request.method, request.url.path, error)
        return error_response(error.status, str(error), error.kind, error.param)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        log.warning("%d %s %s: %s", error.status_code, request.method, request.url.path, error.detail)
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": pair.name, "object": "model", "created": 0, "owned_by": "local"}]}

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
        text, special = chat_prompt(pair.tokenizer, body.messages)
        return await serve(request, body, text, special, chat=True)

    async def serve(request, body, prompt, special_tokens, chat):
        if body.model is not None and body.model != pair.name:
            raise BadRequest(f"unknown model {body.model!r}; this server has {pair.name!r}", status=400,
                             param="model")
        chosen = chosen_settings(body, defaults)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ids = api.encode(pair, prompt, chosen.max_tokens, add_special_tokens=special_tokens,
                             max_context=engine.max_context, param="messages" if chat else "prompt")
            index = engine.submit(ids, chosen, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except api.UsageError as error:
            raise BadRequest(str(error), param=error.param) from None
        except api.QueueFull as error:
            raise BadRequest(str(error), status=429, kind="rate_limit_error") from None
        shape = Shape(chat, pair.name, len(ids))
        if body.stream:
            return EventSourceResponse(stream_events(engine, index, events, shape), ping=15)
        try:
            text, checked = "", time.monotonic()
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
                if event.error:
                    return error_response(500, event.error, "server_error")
                if event.finish_reason:
                    return shape.whole(text, event)
        finally:
            engine.cancel(index)

    return app


# How often a whole (non-streamed) response's handler checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.5


class Shape:
    """OpenAI's response objects for one request: whole, and as stream chunks."""

    def __init__(self, chat, model, prompt_tokens):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, kind, choice):
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}

    def extras(self, stats):
        return {
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": stats.generated,
                      "total_tokens": self.prompt_tokens + stats.generated},
            "speculative": {"drafted": stats.drafted, "accepted": stats.accepted,
                            "acceptance_rate": stats.acceptance_rate, "target_calls": stats.target_calls},
        }

    def whole(self, text, event):
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": event.finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": event.finish_reason, "logprobs": None}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.envelope(kind, choice), **self.extras(event.stats)}

    def chunk(self, text, finish_reason=None, first=False):
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason:
                delta = {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return self.envelope("chat.completion.chunk", choice)
        return self.envelope("text_completion", {"index": 0, "text": text, "finish_reason": finish_reason,
                                                 "logprobs": None})


async def stream_events(engine, index, events, shape):
    """Server-sent events of one request: its text in whole characters, a last chunk with the finish reason
    and usage, then [DONE]. A client that goes away cancels its request."""
    try:
        first = True
        while True:
            event = await events.get()
            if event.error:
                yield {"data": json.dumps({"error": {"message": event.error, "type": "server_error"}})}
                break
            if event.text or (first and shape.chat):
                yield {"data": json.dumps(shape.chunk(event.text, first=first))}
                first = False
            if event.finish_reason:
                yield {"data": json.dumps({**shape.chunk("", event.finish_reason), **shape.extras(event.stats)})}
                break
        yield {"data": "[DONE]"}
    finally:
        engine.cancel(index)


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
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="draft by copying from the prompt and the output so far; loads no draft model")
    parser.add_argument("--ngram-max", type=int, default=3, help="prompt lookup: longest suffix matched (>= 1)")
    parser.add_argument("--num-draft", type=int, default=5, help="draft tokens per step at most (a request's "
                                                                 "num_draft may ask for fewer)")
    parser.add_argument("--draft-schedule", choices=["adaptive", "constant"], default="adaptive",
                        help="adaptive: pick 0..num-draft each step for the most tokens per second; "
                             "constant: always num-draft (seeded sampling then reproduces)")
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
        (args.num_draft >= 1, f"--num-draft must be at least 1, got {args.num_draft}"),
        (args.ngram_max >= 1, f"--ngram-max must be at least 1, got {args.ngram_max}"),
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
    engine = api.Engine(pair, args.max_batch, args.max_queue, args.num_draft, args.draft_schedule,
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
    log.info("stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
