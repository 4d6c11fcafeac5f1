"""The closed-loop scenario: shifted traffic with labels until the loop retrains and rolls out a better model.

Used by the end-to-end test and bench/loop.py. It talks to a running rayloop over HTTP and reads the
audit trail from the store; it starts nothing itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from simulation.simulate import png_bytes, simulate
from store import Event, Store
from train.data import PreparedData


class BackgroundLoad:
    """Steady clean traffic on another thread: every failed or non-200 request is counted."""

    def __init__(self, url: str, images: np.ndarray, concurrency: int = 2):
        self.url, self.images, self.concurrency = url, images, concurrency
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self.max_latency = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = offset
            while not self._stop.is_set():
                data = png_bytes(self.images[i % len(self.images)])
                started = time.monotonic()
                try:
                    response = client.post("/v1/predict", files={"file": ("x.png", data, "image/png")})
                    ok, detail = response.status_code == 200, f"HTTP {response.status_code} {response.text[:120]}"
                    version = response.json().get("model_version") if ok else None
                except httpx.HTTPError as exc:
                    ok, detail, version = False, f"{type(exc).__name__}: {exc}", None
                with self._lock:
                    self.sent += 1
                    self.max_latency = max(self.max_latency, time.monotonic() - started)
                    if version:
                        self.versions.add(str(version))
                    if not ok:
                        self.failed += 1
                        self.errors.append(detail)
                i += self.concurrency
                time.sleep(0.05)

    def start(self) -> "BackgroundLoad":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


@dataclass
class ScenarioResult:
    """Timings (seconds from the first shifted request) and accuracies of one loop run."""

    shift: str
    severity: float | None
    champion_before: str
    champion_after: str | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    clean_accuracy_after: float | None = None
    to_drift: float | None = None
    to_retrain_start: float | None = None
    to_promotion: float | None = None
    to_full_traffic: float | None = None
    shifted_sent: int = 0
    background_sent: int = 0
    background_failed: int = 0
    background_max_latency: float = 0.0
    gate: dict = field(default_factory=dict)   # the decision that promoted
    waited_for_evidence: int = 0  # gates before it that found not enough evidence
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def served_version(url: str) -> str:
    """The model version /v1/model reports."""
    return str(httpx.get(f"{url}/v1/model", timeout=30).json()["version"])


def first_event(store: Store, name: str, since: float, predicate=lambda details: True):
    """Earliest audit event of that name after `since` (epoch seconds) matching predicate, or None."""
    events = [e for e in store.list_audit(limit=500, event_name=name)
              if e.at.timestamp() >= since and predicate(e.details)]
    return min(events, key=lambda e: e.at) if events else None


def run_scenario(url: str, store: Store, data: PreparedData, *, shift: str = "rotate", severity: float | None = 90,
                 feedback_share: float = 0.8, round_size: int = 50, pause_s: float = 3.0, timeout_s: float = 1500,
                 log=print) -> ScenarioResult:
    """Drive the loop end to end and measure it; raises TimeoutError if no promotion happens in time."""
    traffic_x, traffic_y = data.split("test")      # what the users send (and label)
    eval_x, eval_y = data.split("val")             # never sent with labels: the shifted holdout
    pick = np.random.default_rng(7).permutation(len(eval_x))[:200]  # splits are sorted by class
    eval_x, eval_y = eval_x[pick], eval_y[pick]
    classes = data.meta.classes
    quiet = lambda *_: None  # noqa: E731
    result = ScenarioResult(shift, severity, champion_before=served_version(url))
    background = BackgroundLoad(url, data.split("train")[0][:300]).start()
    try:
        started = time.time()
        before = simulate(url, eval_x, eval_y, classes, shift=shift, severity=severity, count=len(eval_x),
                          feedback_share=0.0, seed=10_000, report_every=len(eval_x), log=quiet)
        result.accuracy_before = before.accuracy()
        log(f"[scenario] champion v{result.champion_before} on the shift: accuracy {result.accuracy_before:.3f}")
        deadline = time.monotonic() + timeout_s
        sent, seed, waiting_since = 0, 0, started
        while time.monotonic() < deadline:
            rnd = simulate(url, traffic_x, traffic_y, classes, shift=shift, severity=severity, count=round_size,
                           feedback_share=feedback_share, seed=seed, report_every=round_size, log=log)
            time.sleep(pause_s)  # users, not a load test: the loop has to share these 2 cores
            sent += rnd.sent
            seed += round_size
            result.errors += rnd.errors
            finished = first_event(store, Event.RETRAIN_FINISHED, waiting_since)
            if finished is not None:
                if finished.details.get("promoted"):
                    break
                gate = first_event(store, Event.GATE_DECISION, waiting_since)
                why = gate.details if gate else finished.details
                if why.get("outcome") != "not_enough_evidence":
                    raise AssertionError(f"retrain finished without promotion: {why}")
                # The gate asked for more labels: the monitor retries once they came.
                result.waited_for_evidence += 1
                waiting_since = finished.at.timestamp() + 1e-3
                log(f"[scenario] not enough evidence yet ({why.get('reason', '')[:160]}); more labels follow")
            failed = first_event(store, Event.RETRAIN_FAILED, started)
            if failed is not None:
                raise AssertionError(f"retrain failed: {failed.details}")
        else:
            raise TimeoutError(f"no promotion within {timeout_s:.0f}s of shifted traffic")
        result.shifted_sent = sent + before.sent

        promoted = first_event(store, Event.PROMOTED, started)
        result.champion_after = str(promoted.details["version"])
        drift = first_event(store, Event.DRIFT_CHECK, started, lambda d: d.get("drifted"))
        retrain = first_event(store, Event.RETRAIN_STARTED, started)
        result.to_drift = drift.at.timestamp() - started if drift else None
        result.to_retrain_start = retrain.at.timestamp() - started if retrain else None
        result.to_promotion = promoted.at.timestamp() - started
        gate = first_event(store, Event.GATE_DECISION, waiting_since)
        result.gate = gate.details if gate else {}

        # 100% of traffic on the new version: 20 answers in a row from it.
        in_a_row = 0
        probe = png_bytes(eval_x[0])
        with httpx.Client(base_url=url, timeout=60) as client:
            while in_a_row < 20 and time.monotonic() < deadline:
                body = client.post("/v1/predict", files={"file": ("x.png", probe, "image/png")}).json()
                in_a_row = in_a_row + 1 if str(body["model_version"]) == result.champion_after else 0
        result.to_full_traffic = time.time() - started
        after = simulate(url, eval_x, eval_y, classes, shift=shift, severity=severity, count=len(eval_x),
                         feedback_share=0.0, seed=10_000, report_every=len(eval_x), log=quiet)
        result.accuracy_after = after.accuracy(result.champion_after)
        clean = simulate(url, eval_x, eval_y, classes, shift="none", severity=None, count=len(eval_x),
                         feedback_share=0.0, report_every=len(eval_x), log=quiet)
        result.clean_accuracy_after = clean.accuracy(result.champion_after)
        log(f"[scenario] v{result.champion_after} on the shift: accuracy {result.accuracy_after:.3f}, "
            f"clean {result.clean_accuracy_after:.3f}")
    finally:
        background.stop()
        result.background_sent, result.background_failed = background.sent, background.failed
        result.background_max_latency = round(background.max_latency, 3)
        result.errors += background.errors[:5]
    return result
