"""The HTTP layer: one router per resource over a model backend and the store (the contract in README "Serving")."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.settings import Settings
from serve.http import admin, explain, feedback, history, label_queue, model, predict, rollout, v2
from serve.http.context import Backend, Context
from serve.http.deps import KeyChecker
from serve.http.middleware import BodyLimit, RequestMetrics
from serve.metrics import HttpMetrics
from store import Store, StoreUnavailable

__all__ = ["Backend", "create_app"]


def create_app(backend: Backend, store: Store, settings: Settings, metrics: HttpMetrics | None = None,
               shared_rate_limit=None) -> FastAPI:
    """The FastAPI app with every route of the contract (shared_rate_limit: see KeyChecker)."""
    app = FastAPI(title="rayloop", version="0.1.0",
                  description="Image classification with feedback, drift watch and retraining on Ray.")
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StoreUnavailable, store_unavailable)
    limits = settings.serve
    single_bytes = limits.max_upload_bytes * 4 // 3 + 65536
    app.add_middleware(BodyLimit, default_bytes=single_bytes, batch_bytes=single_bytes * limits.max_batch_images)
    if metrics is not None:
        app.add_middleware(RequestMetrics, metrics=metrics)
    ctx = Context(backend, store, settings, metrics, KeyChecker(limits, shared_rate_limit))
    for resource in (predict, explain, feedback, history, label_queue, model, admin, rollout):
        app.include_router(resource.router(ctx))
    app.include_router(v2.router(backend, store, settings))  # Open Inference Protocol v2
    return app


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    # Keep FastAPI's list of errors but make every answer carry a readable `detail` string first.
    errors = [{k: v for k, v in e.items() if k in {"loc", "msg", "type"}} for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
    return JSONResponse({"detail": summary, "errors": errors}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException):
    # Under /v2/ even a path or method the router does not know is refused in the protocol's `{"error": ...}`:
    # tritonclient cannot say why otherwise.
    if request.url.path.startswith("/v2/"):
        return JSONResponse({"error": str(exc.detail), "detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)
    return await http_exception_handler(request, exc)


async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
    # Nothing was acknowledged: the client may send the same request again.
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})
