"""Calibrated drift detection: thresholds with a known false-alarm rate for this model, reference and window size.

The rule in monitoring.drift (a share of per-column p < 0.01 AND the embedding's MMD^2 > 0.015, Evidently's
constant) fits no particular model or window size, so how often it fires on clean traffic is unknown. Here the
null distribution of each statistic is estimated from the reference itself and the thresholds follow from it.

Calibration.fit, step by step:
1. Rows: at most max_reference_rows of the reference (a seeded random sample), shuffled and split in two disjoint
   parts: the comparison sample (comparison_rows, at most half) that every check compares a window with, and
   the pool that null windows are drawn from.
2. Statistics of a window against the comparison sample:
   - embedding_mmd2: unbiased MMD^2 of the emb_* columns (standardised by the comparison sample's mean and sd),
     RBF kernel exp(-|x - y|^2 / h), h the median squared distance within the comparison sample, fixed at fit.
     A check costs O(window x comparison_rows): the comparison sample's own kernel mean is computed once.
   - class_tv: total variation distance between the window's and the comparison sample's predicted-class shares
     (a class the reference never predicted counts, with reference share 0).
   - confidence_ks: the two-sample Kolmogorov-Smirnov distance between their confidences.
3. Null: null_samples windows of window_size rows, each drawn WITH replacement from the pool: independent
   draws from the reference's distribution, as live traffic is. Without replacement a pool not much larger than
   a window (a 1,000-image reference: 500 rows, windows of 200) gives windows that share most of their rows and
   vary less than live ones (by the finite-population factor 1 - 200/500), so thresholds come out too low. A row
   drawn twice is one image, not two alike: MMD^2 leaves out the pairs of a row with itself. The pool shares
   no row with the comparison sample, as a live window does not: a window that contained comparison rows would
   look closer to the reference than live traffic does, and the thresholds would be too low.
4. Per statistic, the empirical p-value p = (1 + #{null >= observed}) / (1 + null_samples); for a window
   exchangeable with the null windows, P(p <= u) <= u.
5. Holm's step-down at false_alarm_rate across the three tests. A window drifts when any test fires, which
   happens exactly when min p <= false_alarm_rate / 3 (Holm and Bonferroni agree on whether anything fires), so
   the false-alarm rate per check is at most false_alarm_rate; Holm only names more of the tests that fired.
   A statistic's threshold is its Bonferroni one: the value it must exceed to fire on its own.

A window must have exactly window_size rows: the null shrinks with the window (MMD^2 goes as 1 / n), so one
size's thresholds are wrong for another. Fit one calibration per window size checked (a fit takes about a second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist

from monitoring.drift import CLASS_FEATURE, EMBEDDING_COLUMN

FORMAT_VERSION = 1
CONFIDENCE = "confidence"
EMBEDDING_MMD2, CLASS_TV, CONFIDENCE_KS = "embedding_mmd2", "class_tv", "confidence_ks"
STATISTICS = (EMBEDDING_MMD2, CLASS_TV, CONFIDENCE_KS)
MIN_WINDOW = 20  # below this no test has the power to tell a shift from noise
MAX_WINDOW = 2_000  # a null draw costs window^2 kernel entries
MAX_REFERENCE_ROWS = 50_000  # the pool's kernel against the comparison sample: rows x comparison_rows
MAX_COMPARISON_ROWS = 5_000  # each check: window x comparison_rows kernel entries
MAX_NULL_SAMPLES = 50_000
MEDIAN_ROWS = 1_000  # rows of the comparison sample the median heuristic looks at
CHUNK_ROWS = 1_000  # pool rows per kernel block, so memory stays at CHUNK_ROWS x comparison_rows
DENSE_POOL_ROWS = 2_500  # a pool this small gets its whole kernel at once (50 MB) and null draws in batches
BATCH_ENTRIES = 2_000_000  # null draws per batch x pool rows (16 MB of row counts)


@dataclass(frozen=True)
class StatisticResult:
    """One test of a check: its statistic, the threshold it must exceed alone, its empirical p-value."""

    name: str
    value: float
    threshold: float
    p_value: float
    fired: bool


@dataclass(frozen=True)
class DriftDecision:
    """The outcome of one calibrated check."""

    drift: bool
    statistics: tuple[StatisticResult, ...]
    false_alarm_rate: float
    window_size: int

    @property
    def fired(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.statistics if s.fired)

    def as_dict(self) -> dict:
        """Plain JSON-ready dict (for the store, the API and metrics)."""
        return {"drift": self.drift, "fired": list(self.fired), "false_alarm_rate": self.false_alarm_rate,
                "window_size": self.window_size,
                "statistics": {s.name: {"value": s.value, "threshold": s.threshold, "p_value": s.p_value,
                                        "fired": s.fired} for s in self.statistics}}


@dataclass(frozen=True, eq=False)
class Calibration:
    """What a check compares a window with, and the null distribution of each statistic; see the module doc."""

    window_size: int
    false_alarm_rate: float
    embedding_columns: tuple[str, ...]
    center: np.ndarray  # standardisation of the embedding, from the comparison sample
    scale: np.ndarray
    bandwidth: float  # h of the RBF kernel exp(-|x - y|^2 / h)
    comparison_embedding: np.ndarray  # standardised
    comparison_kernel_mean: float  # mean off-diagonal kernel within the comparison sample
    classes: tuple[str, ...]
    class_shares: np.ndarray
    comparison_confidence: np.ndarray  # sorted
    null: dict[str, np.ndarray] = field(repr=False)  # statistic -> its sorted null values
    reference_rows: int  # rows of the reference the fit used (comparison sample + pool)
    seed: int

    @classmethod
    def fit(cls, reference: pd.DataFrame, window_size: int, false_alarm_rate: float, *, seed: int,
            null_samples: int = 1_000, max_reference_rows: int = 5_000, comparison_rows: int = 1_000) -> Calibration:
        """Calibrate checks of windows of window_size rows to false_alarm_rate per check (see the module doc).

        seed makes the fit reproducible; null_samples windows estimate each null (a rate r needs at least 3 / r - 1);
        max_reference_rows and comparison_rows cap the rows used and what each check compares with.
        """
        _check_settings(window_size, false_alarm_rate, null_samples, max_reference_rows, comparison_rows)
        embedding = _embedding_columns(reference, "reference")
        rng = np.random.default_rng(seed)
        rows = rng.permutation(len(reference))[:max_reference_rows]
        n_comparison = min(comparison_rows, len(rows) // 2)
        if n_comparison < window_size or len(rows) - n_comparison < window_size:
            raise ValueError(f"reference: {len(reference)} rows, need at least {2 * window_size} (and "
                             f"comparison_rows >= window_size) to calibrate windows of {window_size}")
        raw, confidence, labels = _features(reference.iloc[rows], "reference", embedding)
        center, scale = raw[:n_comparison].mean(0), raw[:n_comparison].std(0)
        scale[scale == 0] = 1.0  # a constant component carries no signal; keep it from dividing by zero
        emb = (raw - center) / scale
        median_sample = emb[:min(n_comparison, MEDIAN_ROWS)]
        pairs = _sq_distances(median_sample, median_sample)[np.triu_indices(len(median_sample), 1)]
        bandwidth = float(np.median(pairs)) or 1.0
        classes = tuple(sorted(labels.iloc[:n_comparison].unique()))
        codes = _class_codes(labels, classes)
        comparison = emb[:n_comparison]
        calibration = cls(
            window_size=window_size, false_alarm_rate=false_alarm_rate, embedding_columns=tuple(embedding),
            center=center, scale=scale, bandwidth=bandwidth, comparison_embedding=comparison,
            comparison_kernel_mean=_off_diagonal_mean(_rbf(comparison, comparison, bandwidth)), classes=classes,
            class_shares=np.bincount(codes[:n_comparison], minlength=len(classes)) / n_comparison,
            comparison_confidence=np.sort(confidence[:n_comparison]), null={}, reference_rows=len(rows), seed=seed)
        pool = slice(n_comparison, None)
        return replace(calibration, null=calibration._null(emb[pool], codes[pool], confidence[pool], null_samples, rng))

    @property
    def null_samples(self) -> int:
        return len(self.null[EMBEDDING_MMD2])

    def thresholds(self) -> dict[str, float]:
        """Per statistic, the value it must exceed to fire on its own (at false_alarm_rate / 3)."""
        allowed = _allowed_exceedances(self.false_alarm_rate / len(STATISTICS), self.null_samples)
        return {name: _threshold(self.null[name], allowed) for name in STATISTICS}

    def check(self, window: pd.DataFrame) -> DriftDecision:
        """Decide whether a window of exactly window_size rows drifted from the reference."""
        raw, confidence, labels = _features(window, "window", list(self.embedding_columns))
        extra = [c for c in _embedding_columns(window, "window") if c not in self.embedding_columns]
        if extra:  # another model's features (drift_dims changed): its calibration is another one
            raise ValueError(f"window: embedding columns {extra} the calibration does not have")
        if len(window) != self.window_size:
            raise ValueError(f"window: {len(window)} rows, this calibration is for windows of exactly "
                             f"{self.window_size} (fit one per window size)")
        emb = (raw - self.center) / self.scale
        cross = float(_rbf(emb, self.comparison_embedding, self.bandwidth).mean())
        values = {EMBEDDING_MMD2: self._mmd2(emb, cross), CLASS_TV: self._class_tv(_class_codes(labels, self.classes)),
                  CONFIDENCE_KS: self._confidence_ks(confidence)}
        return self._decide(values)

    def _mmd2(self, emb: np.ndarray, cross_mean: float) -> float:
        """Unbiased MMD^2 of a standardised window, given its mean kernel with the comparison sample."""
        within = _off_diagonal_mean(_rbf(emb, emb, self.bandwidth))
        return within + self.comparison_kernel_mean - 2.0 * cross_mean

    def _class_tv(self, codes: np.ndarray) -> float:
        shares = np.bincount(codes, minlength=len(self.classes) + 1) / len(codes)
        return float(0.5 * np.abs(shares - np.append(self.class_shares, 0.0)).sum())

    def _confidence_ks(self, confidence: np.ndarray) -> float:
        window, reference = np.sort(confidence), self.comparison_confidence
        points = np.concatenate([window, reference])
        gap = (np.searchsorted(window, points, side="right") / len(window)
               - np.searchsorted(reference, points, side="right") / len(reference))
        return float(np.abs(gap).max())

    def _null(self, emb: np.ndarray, codes: np.ndarray, confidence: np.ndarray, samples: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Each statistic over `samples` windows drawn from the pool (standardised embedding, class codes,
        confidence), sorted. A pool row's mean kernel with the comparison sample is computed once, in blocks;
        a pool of at most DENSE_POOL_ROWS rows gets its whole kernel once and draws a batch at a time."""
        cross = np.concatenate([_rbf(emb[start:start + CHUNK_ROWS], self.comparison_embedding, self.bandwidth)
                                .mean(1) for start in range(0, len(emb), CHUNK_ROWS)])
        null = np.empty((len(STATISTICS), samples))
        batch = max(1, BATCH_ENTRIES // max(len(emb), self.window_size))
        dense = _Pool(self, emb, codes, confidence, cross) if len(emb) <= DENSE_POOL_ROWS else None
        for start in range(0, samples, batch):
            rows = rng.integers(0, len(emb), (min(batch, samples - start), self.window_size))
            null[:, start:start + len(rows)] = dense.statistics(rows) if dense is not None else np.array(
                [self._draw(emb, codes, confidence, cross, draw) for draw in rows]).T
        return {name: np.sort(values) for name, values in zip(STATISTICS, null)}

    def _draw(self, emb: np.ndarray, codes: np.ndarray, confidence: np.ndarray, cross: np.ndarray,
              rows: np.ndarray) -> tuple[float, float, float]:
        """The three statistics of one null window (pool row indices, a row drawn twice counted once in MMD^2)."""
        n = len(rows)
        unique, counts = np.unique(rows, return_counts=True)
        ties = float(counts @ counts)  # position pairs on the same row, the diagonal included
        kernel = counts @ _rbf(emb[unique], emb[unique], self.bandwidth) @ counts
        mmd2 = (kernel - ties) / (n * n - ties) + self.comparison_kernel_mean - 2.0 * float(cross[rows].mean())
        return mmd2, self._class_tv(codes[rows]), self._confidence_ks(confidence[rows])

    def _decide(self, values: dict[str, float]) -> DriftDecision:
        """Holm's step-down over the empirical p-values, in exceedance counts so thresholds agree exactly."""
        n, k = self.null_samples, len(STATISTICS)
        exceed = {name: n - int(np.searchsorted(self.null[name], values[name], side="left")) for name in STATISTICS}
        fired: set[str] = set()
        for rank, name in enumerate(sorted(STATISTICS, key=lambda s: exceed[s])):
            if exceed[name] > _allowed_exceedances(self.false_alarm_rate / (k - rank), n):
                break
            fired.add(name)
        thresholds = self.thresholds()
        results = tuple(StatisticResult(name=name, value=float(values[name]), threshold=thresholds[name],
                                        p_value=(1 + exceed[name]) / (1 + n), fired=name in fired)
                        for name in STATISTICS)
        return DriftDecision(drift=bool(fired), statistics=results, false_alarm_rate=self.false_alarm_rate,
                             window_size=self.window_size)

    def to_dict(self) -> dict:
        """JSON-ready, so the calibration can be versioned with the model (an MLflow artifact)."""
        return {"format_version": FORMAT_VERSION, "window_size": self.window_size,
                "false_alarm_rate": self.false_alarm_rate, "embedding_columns": list(self.embedding_columns),
                "center": self.center.tolist(), "scale": self.scale.tolist(), "bandwidth": self.bandwidth,
                "comparison_embedding": self.comparison_embedding.tolist(),
                "comparison_kernel_mean": self.comparison_kernel_mean, "classes": list(self.classes),
                "class_shares": self.class_shares.tolist(),
                "comparison_confidence": self.comparison_confidence.tolist(),
                "null": {name: values.tolist() for name, values in self.null.items()},
                "reference_rows": self.reference_rows, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """The calibration to_dict wrote; raises ValueError on another format version or a missing field."""
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"calibration: format_version {data.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")
        missing = [name for name in cls.__dataclass_fields__ if name not in data]
        if missing or set(data.get("null", {})) != set(STATISTICS):
            raise ValueError(f"calibration: missing fields {missing or ['null: ' + ', '.join(STATISTICS)]}")
        arrays = {name: np.asarray(data[name], dtype=np.float64)
                  for name in ("center", "scale", "comparison_embedding", "class_shares", "comparison_confidence")}
        return cls(**{**{name: data[name] for name in cls.__dataclass_fields__}, **arrays,
                      "embedding_columns": tuple(data["embedding_columns"]), "classes": tuple(data["classes"]),
                      "null": {name: np.asarray(data["null"][name], dtype=np.float64) for name in STATISTICS}})


class _Pool:
    """The null statistics of many windows at once, from row counts: a small pool's whole kernel is computed
    once, and each statistic of a batch of draws is a matrix product (about 10x faster than one at a time)."""

    def __init__(self, calibration: Calibration, emb: np.ndarray, codes: np.ndarray, confidence: np.ndarray,
                 cross: np.ndarray):
        self.c, self.cross = calibration, cross
        self.kernel = _rbf(emb, emb, calibration.bandwidth)
        self.onehot = np.eye(len(calibration.classes) + 1)[codes]
        self.shares = np.append(calibration.class_shares, 0.0)
        # Kolmogorov-Smirnov: the gap between the two ECDFs peaks at a pool value or a comparison value.
        reference = calibration.comparison_confidence
        self.order = np.argsort(confidence, kind="stable")
        ordered = confidence[self.order]
        self.at_pool = np.searchsorted(ordered, ordered, side="right")  # pool rows <= each pool value
        self.ref_at_pool = np.searchsorted(reference, ordered, side="right") / len(reference)
        self.at_ref = np.searchsorted(ordered, reference, side="right")
        self.ref_at_ref = np.searchsorted(reference, reference, side="right") / len(reference)

    def statistics(self, rows: np.ndarray) -> np.ndarray:
        """(3, draws): MMD^2, class TV and confidence KS of each row of `rows` (pool indices, one draw a row)."""
        draws, n = rows.shape
        pool = len(self.kernel)
        counts = np.bincount((np.arange(draws)[:, None] * pool + rows).ravel(),
                             minlength=draws * pool).reshape(draws, pool).astype(np.float64)
        ties = np.einsum("dp,dp->d", counts, counts)
        within = (np.einsum("dp,dp->d", counts @ self.kernel, counts) - ties) / (n * n - ties)
        mmd2 = within + self.c.comparison_kernel_mean - 2.0 * (counts @ self.cross) / n
        tv = 0.5 * np.abs(counts @ self.onehot / n - self.shares).sum(1)
        cumulative = np.concatenate([np.zeros((draws, 1)), np.cumsum(counts[:, self.order], axis=1) / n], axis=1)
        ks = np.maximum(np.abs(cumulative[:, self.at_pool] - self.ref_at_pool).max(1),
                        np.abs(cumulative[:, self.at_ref] - self.ref_at_ref).max(1))
        return np.stack([mmd2, tv, ks])


def _embedding_columns(frame: pd.DataFrame, name: str) -> list[str]:
    """The emb_* columns of a drift feature table, in component order."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name}: must be a pandas DataFrame of drift features, got {type(frame).__name__}")
    found = sorted((c for c in frame.columns if EMBEDDING_COLUMN.fullmatch(str(c))), key=lambda c: int(c[4:]))
    if not found:
        raise ValueError(f"{name}: missing drift feature columns ['emb_0..emb_N']")
    return found


def _features(frame: pd.DataFrame, name: str, embedding: list[str]) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """(embedding, confidence, predicted classes as text) of a table; a ValueError names the columns at fault."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{name}: must be a pandas DataFrame of drift features, got {type(frame).__name__}")
    numeric = [*embedding, CONFIDENCE]
    missing = [c for c in (*numeric, CLASS_FEATURE) if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing drift feature columns {missing}")
    try:
        values = frame[numeric].to_numpy(np.float64)
    except (TypeError, ValueError):  # text in a numeric column: find which, below
        values = frame[numeric].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = [c for c, ok in zip(numeric, np.isfinite(values).all(0)) if not ok]
    labels = frame[CLASS_FEATURE]
    if labels.isna().any():
        bad.append(CLASS_FEATURE)
    if bad:
        raise ValueError(f"{name}: non-numeric, missing or infinite values in columns {bad}")
    return values[:, :-1], values[:, -1], labels.astype(str)


def _check_settings(window_size: int, rate: float, null_samples: int, max_rows: int, comparison_rows: int) -> None:
    limits = {"window_size": (window_size, MIN_WINDOW, MAX_WINDOW),
              "null_samples": (null_samples, 1, MAX_NULL_SAMPLES),
              "max_reference_rows": (max_rows, 4 * MIN_WINDOW, MAX_REFERENCE_ROWS),
              "comparison_rows": (comparison_rows, MIN_WINDOW, MAX_COMPARISON_ROWS)}
    for name, (value, low, high) in limits.items():
        if not isinstance(value, int | np.integer) or not low <= value <= high:
            raise ValueError(f"{name}: {value!r}, must be an integer in [{low}, {high}]")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false_alarm_rate: {rate}, must be a probability in (0, 1)")
    if _allowed_exceedances(rate / len(STATISTICS), null_samples) < 0:
        need = math.ceil(len(STATISTICS) / rate) - 1
        raise ValueError(f"null_samples: {null_samples} cannot give a p-value as small as false_alarm_rate / "
                         f"{len(STATISTICS)} = {rate / len(STATISTICS):.3g}; need at least {need}")


def _allowed_exceedances(level: float, samples: int) -> int:
    """Most null values >= the statistic for p = (1 + count) / (1 + samples) <= level (-1: never)."""
    return math.floor(level * (samples + 1) * (1 + 1e-12)) - 1


def _threshold(null_sorted: np.ndarray, allowed: int) -> float:
    """The value a statistic must exceed to leave at most `allowed` null values at or above it."""
    return float(null_sorted[len(null_sorted) - 1 - allowed]) if allowed >= 0 else math.inf


def _class_codes(labels: pd.Series, classes: tuple[str, ...]) -> np.ndarray:
    """Index of each label in classes; len(classes) for a class the reference never predicted."""
    codes = pd.Index(classes).get_indexer(labels)
    codes[codes < 0] = len(classes)
    return codes


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of x and of y: the only step of O(len(x) x len(y)).
    scipy's cdist, not x @ y.T: BLAS threads make these small products 10-50x slower on a busy host."""
    return cdist(x, y, "sqeuclidean")


def _rbf(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    kernel = _sq_distances(x, y)
    kernel *= -1.0 / bandwidth
    return np.exp(kernel, out=kernel)


def _off_diagonal_mean(kernel: np.ndarray) -> float:
    n = len(kernel)
    return float((kernel.sum() - np.trace(kernel)) / (n * (n - 1)))
