"""Route dependencies: bearer API keys with an optional per-key rate limit."""

from __future__ import annotations

import collections
import time

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cluster.settings import ServeSettings, key_digest
from serve import schemas

BEARER = HTTPBearer(auto_error=False, description="an API key from RAYLOOP_API_KEYS (when keys are configured)")
GUARDED = {401: {"model": schemas.ErrorOut, "description": "no API key"},
           403: {"model": schemas.ErrorOut, "description": "wrong API key"}}


class KeyChecker:
    """Bearer API keys (off when none are configured) with an optional per-key requests/minute limit."""

    def __init__(self, serve: ServeSettings, shared=None):
        self.digests = serve.key_digests()
        self.per_minute = serve.rate_limit_per_minute
        self.window = RateWindow()
        # shared(digest, per_minute) -> seconds to wait (0 = allowed): one window for every serving
        # replica (serve/app.py hands in a Ray actor's), so N replicas do not allow N times the limit.
        self.shared = shared

    def __call__(self, credentials: HTTPAuthorizationCredentials | None = Security(BEARER)) -> str:
        """The caller's actor name for the audit log (a key fingerprint, never the key)."""
        if not self.digests:
            return "anonymous"
        if credentials is None or not credentials.credentials.strip():
            raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"})
        digest = key_digest(credentials.credentials.strip())
        if digest not in self.digests:
            raise HTTPException(403, "invalid API key")
        if self.per_minute > 0:
            self.limit(digest)
        return f"key:{digest[:12]}"

    def limit(self, digest: str) -> None:
        wait = None
        if self.shared is not None:
            try:
                wait = self.shared(digest, self.per_minute)
            except Exception as exc:  # noqa: BLE001 - the limit must not take the route down with it
                print(f"[rayloop] shared rate limit unavailable, limiting per replica: {exc!r}", flush=True)
        if wait is None:
            wait = self.window.hit(digest, self.per_minute)
        if wait > 0:
            raise too_many(self.per_minute, wait)


def too_many(per_minute: int, wait: float, what: str = "requests") -> HTTPException:
    return HTTPException(429, f"rate limit of {per_minute} {what}/minute exceeded",
                         headers={"Retry-After": str(int(wait) + 1)})


class ClientLimit:
    """A costly route's own requests/minute window per client (0 = off), on this replica: the client is its
    API key when it sends a configured one, else its address (behind a proxy that hides addresses, the
    proxy's clients share one window)."""

    MAX_CLIENTS = 10_000  # beyond this many windows, those idle for a minute are forgotten

    def __init__(self, serve: ServeSettings, per_minute: int, what: str):
        self.digests = serve.key_digests()
        self.per_minute = per_minute
        self.what = what
        self.window = RateWindow()

    async def __call__(self, request: Request) -> None:  # async: the window is only touched on the event loop
        if self.per_minute <= 0:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        digest = key_digest(credentials.strip()) if scheme.lower() == "bearer" and credentials.strip() else ""
        client = f"key:{digest}" if digest in self.digests else f"ip:{request.client.host if request.client else ''}"
        if len(self.window.recent) > self.MAX_CLIENTS:
            self.window.forget_idle()
        wait = self.window.hit(client, self.per_minute)
        if wait > 0:
            raise too_many(self.per_minute, wait, self.what)


class RateWindow:
    """Requests per key in the last minute (a sliding window)."""

    def __init__(self):
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def hit(self, key: str, per_minute: int) -> float:
        """Count a request; returns 0 when allowed, else the seconds until one would be."""
        now, window = time.monotonic(), self.recent[key]
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= per_minute:
            return max(0.001, 60 - (now - window[0]))
        window.append(now)
        return 0.0

    def forget_idle(self) -> None:
        """Drop the keys with no request in the last minute."""
        now = time.monotonic()
        for key in [key for key, window in self.recent.items() if not window or now - window[-1] > 60]:
            del self.recent[key]
