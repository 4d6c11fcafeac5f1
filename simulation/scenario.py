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

from control import models
from monitoring import estimate
from simulation import bench_loop
from simulation.bench_loop import Ending, Mark, Scenario, TrafficSets
from simulation.simulate import SimulationResult, png_bytes, simulate
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
        full = wait_for_version(url, result.champion_after, png_bytes(eval_x[0]), deadline)
        if full is None:
            raise TimeoutError(f"v{result.champion_after} was promoted but did not take all traffic within "
                               f"{timeout_s:.0f}s")
        result.to_full_traffic = full - started
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


# -- the scenario benchmark (bench/loop.py): shifted users until the loop ends, measured from the audit trail --

AUDIT_LIMIT = 10_000  # a scenario writes at most a few hundred audit events of one kind
RECOVERY_GRACE_S = 300  # a promotion right at the timeout still gets its rollout measured
quiet = lambda *_: None  # noqa: E731


def audit_marks(store: Store, name: str, since: float) -> list[Mark]:
    """Audit events of that name at or after `since` (epoch seconds), oldest first, as plain marks."""
    events = store.list_audit(limit=AUDIT_LIMIT, event_name=name)
    return sorted((Mark(e.at.timestamp(), e.details) for e in events if e.at.timestamp() >= since),
                  key=lambda m: m.at)


def user_round(url: str, pool: tuple[np.ndarray, np.ndarray], classes: list[str], *, shift: str,
               severity: float | None, sent_before: int, size: int, feedback_share: float,
               labels: np.ndarray | None = None, seed: int = 0) -> SimulationResult:
    """The next `size` digits of the pool (each sent once before any comes again), `feedback_share` of them
    labelled: with their true labels, or with `labels` (one per digit of the round) when given."""
    images, truth = pool
    pick = bench_loop.round_indices(len(images), sent_before, size, seed)
    given = truth[pick] if labels is None else np.asarray(labels)
    return simulate(url, images[pick], given, classes, shift=shift, severity=severity, count=size,
                    feedback_share=feedback_share, seed=seed + sent_before, report_every=size, log=quiet)


def accuracy_on(url: str, sample: tuple[np.ndarray, np.ndarray], classes: list[str], *, shift: str,
                severity: float | None, estimate: Estimator | None = None) -> tuple[float | None, int]:
    """(accuracy, failed requests) of what serves now on an evaluation set, never labelled; seeded, so before
    and after see the same shifted images. `estimate`, when given, is told the answers' confidences."""
    images, labels = sample
    result = simulate(url, images, labels, classes, shift=shift, severity=severity, count=len(images),
                      feedback_share=0.0, seed=10_000, report_every=len(images), log=quiet)
    if estimate is not None:
        estimate(result.confidences)
    return result.accuracy(), result.failed


class Estimator:
    """The serving champion's accuracy estimated from confidences (monitoring/estimate.py, fitted on its
    drift reference), kept per call in `estimates`; None where the champion's reference cannot give one."""

    def __init__(self, settings):
        self.settings, self.estimates, self.errors = settings, [], []

    def __call__(self, confidences: list[float]) -> None:
        try:
            champion = models.champion(self.settings)
            if champion is not None:  # MLflow keeps a run's artifact store per run id, with the tracking URI of
                # its first use: the same template run under each scenario's own MLflow port needs a fresh one.
                from mlflow.tracking._tracking_service import utils as tracking

                getattr(tracking, "_artifact_repos_cache", {}).pop(champion["run_id"], None)
            found = estimate.from_reference(models.reference(champion["run_id"])) if champion and confidences else None
        except Exception as exc:  # noqa: BLE001 - a figure beside the measurement, never the end of a scenario
            found = f"{type(exc).__name__}: {exc}"
        if isinstance(found, str):
            self.errors.append(f"no accuracy estimate: {found[:200]}")
        self.estimates.append(round(found.estimate(confidences).accuracy, 4)
                              if isinstance(found, estimate.AccuracyEstimator) else None)


