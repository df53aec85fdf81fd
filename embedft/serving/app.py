"""The HTTP face of the engine: an OpenAI-compatible embeddings API, adapters, health and metrics.

FastAPI (on Starlette) under uvicorn: an asyncio server holds thousands of waiting requests
on one thread, which is what a batching server does most of the time (each request waits for
its batch while the engine's worker thread runs the model); uvicorn drains in-flight requests
on SIGTERM; and the `openai` client and Prometheus talk to it as to any such server. The
engine knows nothing of HTTP: this module only parses, checks and renders.

    POST   /v1/embeddings         {"model", "input", "encoding_format"?, "input_type"?, "dimensions"?}
    GET    /v1/models             the base model and the adapters
    POST   /v1/adapters           {"name", "source"}: load an adapter while serving
    DELETE /v1/adapters/{name}    unload it (its requests already accepted still finish)
    GET    /health                no token needed
    GET    /metrics               Prometheus text
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from embedft.serving.adapters import is_mlflow_source, resolve_source
from embedft.serving.config import ServeConfig
from embedft.serving.engine import Engine
from embedft.serving.errors import BadRequest, NotFound, RequestError, TooLarge
from embedft.serving.metrics import LATENCY_BUCKETS

log = logging.getLogger(__name__)

ROUTES = ("/v1/embeddings", "/v1/models", "/v1/adapters", "/health", "/metrics")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def create_app(engine: Engine, cfg: ServeConfig | None = None,
               resolve: Callable[[str, Path], Path] = resolve_source):
    """The FastAPI app over `engine`; its lifespan starts the engine and, at shutdown, drains it.

    `resolve(source, workdir)`: a SOURCE of POST /v1/adapters -> a local adapter folder.
    """
    cfg = cfg or engine.cfg
    metrics = engine.metrics
    metrics.counter("http_requests_total", "HTTP requests answered, by route and status code.")
    metrics.histogram("http_request_seconds", "Time from a request's arrival to its response, by route.",
                      LATENCY_BUCKETS)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.close)  # after uvicorn has let the in-flight requests finish

    app = FastAPI(title="embedft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def json_response(payload, status: int = 200, headers: dict | None = None):
        return Response(json.dumps(payload, separators=(",", ":")), status_code=status, headers=headers,
                        media_type="application/json")

    @app.exception_handler(RequestError)
    async def on_request_error(request, e: RequestError):
        headers = {"Retry-After": str(cfg.retry_after_s)} if e.status == 503 else None
        return json_response(error_body(str(e), e.type, e.param, e.code), e.status, headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return json_response(error_body(f"{request.method} {request.url.path}: {e.detail}", kind), e.status_code)

    @app.exception_handler(Exception)
    async def on_crash(request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return json_response(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)

    async def read_json(request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise TooLarge(f"the request body is over {cfg.max_body_bytes} bytes; send fewer or shorter inputs")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise BadRequest(f"the request body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the request body is a JSON {type(body).__name__}; send a JSON object")
        return body

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_json(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required: the name of a served model (GET /v1/models lists them)",
                             param="model")
        if "input" not in body:
            raise BadRequest("'input' is required: a string or a list of strings", param="input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise BadRequest(f"encoding_format {fmt!r}: use 'float' or 'base64'", param="encoding_format")
        input_type = body.get("input_type") or "document"
        if not isinstance(input_type, str):
            raise BadRequest("input_type must be 'document' or 'query'", param="input_type")
        dims = body.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or dims != engine.dim):
            raise BadRequest(f"dimensions={dims!r}: this server returns the model's own {engine.dim} dimensions; "
                             "omit the field", param="dimensions")
        # Tokenizing happens in submit: off the event loop, so a long request does not stall the others.
        future = await run_in_threadpool(engine.submit, model, body["input"], input_type)
        result = await asyncio.wrap_future(future)
        if fmt == "base64":
            vectors = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in result.vectors]
        else:
            vectors = result.vectors.tolist()
        return json_response({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        })

    @app.get("/v1/models")
    async def list_models():
        return json_response({"object": "list", "data": engine.models()})

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        for card in engine.models():
            if card["id"] == name:
                return json_response(card)
        raise NotFound(f"the model {name!r} is not served; served models: "
                       f"{', '.join(c['id'] for c in engine.models())}", param="model", code="model_not_found")

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = await read_json(request)
        name, source = body.get("name"), body.get("source")
        if not isinstance(name, str) or not isinstance(source, str) or not source:
            raise BadRequest("send {\"name\": NAME, \"source\": SOURCE}: SOURCE an adapter folder on the server, "
                             "runs:/RUN_ID or models:/NAME/VERSION", param="name" if not isinstance(name, str)
                             else "source")
        card = await run_in_threadpool(_load, engine, name, source, resolve)
        return json_response(card, 201)

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(name: str):
        return json_response(await run_in_threadpool(engine.remove_adapter, name))

    @app.get("/health")
    async def health():
        return json_response({"status": "ok", "models": len(engine.models()), "queue_rows": engine.queue_rows})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return _Observe(app, metrics, cfg.api_key)


def _load(engine: Engine, name: str, source: str, resolve) -> dict:
    """Resolve SOURCE (downloads go to a temporary folder, gone once peft holds the weights) and load it."""
    from embedft.errors import ModelError, TrackingError

    tmp = Path(tempfile.mkdtemp(prefix="embedft-serve-"))
    try:
        folder = resolve(source, tmp)
        return engine.add_adapter(name, folder, source if is_mlflow_source(source) else str(Path(source).resolve()))
    except RequestError:
        raise
    except (ModelError, TrackingError) as e:  # not an adapter, another base, an unknown run: the reason
        raise BadRequest(str(e), param="source") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Observe:
    """ASGI wrapper: the bearer token check and the per-route request metrics (cheaper than Starlette middleware)."""

    def __init__(self, app, metrics, api_key: str | None):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status = 500

        async def tap(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path != "/health" and not self._authorized(scope):
                await _send_json(tap, 401, error_body(
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>' (the key given with "
                    "--api-key or EMBEDFT_API_KEY)", "invalid_request_error", None, "invalid_api_key"),
                    {"www-authenticate": "Bearer"})
                return
            await self.app(scope, receive, tap)
        finally:
            self.metrics.inc("http_requests_total", route=route, code=str(status))
            self.metrics.observe("http_request_seconds", time.perf_counter() - t0, route=route)

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(given, self.expected)


async def _send_json(send, status: int, payload: dict, headers: dict | None = None) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------
# `embedft serve`


def build_engine(model: str, adapters: Sequence[tuple[str, str]], cfg: ServeConfig,
                 base_name: str | None = None) -> Engine:
    """Load the base model and every NAME=SOURCE adapter; anything that cannot be served is refused here."""
    from embedft.config import ModelConfig
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.runtime import resolve_device
    from embedft.serving.engine import check_name
    from embedft.serving.errors import ServeError

    base_name = base_name or model
    names = [base_name] + [n for n, _ in adapters]
    for n in names:
        check_name(n)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ServeError(f"the name(s) {', '.join(dupes)} are given twice (the base model is served as "
                         f"{base_name!r}); give every --adapter its own NAME")
    device = resolve_device(cfg.device, "--device")
    with tempfile.TemporaryDirectory(prefix="embedft-serve-") as tmp:
        # Sources first: an unknown run or folder fails before the model loads.
        folders = [resolve_source(source, Path(tmp) / str(i)) for i, (_, source) in enumerate(adapters)]
        encoder = load_encoder(ModelConfig(name=model), device)
        engine = Engine(encoder, base_name, cfg)
        for (name, source), folder in zip(adapters, folders):
            engine.add_adapter(name, folder, source if is_mlflow_source(source) else str(Path(source).resolve()))
    return engine


def serve(model: str, adapters: Sequence[tuple[str, str]], cfg: ServeConfig, base_name: str | None = None) -> None:
    """Run the server until SIGTERM or Ctrl-C: then stop taking requests, finish the in-flight ones, return."""
    import uvicorn

    engine = build_engine(model, adapters, cfg, base_name)
    app = create_app(engine, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info", access_log=False,
                                           timeout_graceful_shutdown=cfg.shutdown_timeout_s, lifespan="on"))
    names = ", ".join(c["id"] for c in engine.models())
    log.info("serving %s; POST /v1/embeddings at the address uvicorn names below", names)
    # uvicorn re-raises the signal it stopped on once it has shut down; with Python's default
    # handlers a SIGTERM'd server would die by that signal instead of exiting 0 after its drain.
    previous = {s: signal.signal(s, _stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        engine.close()
    if not server.started:
        from embedft.serving.errors import ServeError

        raise ServeError(f"the server could not start on {cfg.host}:{cfg.port} (see the log above: port in use?); "
                         "pass another --port")


def _stopped(signum, frame) -> None:
    """The signal uvicorn re-raises after its graceful shutdown: nothing left to do."""
