"""Accuracy before labels: the serving model's accuracy on a window, estimated from its confidence.

Confidence-based performance estimation (CBPE, as NannyML does it), small enough to keep here rather than
pin NannyML beside Evidently:
1. fit: on held-out images with labels (the drift reference's validation and test images), how often the
   model is right at each confidence, by isotonic regression (pool adjacent violators): the chance of a
   right answer never falls as the confidence rises, and needs no bins. Kept as the blocks' end points, so
   a few hundred numbers at most, versioned with the model.
2. estimate: a window's expected accuracy is the mean chance over its predictions; its interval is that
   mean's own spread (each prediction right with its chance, independently), the fit's error not counted.

It is right as long as the chance of a right answer at a given confidence stays what it was on the
held-out images: under shifts that make the model less sure (noise, blur, low contrast) the estimate
falls with the accuracy. It cannot see a shift that leaves the model confidently wrong (a rotated digit
read as another with high confidence): then it stays high while the accuracy falls, and only labels or
the drift tests say so. bench/loop.py sets it beside the true accuracy on each shift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
CORRECT, CONFIDENCE = "correct", "confidence"  # the drift reference's columns (train.features.CORRECT_COLUMN)
MIN_ROWS = 50  # held-out predictions with labels below which no estimate is fitted
Z_90 = 1.6448536269514722  # two-sided 90% normal interval


@dataclass(frozen=True)
class Estimate:
    """A window's estimated accuracy and its 90% interval."""

    accuracy: float
    low: float
    high: float
    predictions: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "low": self.low, "high": self.high, "predictions": self.predictions}


@dataclass(frozen=True, eq=False)
class AccuracyEstimator:
    """Chance of a right answer as a non-decreasing step function of the confidence (see the module doc)."""

    confidences: np.ndarray  # increasing
    chances: np.ndarray  # non-decreasing, in [0, 1], the chance at each confidence (linear in between)
    rows: int  # held-out predictions fitted on
    accuracy: float  # their accuracy

    @classmethod
    def fit(cls, confidence, correct) -> AccuracyEstimator:
        """Fit on held-out predictions: their confidences and whether each was right (bool or 0/1)."""
        x = np.asarray(confidence, dtype=np.float64).ravel()
        y = np.asarray(correct).ravel()
        if x.shape != y.shape:
            raise ValueError(f"confidence and correct: {x.size} and {y.size} values, need one each per prediction")
        if x.size < MIN_ROWS:
            raise ValueError(f"{x.size} held-out predictions with labels, need at least {MIN_ROWS} to estimate "
                             "accuracy from confidence")
        if not np.isfinite(x).all() or ((x < 0) | (x > 1)).any():
            raise ValueError("confidence: every value must be a probability in [0, 1]")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("correct: every value must be 0/1 or a bool")
        y = y.astype(np.float64)
        unique, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=y) / counts
        blocks = _pool_adjacent_violators(means, counts.astype(np.float64))
        confidences, chances = [], []
        for first, last, value in blocks:  # a block's two ends keep its flat step; linear between blocks
            confidences.extend([unique[first], unique[last]] if last > first else [unique[first]])
            chances.extend([value, value] if last > first else [value])
        return cls(confidences=np.asarray(confidences), chances=np.clip(chances, 0.0, 1.0), rows=int(x.size),
                   accuracy=float(y.mean()))

    def chance(self, confidence) -> np.ndarray:
        """The chance of a right answer at each confidence (clamped to the fitted range's ends)."""
        return np.interp(np.asarray(confidence, dtype=np.float64), self.confidences, self.chances)

    def estimate(self, confidence) -> Estimate:
        """The expected accuracy of a window of predictions with these confidences."""
        x = np.asarray(confidence, dtype=np.float64).ravel()
        if x.size == 0:
            raise ValueError("no predictions to estimate accuracy on")
        if not np.isfinite(x).all():
            raise ValueError("confidence: missing or infinite values")
        p = self.chance(x)
        mean = float(p.mean())
        spread = Z_90 * math.sqrt(float((p * (1 - p)).sum())) / x.size
        return Estimate(accuracy=mean, low=max(0.0, mean - spread), high=min(1.0, mean + spread),
                        predictions=int(x.size))

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "confidences": self.confidences.tolist(),
                "chances": self.chances.tolist(), "rows": self.rows, "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, data: dict) -> AccuracyEstimator:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"accuracy estimator: format_version {data.get('format_version')!r}, this code "
                             f"reads {FORMAT_VERSION}")
        return cls(confidences=np.asarray(data["confidences"], dtype=np.float64),
                   chances=np.asarray(data["chances"], dtype=np.float64), rows=int(data["rows"]),
                   accuracy=float(data["accuracy"]))


def _pool_adjacent_violators(values: np.ndarray, weights: np.ndarray) -> list[tuple[int, int, float]]:
    """Isotonic (non-decreasing) least-squares fit of weighted values: (first, last index, value) per block."""
    blocks: list[list[float]] = []  # [first, last, weighted mean, weight]
    for i, (value, weight) in enumerate(zip(values, weights)):
        blocks.append([i, i, float(value), float(weight)])
        while len(blocks) > 1 and blocks[-2][2] > blocks[-1][2]:
            last = blocks.pop()
            merged = blocks[-1]
            total = merged[3] + last[3]
            merged[2] = (merged[2] * merged[3] + last[2] * last[3]) / total
            merged[1], merged[3] = last[1], total
    return [(int(first), int(last), value) for first, last, value, _ in blocks]


def from_reference(reference) -> AccuracyEstimator | str:
    """The estimator fitted on a drift reference's confidences and right answers, or why there is none."""
    if CORRECT not in getattr(reference, "columns", ()):
        return ("the drift reference has no right answers (a model registered before rayloop kept them): "
                "the next promoted model's has")
    try:
        return AccuracyEstimator.fit(reference[CONFIDENCE].to_numpy(), reference[CORRECT].to_numpy())
    except ValueError as exc:
        return f"no accuracy estimate: {exc}"