def settle(store: Store, background: BackgroundLoad, window_size: int, timeout_s: float = 240,
           log=print) -> Mark | None:
    """Wait until the monitor checked a window of clean background traffic only, so that what came before
    (the shifted evaluation images) cannot count as this scenario's drift; returns that check, or None."""
    deadline = time.monotonic() + timeout_s
    target = background.sent + 2 * window_size  # twice: a check may read its window a moment before it is audited
    while background.sent < target and time.monotonic() < deadline:
        time.sleep(1)
    flushed = time.time()
    while time.monotonic() < deadline:
        if checks := audit_marks(store, Event.DRIFT_CHECK, flushed):
            log(f"[bench-loop]   clean window checked: drifted={checks[0].details.get('drifted')}")
            return checks[0]
        time.sleep(2)
    log(f"[bench-loop]   no drift check of a clean window within {timeout_s:.0f}s; starting anyway")
    return None


def baseline_notes(check: Mark | None) -> list[str]:
    """What a row must say when the clean check before the first user request was missing or drifted."""
    if check is None:
        return ["no drift check of a clean window came before the first user request"]
    return ["the check of clean traffic just before the first user request reported drift (not counted)"] \
        if check.details.get("drifted") else []


def wait_for_version(url: str, version: str, probe: bytes, deadline: float) -> float | None:
    """When (epoch seconds) `version` answered 20 requests in a row, i.e. serves all traffic; None by the deadline."""
    in_a_row = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            try:
                response = client.post("/v1/predict", files={"file": ("x.png", probe, "image/png")})
                answered = str(response.json().get("model_version")) if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                answered = None
            in_a_row = in_a_row + 1 if answered == version else 0
            if in_a_row >= 20:
                return time.time()
            if answered is None:
                time.sleep(0.5)
    return None


def loop_progress(store: Store, since: float) -> str:
    """What the loop did since `since`, in a few words, for a progress line."""
    drifted = bench_loop.first_drift(audit_marks(store, Event.DRIFT_CHECK, since))
    started = audit_marks(store, Event.RETRAIN_STARTED, since)
    gates = [g.details.get("outcome", "?") for g in audit_marks(store, Event.GATE_DECISION, since)]
    return (f"drift {'reported' if drifted else 'not yet'}, retrains started {len(started)}"
            + (f", gates {','.join(gates)}" if gates else ""))


def run_shift(url: str, store: Store, sets: TrafficSets, classes: list[str], scenario: Scenario,
              background: BackgroundLoad, *, window_size: int, timeout_s: float, round_size: int = 25,
              pause_s: float = 3.0, feedback_share: float = 0.8, estimate: Estimator | None = None,
              log=print) -> dict:
    """Shifted users who label, in rounds, until a promotion, a rejecting gate, a failed retrain or the timeout;
    returns the scenario's measurements (see simulation.bench_loop for what each means)."""
    shift, severity = scenario.shift, scenario.severity
    before, eval_failed = accuracy_on(url, sets.shifted_eval, classes, shift=shift, severity=severity,
                                      estimate=estimate)
    row = {"accuracy_before": before}
    log(f"[bench-loop]   accuracy on the shift before: {'-' if before is None else f'{before:.3f}'}; "
        "flushing the monitor's window")
    baseline = settle(store, background, window_size, log=log)
    t0, deadline = time.time(), time.monotonic() + timeout_s
    rounds: list[tuple[float, int]] = []
    sent = labels = failed = 0
    ending = None
    while ending is None and time.monotonic() < deadline:
        rnd = user_round(url, sets.user, classes, shift=shift, severity=severity, sent_before=sent, size=round_size,
                         feedback_share=feedback_share)
        time.sleep(pause_s)  # users, not a load test: the loop has to share these cores
        sent, labels = sent + rnd.sent, labels + rnd.feedback_sent - rnd.feedback_failed
        failed += rnd.failed + rnd.feedback_failed
        rounds.append((time.time(), sent))
        ending = loop_ending(store, t0)
        log(f"[bench-loop]   round {len(rounds)}: {sent} shifted sent, {labels} labels, accuracy "
            f"{rnd.accuracy() or 0:.2f} (v{','.join(sorted(rnd.correct_by_version))}), {loop_progress(store, t0)}, "
            f"background {background.sent} sent {background.failed} failed, {time.time() - t0:.0f}s")
    row.update(user_sent=sent, labels_sent=labels, user_failed=failed, rounds=len(rounds))
    row.update(shift_outcome(store, t0, rounds, ending))
    row["notes"] += baseline_notes(baseline)
    if ending is not None and ending.outcome == "promoted":
        reached = wait_for_version(url, row["champion_after"], png_bytes(sets.shifted_eval[0][0]),
                                   max(deadline, time.monotonic() + RECOVERY_GRACE_S))
        row["recovery_s"] = round(reached - t0, 1) if reached else None
    row["accuracy_after"], failed_after = accuracy_on(url, sets.shifted_eval, classes, shift=shift, severity=severity,
                                                      estimate=estimate)
    if estimate is not None:
        row["estimated_before"], row["estimated_after"] = (estimate.estimates + [None, None])[:2]
        row["notes"] += sorted(set(estimate.errors))
    row["eval_failed"] = eval_failed + failed_after
    if sent > len(sets.user[0]):
        row["notes"].append(f"the {len(sets.user[0])} user digits were sent more than once ({sent} sent)")
    return row


