"""An OpenAI-compatible completions server over the engine (FastAPI + uvicorn).

    POST /v1/completions   {"prompt", "max_tokens", "temperature", "top_p", "top_k", "stop",
                            "seed", "stream", "model"}  -> a text_completion, or with
                            "stream": true server-sent events `data: {...}` ... `data: [DONE]`
    GET  /health           {"status": "ok", "model", "context", "slots"}
    GET  /metrics          Prometheus text format (serve/metrics.py)

The engine steps in one background thread; a request handler queues its request there and
reads the engine's events from an asyncio queue (the engine thread hands them over with
`call_soon_threadsafe`). Bad input is a 4xx with a one-line reason and touches nothing else:
a malformed body, an unknown field, a prompt that leaves no room in the context, max_tokens
<= 0, a character the tokenizer does not know. A client that goes away cancels its request,
which frees its slot and blocks at the engine's next step.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import prometheus_client as prom
import pydantic
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jaxcourse.errors import UserError
from jaxcourse.serve.engine import Engine, Event, Request, SamplingParams

DISCONNECT_POLL_SECONDS = 0.5


class CompletionBody(pydantic.BaseModel):
    """The fields of OpenAI's /v1/completions this server reads; any other is refused."""
    model_config = pydantic.ConfigDict(extra="forbid")
    model: str | None = None
    prompt: pydantic.StrictStr
    max_tokens: pydantic.StrictInt = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: pydantic.StrictInt = 0
    stop: str | list[str] | None = None
    seed: pydantic.StrictInt | None = None
    stream: pydantic.StrictBool = False


def _one_line(e: pydantic.ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    if err["type"] == "extra_forbidden":
        return f"unknown field {where!r}"
    if err["type"] == "missing":
        return f"missing field {where!r}"
    return f"field {where!r}: {err['msg']}"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def make_app(engine: Engine, tokenizer, model_name: str, max_queue: int = 256) -> FastAPI:
    """The HTTP app; the caller starts and stops the engine thread (`run_server` does)."""
    app = FastAPI(title="jaxcourse serve", docs_url=None, redoc_url=None)
    metrics = engine.metrics

    def reject(status: int, message: str, kind: str = "invalid_request_error"):
        if metrics is not None:
            metrics.requests.labels(status=f"http_{status}").inc()
        return _error(status, message, kind)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "context": engine.cfg.context,
                "slots": len(engine.running)}

    @app.get("/metrics")
    def prometheus():
        body = metrics.exposition() if metrics is not None else b""
        return Response(body, media_type=prom.CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        try:
            body = CompletionBody.model_validate(json.loads(await http.body()))
        except json.JSONDecodeError as e:
            return reject(400, f"the body is not JSON: {e.msg} at character {e.pos}")
        except pydantic.ValidationError as e:
            return reject(400, _one_line(e))
        if body.model not in (None, model_name):
            return reject(404, f"model {body.model!r} is not served here; this server serves "
                               f"{model_name!r}", "model_not_found")
        if engine.queue_length >= max_queue:
            return reject(503, f"{max_queue} requests already wait; retry later", "server_busy")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
            params = SamplingParams(body.max_tokens, body.temperature, body.top_k, body.top_p,
                                    stop, body.seed)
            prompt = tokenizer.encode(body.prompt) if body.prompt else [0]
            rid = engine.submit(Request(prompt, params,
                                        lambda ev: loop.call_soon_threadsafe(events.put_nowait,
                                                                             ev)))
        except UserError as e:
            return reject(400, str(e))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        if body.stream:
            return StreamingResponse(_stream(engine, rid, events, head),
                                     media_type="text/event-stream")
        return await _collect(engine, rid, events, head, len(prompt), http)

    return app


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


async def _stream(engine: Engine, rid: int, events: asyncio.Queue, head: dict):
    """SSE chunks as tokens arrive. If the client leaves, Starlette cancels this generator
    mid-await; `finally` then cancels the request so its slot is freed."""
    done = False
    try:
        while True:
            ev = await events.get()
            if ev.error:
                yield f"data: {json.dumps({'error': {'message': ev.error}})}\n\n"
            elif ev.text or ev.finish_reason:
                chunk = {**head, "choices": [_choice(ev.text, ev.finish_reason)]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if ev.finish_reason:
                break
        yield "data: [DONE]\n\n"
        done = True
    finally:
        if not done:
            engine.cancel(rid)


async def _collect(engine: Engine, rid: int, events: asyncio.Queue, head: dict,
                   prompt_tokens: int, http: HTTPRequest):
    text, tokens, done = [], 0, False
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await http.is_disconnected():
                    return Response(status_code=499)
                continue
            text.append(ev.text)
            tokens += len(ev.tokens)
            if ev.finish_reason:
                done = True
                break
    finally:
        if not done:
            engine.cancel(rid)
    if ev.error:
        return _error(500, ev.error, "engine_error")
    return {**head, "choices": [_choice("".join(text), ev.finish_reason)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens}}


class ServerThread:
    """uvicorn serving `app` from a thread (tests, benchmarks): start(), then stop().

    It leaves the process's logging as it is (log_config=None): uvicorn's own config goes
    through logging.config.dictConfig, which closes every existing handler, and absl's
    handler then closes the stream it was made with (under pytest, the capture's file)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> int:
        """Starts serving; returns the port it bound (port 0: a free one)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_server(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1",
               port: int = 8000) -> None:
    """Serves until interrupted (SIGINT / SIGTERM), with the engine in a background thread."""
    app = make_app(engine, tokenizer, model_name)
    engine.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()
