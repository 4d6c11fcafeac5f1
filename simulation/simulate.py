"""`rayloop simulate`: shifted traffic plus user labels against the HTTP API, with accuracy over time."""

from __future__ import annotations

import io
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from simulation.shifts import shift_images


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 HxWxC -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class SimulationResult:
    """What the simulated users saw."""

    sent: int = 0
    failed: int = 0
    feedback_sent: int = 0
    feedback_failed: int = 0
    correct_by_version: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    confidences: list[float] = field(default_factory=list)  # of every answer, in the order they came
    timeline: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def accuracy(self, version: str | None = None) -> float | None:
        """Accuracy on the shift, for one model version or overall."""
        pairs = [self.correct_by_version[version]] if version else list(self.correct_by_version.values())
        total = sum(p[1] for p in pairs)
        return sum(p[0] for p in pairs) / total if total else None

    def summary(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "feedback_sent": self.feedback_sent,
                "feedback_failed": self.feedback_failed,
                "accuracy_by_version": {v: round(c / n, 4) for v, (c, n) in self.correct_by_version.items() if n},
                "errors": self.errors[:5]}


def simulate(url: str, images: np.ndarray, labels: np.ndarray, classes: list[str], *, shift: str,
             severity: float | None, count: int, feedback_share: float, concurrency: int = 4,
             api_key: str | None = None, seed: int = 0, report_every: int = 50, duration_s: float = 0.0,
             log=print) -> SimulationResult:
    """Send `count` shifted images (cycling through `images`), label `feedback_share` of them."""
    rng = np.random.default_rng(seed)
    result = SimulationResult()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url, timeout=60, headers=headers)
    started = time.monotonic()
    window: list[tuple[bool, str]] = []
    lock = threading.Lock()  # the counters are shared by the sender threads

    order = rng.permutation(len(images))  # splits are stored sorted by class: never send them in order

    def one(i: int) -> None:
        index = int(order[i % len(images)])
        image = shift_images(images[index:index + 1], shift, severity, seed=seed + i)[0] if shift != "none" \
            else images[index]
        truth = classes[int(labels[index])]
        try:
            response = client.post("/v1/predict", files={"file": ("digit.png", png_bytes(image), "image/png")})
        except httpx.HTTPError as exc:
            with lock:
                result.sent += 1
                result.failed += 1
                result.errors.append(f"predict: {type(exc).__name__}: {exc}")
            return
        with lock:
            result.sent += 1
            if response.status_code != 200:
                result.failed += 1
                result.errors.append(f"predict: HTTP {response.status_code}: {response.text[:200]}")
                return
            body = response.json()
            hit = body["label"] == truth
            pair = result.correct_by_version[str(body["model_version"])]
            pair[0] += int(hit)
            pair[1] += 1
            window.append((hit, str(body["model_version"])))
            result.confidences.append(float(body["confidence"]))
            label_it = rng.random() < feedback_share
        if label_it:
            try:
                feedback = client.post("/v1/feedback", json={"prediction_id": body["prediction_id"], "label": truth})
                ok, detail = feedback.status_code == 201, f"HTTP {feedback.status_code}: {feedback.text[:200]}"
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            with lock:
                result.feedback_sent += 1
                if not ok:
                    result.feedback_failed += 1
                    result.errors.append(f"feedback: {detail}")

    i = 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        while i < count or (duration_s and time.monotonic() - started < duration_s):
            batch = list(range(i, i + report_every))
            list(pool.map(one, batch))
            i += report_every
            recent = window[-report_every:]
            point = {"t": round(time.monotonic() - started, 1), "sent": result.sent,
                     "accuracy": round(sum(h for h, _ in recent) / len(recent), 3) if recent else None,
                     "versions": sorted({v for _, v in recent}), "failed": result.failed}
            result.timeline.append(point)
            log(f"[simulate] {point['t']:>6.1f}s sent {point['sent']:>5} shift={shift} "
                f"accuracy(last {len(recent)}) {point['accuracy']} model v{','.join(point['versions'])} "
                f"failed {point['failed']}")
    client.close()
    return result
