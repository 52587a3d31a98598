"""The Starlette app: OpenAI's endpoints over an `Engine`, errors in OpenAI's JSON shape, SSE streaming.

Needs the `serve` extra (starlette; uvicorn runs it). Handlers never touch the model: they validate, submit a
`Job` and relay its events. A task watching the connection cancels the job when the client goes away.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lite.serve.engine import Engine, QueueFull
from lite.serve.jobs import Delta, Done, Job, Start
from lite.serve.openai_shapes import (
    ApiError,
    GenerationRequest,
    chunk_record,
    completion_record,
    parse_chat,
    parse_completion,
    usage,
)

log = logging.getLogger("lite.serve")
MAX_BODY = 8 << 20  # bytes of a request body; larger ones get 413
PUBLIC = ("/health",)  # reachable without the API key


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def dumps(record: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ApiKey:
    """ASGI middleware: 401 in OpenAI's shape unless `Authorization: Bearer KEY` (every path but PUBLIC)."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not auth:
                e = ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
                return await error_response(e)(scope, receive, send)
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                e = ApiError(401, "incorrect API key provided", code="invalid_api_key")
                return await error_response(e)(scope, receive, send)
        await self.app(scope, receive, send)


class EventStream(Response):
    """Server-Sent Events from an async iterator of byte chunks, sent as they come; `on_close` runs at the
    end, whether the stream finished or the client went away."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
        self.status_code, self.background = 200, None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # tell proxies not to buffer the stream
        ]
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone
            pass
        except Exception as e:  # one line in the log; the server lives on
            log.error("stream failed: %s: %s", type(e).__name__, e)
        finally:
            self.on_close()


async def read_json(request: Request, max_body: int) -> Any:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body:
        raise ApiError(413, f"the request body is {length} bytes; the limit is {max_body}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise ApiError(413, f"the request body exceeds {max_body} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def api(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every failure of `endpoint` becomes an OpenAI-shaped error; never a traceback, never a dead server."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
            return error_response(ApiError(500, f"internal error: {type(e).__name__}"))

    return wrapped


def create_app(
    engine: Engine,
    *,
    model_id: str,
    created: int | None = None,
    api_key: str | None = None,
    max_body: int = MAX_BODY,
) -> Starlette:
    """The app serving `engine`; its lifespan starts and stops the engine's worker thread."""
    created = int(time.time()) if created is None else created
    model_record = {
        "id": model_id, "object": "model", "created": created, "owned_by": "lite", "context_length": engine.ctx,
    }  # fmt: skip

    async def watch(receive: Receive, job: Job) -> None:
        """Cancel `job` as soon as the client disconnects."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the connection broke some other way: gone too
            pass
        engine.cancel(job)

    async def generate(request: Request, req: GenerationRequest) -> Response:
        job = Job(req)
        try:
            engine.submit(job)
        except QueueFull as e:
            headers = {"Retry-After": str(e.retry_after)}
            raise ApiError(503, f"{engine.max_queue} requests are waiting; retry later", code="queue_full",
                           headers=headers) from None  # fmt: skip
        watcher = asyncio.create_task(watch(request.receive, job))
        rid = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stamp = int(time.time())

        def close() -> None:
            watcher.cancel()
            engine.cancel(job)

        try:
            first = await job.next()
            if isinstance(first, ApiError):
                raise first
            if req.stream and isinstance(first, Start):
                return EventStream(stream(req, job, rid, stamp), close)
            done = first
            while not isinstance(done, Done):
                done = await job.next()
                if isinstance(done, ApiError):
                    raise done
        except BaseException:
            close()
            raise
        close()
        use = usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)
        finish = "stop" if done.finish == "cancelled" else done.finish
        return JSONResponse(completion_record(req, rid, stamp, model_id, done.text, finish, use))

    async def stream(req: GenerationRequest, job: Job, rid: str, stamp: int) -> AsyncIterator[bytes]:
        if req.kind == "chat":
            yield dumps(chunk_record(req, rid, stamp, model_id, text="", role=True))
        while True:
            out, end = [], False
            for event in await job.batch():  # what the worker emitted since the last send, in one write
                if isinstance(event, Delta):
                    out.append(dumps(chunk_record(req, rid, stamp, model_id, text=event.text)))
                elif isinstance(event, Done):
                    finish = "stop" if event.finish == "cancelled" else event.finish
                    text = None if req.kind == "chat" else ""
                    out.append(dumps(chunk_record(req, rid, stamp, model_id, text=text, finish=finish)))
                    if req.include_usage:
                        use = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                        out.append(dumps(chunk_record(req, rid, stamp, model_id, use=use)))
                    end = True
                elif isinstance(event, ApiError):
                    out.append(dumps(event.body()))
                    end = True
            if out:
                yield b"".join(out)
            if end:
                break
        yield b"data: [DONE]\n\n"

    @api
    async def chat_completions(request: Request) -> Response:
        return await generate(request, parse_chat(await read_json(request, max_body)))

    @api
    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion(await read_json(request, max_body)))

    @api
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_record]})

    @api
    async def model(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server has "
                           f"{model_id!r}", "model", "model_not_found")  # fmt: skip
        return JSONResponse(model_record)

    @api
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @api
    async def stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        what = {404: "unknown route", 405: "method not allowed for"}.get(status, "error at")
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(status)
        return error_response(ApiError(status, f"{what} {request.method} {request.url.path}", code=code))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    return app
