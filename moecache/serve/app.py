"""The OpenAI-compatible HTTP API of ``moecache serve`` (FastAPI; uvicorn runs it).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text). Every error is a JSON body in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for a bad request (400: a
bad JSON body or field, a prompt too long for the context; 401: a missing or wrong API key; 404: an
unknown model or path; 429: the waiting line is full) and 500 for a failure while generating; the
server stays up either way.

Requests are generated one at a time in arrival order (``moecache.serve.scheduler``); a client
that disconnects frees its place. Parameters: ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``; chat messages go through the model's chat template, or the plain template
(``textgen.PLAIN_CHAT_TEMPLATE_DOC``) for a model without one. Other OpenAI fields are accepted and
ignored, except ``n`` and ``best_of`` above 1 and ``echo``/``logprobs``/``suffix``, which are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MoecacheError
from .metrics import CONTENT_TYPE, ServerMetrics
from .scheduler import Job, QueueFull, Scheduler
from .textgen import Finished, SamplingParams, TextGenerator

DEFAULT_COMPLETION_TOKENS = 16    # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256         # chat: at most this many, and never past the context
POLL_S = 0.25                     # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first problem: the field and what it must be."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # a union's member name ('str', 'list[int]') is not a field: keep the field path only
    path = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool"))
    if not loc:
        return f"the request body must be a JSON object ({e.get('msg', 'invalid')})", None
    if e.get("type") == "missing":
        return f"'{path}' is required", path
    more = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"'{path}': {e.get('msg', 'invalid value')}{more}", path


def create_app(generator: TextGenerator, handle: Any = None, *, model_name: str = "moecache-default",
               max_waiting: int = 64, api_key: str | None = None) -> FastAPI:
    """The app for one model. ``handle``: its ``OffloadHandle`` (for /metrics), or None for a plain model."""
    scheduler = Scheduler(generator, max_waiting)
    metrics = ServerMetrics(handle, scheduler)
    created = int(time.time())
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(title="moecache", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.generator = generator
    app.state.metrics = metrics
    app.state.model_name = model_name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        metrics.requests.labels(request.url.path, "400").inc()
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        metrics.requests.labels(request.url.path, "500").inc()
        return error_response(500, f"{type(exc).__name__}: {exc}", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                      "authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "waiting": scheduler.waiting,
                "running": scheduler.running is not None}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "moecache"}]}

    @app.get("/metrics")
    def prometheus() -> Response:  # sync: runs in the thread pool, since it waits for the generator's lock
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def _params(req: _Sampling, prompt_len: int, default_tokens: int) -> SamplingParams:
        if req.model != model_name:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        if req.n != 1:
            raise ApiError(400, "n must be 1: moecache serves one choice per request", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        room = generator.max_context - prompt_len
        asked = req.max_completion_tokens or req.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"this model's context is {generator.max_context} tokens; the prompt has {prompt_len} "
                           f"and max_tokens asks for {asked or 1} more: shorten the prompt or lower max_tokens",
                           param="max_tokens" if room >= 1 else "prompt", code="context_length_exceeded")
        return SamplingParams(max_tokens=asked or min(default_tokens, room), temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop=stop)

    def _encode(text: str) -> list[int]:
        try:
            return generator.encode(text)
        except MoecacheError as e:
            raise ApiError(400, str(e), param="prompt") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        for name, bad in (("echo", req.echo), ("logprobs", req.logprobs is not None), ("suffix", req.suffix),
                          ("best_of", (req.best_of or 1) > 1)):
            if bad:
                raise ApiError(400, f"'{name}' is not supported by moecache serve; leave it out", param=name)
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise ApiError(400, "send one prompt per request (a list of one string, or a string)", param="prompt")
            p = p[0]
        ids = _encode(p) if isinstance(p, str) else [int(x) for x in p]
        vocab = generator.model.config.vocab_size
        if not ids:
            raise ApiError(400, "the prompt is empty; send at least one token", param="prompt")
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        params = _params(req, len(ids), DEFAULT_COMPLETION_TOKENS)
        return await _answer(request, "text_completion", "cmpl", req, ids, params)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        if req.logprobs:
            raise ApiError(400, "'logprobs' is not supported by moecache serve; leave it out", param="logprobs")
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):  # content parts: only text parts are understood
                if any(part.get("type") != "text" for part in content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            ids = generator.chat_prompt_ids(messages)
        except MoecacheError as e:
            raise ApiError(400, str(e), param="messages") from None
        params = _params(req, len(ids), DEFAULT_CHAT_TOKENS)
        return await _answer(request, "chat.completion", "chatcmpl", req, ids, params)

    async def _answer(request: Request, kind: str, prefix: str, req: _Sampling, ids: list[int],
                      params: SamplingParams) -> Any:
        endpoint = request.url.path
        arrived = time.monotonic()
        try:
            job = scheduler.submit(ids, params, asyncio.get_running_loop())
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from None
        rid = f"{prefix}-{secrets.token_hex(12)}"
        chat = kind == "chat.completion"
        if req.stream:
            usage_wanted = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(job, rid, chat, usage_wanted, arrived, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel(scheduler)
                        return Response(status_code=499)
                    continue
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, Finished):
                    break
                if not pieces:
                    metrics.ttft.observe(time.monotonic() - arrived)
                pieces.append(item)
        finally:
            if job.state in ("waiting", "running"):
                job.cancel(scheduler)
        metrics.requests.labels(endpoint, "200").inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - arrived)
        text = "".join(pieces)
        usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                 "total_tokens": item.prompt_tokens + item.completion_tokens}
        choice: dict[str, Any] = {"index": 0, "finish_reason": item.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name, "choices": [choice],
                "usage": usage}

    async def _sse(job: Job, rid: str, chat: bool, usage_wanted: bool, arrived: float,
                   endpoint: str) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model_name,
                                    "choices": [choice]}
            if usage_wanted:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        seen_text = False
        try:
            if chat:
                yield chunk("", None, first=True)
            while True:
                item = await job.events.get()
                if isinstance(item, Exception):
                    err = {"error": {"message": f"{type(item).__name__}: {item}", "type": "server_error",
                                     "param": None, "code": None}}
                    metrics.requests.labels(endpoint, "500").inc()
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                if isinstance(item, Finished):
                    yield chunk(None if chat else "", item.finish_reason)
                    if usage_wanted:
                        usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                                 "total_tokens": item.prompt_tokens + item.completion_tokens}
                        yield f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                    metrics.requests.labels(endpoint, "200").inc()
                    metrics.latency.labels(endpoint).observe(time.monotonic() - arrived)
                    return
                if not seen_text:
                    metrics.ttft.observe(time.monotonic() - arrived)
                    seen_text = True
                yield chunk(item, None)
        finally:  # the client went away (the response task was cancelled), or the answer ended
            if job.state in ("waiting", "running"):
                job.cancel(scheduler)

    return app
