"""A replica's part in a rollout: the challenger beside the champion, scoring or answering its share.

Each replica follows the rollout in the database (store/rollouts.py, every rollout.poll_s): it loads the
challenger in the background while the champion serves, then for each batch
- answers the requests routed to the canary (route < canary_share) with the challenger, the champion's
  answer computed beside it: a challenger that fails leaves the caller the champion's answer, never an error;
- with probability shadow_share, scores the batch with the challenger in the background after the callers
  have their answers (one such run at a time per replica: a busy replica skips, it never queues).
Both answers of every touched request go to rollout_scores, keyed by the prediction id the caller gets,
so feedback on it judges both models on the same item (the gate's paired test, online).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cluster.settings import Settings
from store.rollouts import Rollout, Rollouts, score_row
from store.schema import new_id

MAX_PENDING_ROWS = 10_000  # scores waiting for the database; beyond, the oldest are dropped (and counted)


@dataclass
class Split:
    """How one batch takes part in the rollout."""

    rollout: Rollout
    challenger: object            # serve.classifier.LoadedModel
    canary: set[int]              # item positions the challenger answers
    shadow: bool                  # the challenger scores the rest of the batch in the background
    rows: list[dict] = field(default_factory=list)
    work: tuple = ()              # (positions run, their pixels, the champion's ms) for the background run


class Canary:
    """Follows the rollout under way; splits batches; keeps both models' answers until they are written."""

    def __init__(self, settings: Settings, load: Callable[[str], object], run: Callable[[object, np.ndarray], list]):
        self.rule = settings.rollout
        self._load, self._run = load, run
        self._database_url = settings.database_url
        self._rollouts: Rollouts | None = None
        self.rollout: Rollout | None = None
        self.challenger = None
        self._lock = threading.Lock()
        self._pending: list[dict] = []
        self.dropped = 0
        self._shadowing = False
        self._stop = threading.Event()
        self._random = random.Random()
        threading.Thread(target=self._follow, daemon=True, name="rollout-follower").start()

    def stop(self) -> None:
        self._stop.set()

    # -- following the rollout --------------------------------------------------------------------
    def _follow(self) -> None:
        while not self._stop.wait(self.rule.poll_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - the database may blink: keep serving the champion
                self.rollout = None
                print(f"[rayloop] rollout follower: {exc!r}", flush=True)

    def refresh(self) -> None:
        """Look up the rollout, load its challenger if new, write pending scores."""
        if self._rollouts is None:
            self._rollouts = Rollouts.from_url(self._database_url)
        current = self._rollouts.current()
        if current is not None and current.stale():
            current = None  # its driver is gone: nobody would judge or end it
        if current is None:
            self.rollout, self.challenger = None, None
        else:
            if self.challenger is None or self.challenger.version != current.challenger:
                self.rollout, self.challenger = None, None  # the champion serves meanwhile
                challenger = self._load(current.challenger)
                self._warm(challenger)
                self.challenger = challenger
            self.rollout = current
        self.flush()

    def _warm(self, challenger) -> None:
        """One forward pass on blank pixels before the challenger meets a request. A freshly loaded model's first
        pass (allocations, kernels picked) took 88 ms where the champion's took 19 (CI, tests/test_canary_serve.py):
        with the p99 of a dozen passes, that one pass alone breached the latency SLO and rolled back a model for
        being new. A challenger that cannot run is left to fail on live requests, where its errors are counted."""
        try:
            self._run(challenger, np.zeros((1, *challenger.input_shape), dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - judged on its live runs, not here
            print(f"[rayloop] challenger {challenger.version}: warm-up pass failed: {exc!r}", flush=True)

    def flush(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
        if rows and self._rollouts is not None:
            self._rollouts.record_scores(rows)

    def _keep(self, rows: list[dict]) -> None:
        with self._lock:
            self._pending.extend(rows)
            excess = len(self._pending) - MAX_PENDING_ROWS
            if excess > 0:
                del self._pending[:excess]
                self.dropped += excess

    # -- per batch ----------------------------------------------------------------------------------
    def split(self, routes: list[float | None]) -> Split | None:
        """The batch's part in the rollout under way (None when there is none, or its challenger is loading)."""
        rollout, challenger = self.rollout, self.challenger
        if rollout is None or challenger is None:
            return None
        draws = [self._random.random() if r is None else r for r in routes]
        canary = {i for i, r in enumerate(draws) if r < rollout.canary_share}
        shadow = not self._shadowing and self._random.random() < rollout.shadow_share and len(canary) < len(routes)
        return Split(rollout, challenger, canary, shadow) if canary or shadow else None

    def answer(self, split: Split, results: list[dict], ok: list[int], pixels: np.ndarray,
               champion_ms: float) -> None:
        """Put the challenger's answers in for the canary's items (in the batch's thread, before callers get
        them); every item the rollout touches gets its prediction id now."""
        positions = [k for k, i in enumerate(ok) if i in split.canary]
        if positions:
            started = time.perf_counter()
            answers = None
            error = mismatch(split.challenger, pixels)
            if error is None:
                try:
                    answers = self._run(split.challenger, pixels[positions])
                except Exception as exc:  # noqa: BLE001 - the caller gets the champion's answer instead
                    error = f"{type(exc).__name__}: {exc}"
            ms = (time.perf_counter() - started) * 1000
            for n, k in enumerate(positions):
                i = ok[k]
                champion = {"label": results[i]["label"], "ms": champion_ms}
                prediction_id = new_id()
                if answers is not None:
                    results[i] = {**answers[n], "prediction_id": prediction_id}
                    row = score_row(split.rollout, prediction_id, "challenger", champion,
                                    {"label": answers[n]["label"], "ms": ms})
                else:
                    results[i]["prediction_id"] = prediction_id
                    row = score_row(split.rollout, prediction_id, "champion", champion, None, error)
                split.rows.append(row)
        if split.shadow:
            for i in ok:
                if i not in split.canary:
                    results[i]["prediction_id"] = new_id()
            self._shadowing = True
        self._keep(split.rows)

    def shadow(self, split: Split, results: list[dict], ok: list[int], pixels: np.ndarray,
               champion_ms: float) -> None:
        """The challenger scores the whole batch (as the champion did: comparable times); rows for the
        items the champion answered. Runs after the callers have their answers."""
        try:
            started = time.perf_counter()
            answers = None
            error = mismatch(split.challenger, pixels)
            try:
                answers = None if error else self._run(split.challenger, pixels)
            except Exception as exc:  # noqa: BLE001 - counted against the challenger's error rate
                error = f"{type(exc).__name__}: {exc}"
            ms = (time.perf_counter() - started) * 1000
            rows = []
            for k, i in enumerate(ok):
                if i in split.canary or "prediction_id" not in results[i]:
                    continue
                champion = {"label": results[i]["label"], "ms": champion_ms}
                challenger = {"label": answers[k]["label"], "ms": ms} if answers is not None else None
                rows.append(score_row(split.rollout, results[i]["prediction_id"], "champion", champion, challenger,
                                      error))
            self._keep(rows)
        finally:
            self._shadowing = False


def mismatch(challenger, pixels: np.ndarray) -> str | None:
    """Why the challenger cannot take these pixels (another input shape), or None."""
    if tuple(pixels.shape[1:]) != tuple(challenger.input_shape):
        return f"challenger input {list(challenger.input_shape)} != {list(pixels.shape[1:])}"
    return None
