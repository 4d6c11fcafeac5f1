"""Drift detection: a window of recent drift features against the reference, by Evidently's stat tests.

Decision rule (every threshold lives in DriftSettings):
1. Column drift, decided by Evidently's per-column tests: numeric features (confidence,
   brightness, contrast, emb_*) by two-sample Kolmogorov-Smirnov, the predicted-class
   distribution by chi-square; a column has drifted when its p-value < column_threshold (0.01).
   Evidently's default (p < 0.05) over a dozen correlated columns fires on clean windows of 200.
2. Embedding drift, decided on the embedding components together: unbiased MMD^2 with a median
   heuristic RBF kernel (Evidently's MMDDriftMethod); drifted when above embedding_threshold.
3. The window has drifted when share of drifted columns >= drift_share AND (when
   require_embedding_drift) the embedding drifted: two lines of evidence must agree.
Evidently's full report (HTML and JSON) is built only for a window that drifted, or when asked.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.legacy.calculations.stattests import get_stattest
from evidently.legacy.core import ColumnType
from evidently.metrics import EmbeddingsDrift
from evidently.metrics.embeddings import MMDDriftMethod
from evidently.presets import DataDriftPreset

from cluster import storage

NUMERIC_FEATURES = ("confidence", "brightness", "contrast")
AREA_FEATURE = "area"  # a segmentation model's predicted foreground share: tested when the reference has it
CLASS_FEATURE = "predicted_class"
EMBEDDING_COLUMN = re.compile(r"emb_\d+")
EMBEDDING_NAME = "embedding"


@dataclass(frozen=True)
class DriftSettings:
    """How a drift check is run and decided."""

    window_size: int = 200  # latest predictions the monitor compares with the reference
    min_window: int = 50  # below this, per-column tests have too little power to mean anything
    num_method: str = "ks"  # Evidently stat test for numeric columns
    cat_method: str = "chisquare"  # Evidently stat test for the predicted class
    column_threshold: float = 0.01  # a column drifts when its p-value is below this
    drift_share: float = 0.25  # the window drifts when this share of columns drifted ...
    embedding_threshold: float = 0.015  # ... and the embedding MMD^2 is above this
    require_embedding_drift: bool = True
    # Evidently's embedding metric adds a t-SNE plot: 2-30 s on 2 busy cores, so only on request.
    embedding_plot: bool = False


@dataclass
class DriftReport:
    """The outcome of one drift check."""

    drifted: bool
    share: float  # share of feature columns whose test said drift
    scores: dict[str, float]  # column -> p-value (lower means more drift)
    drifted_columns: list[str]
    embedding_score: float  # MMD^2 of the embedding components (higher means more drift)
    embedding_drifted: bool
    window_size: int
    reference_size: int
    checked_at: str
    html_path: str | None = None
    json_path: str | None = None
    settings: dict = field(default_factory=dict)
    # Set by the monitor (monitoring/thresholds.py): what decided `drifted`, "calibrated" or "evidently" (the
    # rule above), the calibrated tests' values, thresholds and p-values, and Evidently's own verdict.
    decided_by: str = "evidently"
    calibrated: dict | None = None
    evidently_drifted: bool | None = None
    calibration_error: str | None = None
    # The serving model's accuracy on the window estimated from its confidence (monitoring/estimate.py):
    # {"accuracy", "low", "high", "predictions"}, or why there is none.
    estimated_accuracy: dict | None = None
    estimate_error: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (for the store, the API and metrics)."""
        return asdict(self)


def feature_layout(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(numeric columns, embedding columns) of a drift feature table; raises on a wrong schema."""
    embedding = sorted((c for c in frame.columns if EMBEDDING_COLUMN.fullmatch(str(c))), key=lambda c: int(c[4:]))
    missing = [c for c in (*NUMERIC_FEATURES, CLASS_FEATURE) if c not in frame.columns]
    if not embedding:
        missing.append("emb_0..emb_N")
    if missing:
        raise ValueError(f"reference: missing drift feature columns {missing}")
    area = [AREA_FEATURE] if AREA_FEATURE in frame.columns else []
    return [*NUMERIC_FEATURES, *area, *embedding], embedding


def validate(reference: pd.DataFrame, current: pd.DataFrame, settings: DriftSettings) -> tuple[list[str], list[str]]:
    """Check both tables carry the same usable features; returns (numeric, embedding) columns."""
    if not isinstance(reference, pd.DataFrame) or not isinstance(current, pd.DataFrame):
        raise ValueError("reference and current must be pandas DataFrames of drift features")
    if len(reference) == 0:
        raise ValueError("reference: empty, nothing to compare against")
    numeric, embedding = feature_layout(reference)
    missing = [c for c in (*numeric, CLASS_FEATURE) if c not in current.columns]
    if missing:
        raise ValueError(f"current window: missing drift feature columns {missing}")
    if len(current) < max(1, settings.min_window):
        raise ValueError(f"current window: {len(current)} rows, need at least {max(1, settings.min_window)}")
    for name, frame in (("reference", reference), ("current window", current)):
        values = frame[numeric].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: non-numeric, missing or infinite values in {numeric}")
    return numeric, embedding


def _table(frame: pd.DataFrame, numeric: list[str]) -> pd.DataFrame:
    """Just the feature columns, typed the way Evidently should read them."""
    table = frame[numeric].astype(np.float64).reset_index(drop=True)
    table[CLASS_FEATURE] = frame[CLASS_FEATURE].astype(str).to_numpy()
    return table


def embedding_drift(reference: pd.DataFrame, current: pd.DataFrame, embedding: list[str],
                    threshold: float) -> tuple[float, bool]:
    """MMD^2 between the embedding clouds, with Evidently's own method, and its verdict."""
    score, drifted, _ = MMDDriftMethod(threshold=threshold)(current[embedding].copy(), reference[embedding].copy())
    return float(score), bool(drifted)


def build_report(numeric: list[str], settings: DriftSettings) -> Report:
    """One Evidently report: per-column drift tests plus, on request, the embedding plot."""
    metrics = [DataDriftPreset(columns=[*numeric, CLASS_FEATURE], num_method=settings.num_method,
                               cat_method=settings.cat_method, threshold=settings.column_threshold,
                               drift_share=settings.drift_share)]
    if settings.embedding_plot:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING_NAME,
                                       drift_method=MMDDriftMethod(threshold=settings.embedding_threshold)))
    # include_tests: Evidently's own per-column verdicts (direction-aware) come back as tests.
    return Report(metrics, include_tests=True)