def loop_ending(store: Store, t0: float) -> Ending | None:
    """How the loop ended since t0 (bench_loop.loop_end), or None while it goes on."""
    failures = audit_marks(store, Event.RETRAIN_FAILED, t0) + audit_marks(store, Event.RETRAIN_INTERRUPTED, t0)
    return bench_loop.loop_end(audit_marks(store, Event.GATE_DECISION, t0), audit_marks(store, Event.PROMOTED, t0),
                               failures, audit_marks(store, Event.ROLLOUT_ROLLED_BACK, t0))


def shift_outcome(store: Store, t0: float, rounds: list[tuple[float, int]], ending: Ending | None) -> dict:
    """The audit trail's side of a shift scenario: drift, the deciding gate, the labels its retrain used."""
    drift = bench_loop.first_drift(audit_marks(store, Event.DRIFT_CHECK, t0))
    gates = audit_marks(store, Event.GATE_DECISION, t0)
    gate = bench_loop.gate_before(gates, ending.mark.at) if ending else (gates[-1] if gates else None)
    retrain = bench_loop.retrain_of(gate, audit_marks(store, Event.RETRAIN_STARTED, t0)) if gate else None
    promoted = ending is not None and ending.outcome == "promoted"
    out = {"outcome": ending.outcome if ending else "timeout", "promoted": promoted,
           "samples_to_drift": bench_loop.samples_to_drift(rounds, drift.at if drift else None),
           "drift_s": round(drift.at - t0, 1) if drift else None,
           "labels_used": bench_loop.labels_in(retrain) if retrain else None,
           "retrain_search": retrain.details.get("search") if retrain else None,
           "gate_outcome": gate.details.get("outcome") if gate else None,
           "gate_reason": gate.details.get("reason") if gate else None, "notes": []}
    if gate is not None and ending is not None and ending.outcome in ("promoted", "rolled_back"):
        stages = [m for m in audit_marks(store, Event.ROLLOUT_STAGE, gate.at) if m.at <= ending.mark.at]
        out["rollout"] = bench_loop.rollout_stages(stages, ending.mark) if stages else None
    if ending is not None and ending.outcome == "rolled_back":
        out["notes"].append(f"the staged rollout rolled the challenger back: {ending.mark.details.get('reason')}")
    if out["promoted"]:
        out["champion_after"] = str(ending.mark.details["version"])
    elif ending is not None and ending.outcome == "failed":
        out["notes"].append(f"a retrain ended without a gate: {str(ending.mark.details)[:300]}")
    return out
