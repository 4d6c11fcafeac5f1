"""The monitor's calibrated drift decision: one Calibration per champion, versioned with its MLflow run.

monitoring.calibration computes thresholds with a known false-alarm rate from a reference; this module decides
when to fit one, where it is kept and how its decision joins Evidently's per-column tests in a DriftReport:
- The calibration is an artifact of the champion's run (`drift/calibration-w<window>-r<rate>-n<samples>.json`),
  beside the drift reference it was fitted on: the model, its reference and its thresholds travel together, and
  a promotion (a new run) gets its own. The monitor fits it the first time it checks a champion without one
  (a few seconds, once per reference) and logs it; changing the window size or the rate names another file.
- The calibrated decision is taken on full windows only (exactly `monitor.window_size` predictions): the null
  distribution depends on the window's size. With fewer, the check waits.
- Evidently's tests still run on every check: their p-values, the share of drifted columns and Evidently's own
  verdict stay in the report (`evidently_drifted`), and its HTML report is still built for a drifted window;
  `drifted` is the calibrated decision. A reference too small to calibrate leaves Evidently's rule deciding,
  and the report says why (`decided_by`, `calibration_error`).
"""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd

from monitoring.calibration import MAX_NULL_SAMPLES, Calibration, DriftDecision
from monitoring.drift import DriftReport

SEED = 0
MIN_NULL_SAMPLES = 1_000
TAIL_DRAWS = 5  # null draws expected beyond each test's threshold: fewer make the threshold the noisy maximum
MIN_RATE = 3 * TAIL_DRAWS / MAX_NULL_SAMPLES  # 3e-4 (three tests): the smallest rate fitted


def null_samples(rate: float) -> int:
    """Null windows for a per-check rate: about TAIL_DRAWS beyond each of the three tests' thresholds."""
    if not MIN_RATE <= rate < 1:
        raise ValueError(f"monitor.false_alarm_rate: {rate}, must be in [{MIN_RATE:g}, 1)")
    return max(MIN_NULL_SAMPLES, math.ceil(3 * TAIL_DRAWS / rate - 1e-9))  # 3 * 5 / 3e-4 is 50000.000001


def artifact_name(window_size: int, rate: float) -> str:
    return f"drift/calibration-w{window_size}-r{rate:g}-n{null_samples(rate)}.json"


def per_day(rate: float, window_size: int, requests_per_s: float) -> float:
    """Expected false alarms a day under steady clean traffic: every decision (a check or a watch) needs a
    quarter of a window of new predictions."""
    return rate * requests_per_s * 86_400.0 / max(1, window_size // 4)


class Calibrations:
    """The current champion's calibration, loaded from its run or fitted and logged there; one kept in memory.

    load(run_id, name) -> dict | None and save(run_id, name, dict) reach the run's artifacts (control.models).
    """

    def __init__(self, window_size: int, rate: float, load: Callable[[str, str], dict | None],
                 save: Callable[[str, str, dict], None], log: Callable[[str], None] = print):
        self.window_size, self.rate, self.name = window_size, rate, artifact_name(window_size, rate)
        self._load, self._save, self._log = load, save, log
        self._current: tuple[str, Calibration | str] | None = None  # (run id, calibration or why there is none)

    def get(self, run_id: str, reference: pd.DataFrame) -> Calibration | str:
        """The calibration for this run's reference, or the reason there is none (a too small reference)."""
        if self._current is None or self._current[0] != run_id:
            self._current = (run_id, self._obtain(run_id, reference))
        return self._current[1]

    def _obtain(self, run_id: str, reference: pd.DataFrame) -> Calibration | str:
        stored = self._load(run_id, self.name)
        if stored is not None:
            return Calibration.from_dict(stored)
        samples = null_samples(self.rate)
        daily = (f", one decision per {max(1, self.window_size // 4)} new predictions: <= "
                 f"{per_day(self.rate, self.window_size, 1.0):.3g} a day at 1 request/s")
        self._log(f"[monitor] calibrating drift thresholds for run {run_id}: {samples} null windows of "
                  f"{self.window_size} from {len(reference)} reference rows, false alarms <= {self.rate:g} a decision"
                  + daily)
        try:
            fitted = Calibration.fit(reference, self.window_size, self.rate, seed=SEED, null_samples=samples)
        except ValueError as exc:  # a reference too small for this window: Evidently's rule decides
            self._log(f"[monitor] not calibrated, Evidently's rule decides: {exc}")
            return str(exc)
        self._save(run_id, self.name, fitted.to_dict())
        return fitted


def decide(report: DriftReport, calibration: Calibration | str, window: pd.DataFrame) -> DriftReport:
    """The report with the calibrated decision in `drifted` (Evidently's verdict kept in `evidently_drifted`)."""
    report.evidently_drifted = report.drifted
    if isinstance(calibration, str):
        report.decided_by, report.calibration_error = "evidently", calibration
        return report
    decision: DriftDecision = calibration.check(window)
    report.drifted, report.decided_by, report.calibrated = decision.drift, "calibrated", decision.as_dict()
    return report