def column_results(snapshot_dict: dict) -> tuple[dict[str, float], list[str]]:
    """Per-column drift scores and the columns Evidently's tests marked as drifted."""
    scores = {}
    for metric in snapshot_dict["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("ValueDrift"):
            scores[config["column"]] = float(metric["value"])
    drifted = [test["metric_config"]["params"]["column"] for test in snapshot_dict["tests"]
               if test["metric_config"]["params"].get("type", "").endswith("ValueDrift")
               and test["status"] == "FAIL"]
    return scores, drifted


def column_tests(ref: pd.DataFrame, cur: pd.DataFrame, numeric: list[str],
                 settings: DriftSettings) -> tuple[dict[str, float], list[str]]:
    """Per-column p-values and drifted columns from Evidently's own stat tests, without building a report.

    The same functions the report's DataDriftPreset calls (tests/test_drift.py compares the two); the
    report itself, its HTML above all, cost most of the monitor's CPU under load and is built only
    when a check has something to show (check_drift's `report`).
    """
    scores, drifted = {}, []
    columns = [(c, ColumnType.Numerical, settings.num_method) for c in numeric]
    for column, kind, method in [*columns, (CLASS_FEATURE, ColumnType.Categorical, settings.cat_method)]:
        test = get_stattest(ref[column], cur[column], kind, method)
        result = test(ref[column], cur[column], kind, settings.column_threshold)
        scores[column] = float(result.drift_score)
        if result.drifted:
            drifted.append(column)
    return scores, drifted


def evidently_report(ref: pd.DataFrame, cur: pd.DataFrame, numeric: list[str], embedding: list[str],
                     settings: DriftSettings):
    """Evidently's full report (a Snapshot) of the window: what a person opens to see why."""
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=[CLASS_FEATURE],
                                embeddings={EMBEDDING_NAME: embedding})
    return build_report(numeric, settings).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition))


def check_drift(reference: pd.DataFrame, current: pd.DataFrame, settings: DriftSettings | None = None,
                data_dir: Path | None = None, report: bool | None = None) -> DriftReport:
    """Compare a window of drift features with the reference.

    With a data_dir, Evidently's report is saved under <data_dir>/drift when `report` is True, or,
    when `report` is None (the default), only when the window drifted.
    """
    settings = settings or DriftSettings()
    numeric, embedding = validate(reference, current, settings)
    ref, cur = _table(reference, numeric), _table(current, numeric)
    embedding_score, embedding_drifted = embedding_drift(ref, cur, embedding, settings.embedding_threshold)
    scores, drifted_columns = column_tests(ref, cur, numeric, settings)
    share = len(drifted_columns) / len(scores)
    drifted = share >= settings.drift_share and (embedding_drifted or not settings.require_embedding_drift)

    checked = datetime.now(timezone.utc)
    outcome = DriftReport(
        drifted=drifted, share=share, scores=scores, drifted_columns=drifted_columns,
        embedding_score=embedding_score, embedding_drifted=embedding_drifted,
        window_size=len(cur), reference_size=len(ref), checked_at=checked.isoformat(), settings=asdict(settings))
    if data_dir is not None and (report or (report is None and drifted)):
        save_report(reference, current, outcome, settings, data_dir)
    return outcome


def save_report(reference: pd.DataFrame, current: pd.DataFrame, outcome: DriftReport, settings: DriftSettings,
                data_dir: Path) -> DriftReport:
    """Build Evidently's report of this window and save it (HTML + JSON) under <data_dir>/drift, named by
    the check's time; the outcome's html_path and json_path then point at it."""
    numeric, embedding = validate(reference, current, settings)
    ref, cur = _table(reference, numeric), _table(current, numeric)
    snapshot = evidently_report(ref, cur, numeric, embedding, settings)
    folder = storage.join(str(data_dir), "drift")
    stem = datetime.fromisoformat(outcome.checked_at).strftime("%Y%m%dT%H%M%S%fZ")
    outcome.html_path = storage.write(folder, f"{stem}.html", snapshot.get_html_str(as_iframe=False).encode())
    outcome.json_path = storage.write(folder, f"{stem}.json", snapshot.json().encode())
    return outcome
