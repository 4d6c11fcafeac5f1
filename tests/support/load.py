"""The one load generator of the tests: clients posting an image to /v1/predict while something happens
(a rollout, a replica kill, a failing retrain), every answer kept."""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

import httpx

from tests.support.images import png


class Answer(NamedTuple):
    sent_at: float        # time.monotonic() when the request left
    status: int           # 0: no HTTP answer at all (refused, reset, timed out)
    seconds: float
    served: str | None    # the model version of a 200, else the answer's body or the client's error


class Load:
    """`threads` clients posting until the block ends, and `linger_s` seconds after it (the last moments of
    what the block did happen under load too)."""

    def __init__(self, url: str, threads: int = 3, timeout: float = 60, linger_s: float = 0.0):
        self.url, self.timeout, self.linger_s = url, timeout, linger_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.post("/v1/predict", files={"file": ("x.png", png(), "image/png")})
                    status = r.status_code
                    served = r.json().get("model_version") if status == 200 else r.text
                except httpx.HTTPError as exc:
                    status, served = 0, repr(exc)
                self.answers.append(Answer(started, status, time.monotonic() - started, served))

    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]

    def failed(self, since: float = 0.0) -> list[Answer]:
        """Answers other than 200 to requests sent at or after `since` (time.monotonic())."""
        return [a for a in self.answers if a.status != 200 and a.sent_at >= since]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(self.linger_s)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * self.timeout)
