"""Pure ASGI middleware (BaseHTTPMiddleware is slow): request metrics, and body limits enforced while bodies stream."""

from __future__ import annotations

import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from serve.metrics import HttpMetrics


class RequestMetrics:
    """Pure ASGI middleware counting requests by route template and status (BaseHTTPMiddleware is slow)."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router fills this in
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)


class BodyLimit:
    """Pure ASGI middleware: refuse a request body past its route's limit (413) while it streams in,
    whether or not it declares a Content-Length, so an oversized upload never sits in memory whole."""

    def __init__(self, app, default_bytes: int, batch_bytes: int):
        self.app = app
        self.default_bytes = default_bytes
        self.batch_bytes = batch_bytes

    def limit(self, path: str) -> int:
        return self.batch_bytes if path == "/v1/predict/batch" or path.startswith("/v2/models/") else \
            self.default_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, seen = self.limit(scope["path"]), 0
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            message = f"request body is {int(length)} bytes; the limit is {limit}"
            # /v2 clients read the protocol's `error` key (tritonclient cannot decode an answer without it).
            body = {"detail": message, **({"error": message} if scope["path"].startswith("/v2/") else {})}
            return await JSONResponse(body, status_code=413)(scope, receive, send)

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        return await self.app(scope, counted, send)
