"""The ASGI application (Starlette): the OpenAI routes over an ``Engine``.

    GET    /health                  engine state (503 once the engine has stopped)
    GET    /metrics                 Prometheus text format
    GET    /v1/models[/{model}]     the role adapters and the bare base model
    POST   /v1/completions          prompt: a string or token ids
    POST   /v1/chat/completions     messages through the model's chat template
    DELETE /v1/trajectories/{name}  a pinned trajectory is done: its row is the first to be reused

A request is parsed and tokenized off the event loop, handed to the engine, and answered from the
engine's events (server-sent events when ``stream`` is true). A client that goes away, during its
stream or while waiting for a non-streamed answer, has its generation cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import traceback

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from lragent_jax.serve import protocol
from lragent_jax.serve.protocol import APIError, GenerationRequest, ServingContext
from lragent_jax.serve.scheduler import Delta, Engine, Failed, Finished

MAX_BODY_BYTES = 64 << 20
OWNER = "lragent-jax"


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; at most {limit} are accepted",
                       code="request_too_large")
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
        chunks.append(piece)
    return b"".join(chunks)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine, context: ServingContext, *,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The server's ASGI app. ``context`` names the served models and the tokenizer.

    Longer than 80 lines on purpose: each endpoint is a small closure over the engine, the
    metrics and the context, defined here next to the route table that lists them."""
    created = int(time.time())
    metrics = engine.metrics

    def counted(endpoint: str):
        def wrap(handler):
            @functools.wraps(handler)
            async def run(request: Request) -> Response:
                try:
                    response = await handler(request)
                except APIError as e:
                    response = _error_response(e)
                except Exception as e:  # a bug must not take the server down
                    traceback.print_exc()
                    response = _error_response(APIError(500, f"internal error: "
                                                             f"{type(e).__name__}: {e}",
                                                        type="server_error"))
                with metrics:
                    metrics.requests.inc(endpoint=endpoint, status=str(response.status_code))
                return response
            return run
        return wrap

    def model_card(name: str) -> dict:
        agent = context.models[name]
        card = {"id": name, "object": "model", "created": created, "owned_by": OWNER,
                "root": context.base_name}
        card["parent"] = context.base_name if agent is not None else None
        return card

    @counted("/health")
    async def health(request: Request) -> Response:
        stats = engine.stats()
        body = {"status": "ok" if engine.alive else "stopped", "mode": engine.session.mode.value,
                "model": context.base_name, "capacity": context.capacity, **stats}
        if engine.error is not None:
            body["error"] = f"{type(engine.error).__name__}: {engine.error}"
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    async def metrics_page(request: Request) -> Response:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @counted("/v1/models")
    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(n) for n in context.models]})

    @counted("/v1/models/{model}")
    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in context.models:
            raise APIError(404, f"The model {name!r} does not exist; available: "
                                f"{', '.join(context.models)}", param="model",
                           code="model_not_found")
        return JSONResponse(model_card(name))

    @counted("/v1/trajectories/{name}")
    async def forget(request: Request) -> Response:
        name = request.path_params["name"]
        released = await run_in_threadpool(engine.forget, name)
        return JSONResponse({"id": name, "object": "trajectory", "released": released})

    async def generate(request: Request, parse) -> Response:
        body = protocol.parse_json(await _read_body(request, max_body_bytes))
        generation: GenerationRequest = await run_in_threadpool(parse, body, context)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = engine.submit(generation, sink)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            first = await _next(queue, watcher)
        except BaseException:
            engine.cancel(job)
            watcher.cancel()
            raise
        if first is None:  # the client left before anything came
            engine.cancel(job)
            return Response(status_code=499)
        if isinstance(first, Failed):
            watcher.cancel()
            return _error_response(first.error)
        rid, stamp = protocol.new_id(generation.kind), protocol.now()
        if not generation.stream:
            event = first
            while isinstance(event, Delta):  # not sent for non-streamed requests; skip anyway
                event = await _next(queue, watcher)
            watcher.cancel()
            if event is None:
                engine.cancel(job)
                return Response(status_code=499)
            if isinstance(event, Failed):
                return _error_response(event.error)
            return JSONResponse(protocol.response(
                generation, rid, stamp, event.text, event.finish_reason, list(event.token_ids),
                protocol.usage(event.prompt_tokens, len(event.token_ids), event.cached_tokens)))
        watcher.cancel()  # the streaming response listens for the disconnect itself
        return StreamingResponse(_stream(engine, job, generation, rid, stamp, first, queue),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @counted("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, protocol.parse_completion)

    @counted("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, protocol.parse_chat)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        with metrics:
            metrics.requests.inc(endpoint="other", status=str(exc.status_code))
        message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else str(exc.detail))
        return _error_response(APIError(exc.status_code, message,
                                        code="not_found" if exc.status_code == 404 else None))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/trajectories/{name:path}", forget, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _next(queue: asyncio.Queue, watcher: asyncio.Future):
    """The next engine event, or None when the client disconnected first."""
    if watcher.done():
        return None if queue.empty() else queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


async def _stream(engine: Engine, job: int, generation: GenerationRequest, rid: str, stamp: int,
                  event, queue: asyncio.Queue):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    first = True
    try:
        while True:
            if isinstance(event, Delta):
                yield _sse(protocol.chunk(generation, rid, stamp, event.text, first=first))
                first = False
            elif isinstance(event, Finished):
                if event.delta or first:
                    yield _sse(protocol.chunk(generation, rid, stamp, event.delta, first=first))
                ids = event.token_ids if generation.return_token_ids else None
                yield _sse(protocol.chunk(generation, rid, stamp, None, event.finish_reason,
                                          token_ids=ids))
                if generation.include_usage:
                    yield _sse(protocol.usage_chunk(generation, rid, stamp, protocol.usage(
                        event.prompt_tokens, len(event.token_ids), event.cached_tokens)))
                yield _sse("[DONE]")
                return
            else:  # Failed after the stream began
                yield _sse(event.error.body())
                yield _sse("[DONE]")
                return
            event = await queue.get()
    finally:
        engine.cancel(job)  # a no-op once finished; stops the generation if the client left
