"""The champion/challenger gate: both models scored on the same gate set, one documented rule."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from cluster.settings import GateSettings
from train.model import ImageClassifier
from train.transforms import to_tensor

Batches = Callable[[], Iterable[dict]]  # a fresh stream of {"image": uint8 NxHxWxC, "label": int} per call


@dataclass
class GateSet:
    """The data both models are judged on: the base test split plus the feedback holdout, streamed."""

    test: Batches
    holdout: Batches
    holdout_size: int

    @classmethod
    def from_arrays(cls, test_images: np.ndarray, test_labels: np.ndarray, holdout_images: np.ndarray,
                    holdout_labels: np.ndarray) -> "GateSet":
        """Small gate sets held in memory (tests, drills)."""
        return cls(lambda: [{"image": test_images, "label": test_labels}],
                   lambda: [{"image": holdout_images, "label": holdout_labels}], len(holdout_labels))


@dataclass
class GateResult:
    """Both scores and the decision, with the reason in words."""

    passed: bool
    reason: str
    champion_version: str
    challenger_version: str
    champion_test: float
    challenger_test: float
    champion_holdout: float | None
    challenger_holdout: float | None
    holdout_size: int
    margin: float
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


def _accuracies(models: list[ImageClassifier], batches: Iterable[dict]) -> list[float | None]:
    """Each model's accuracy on the same stream, read once (both models see every batch)."""
    correct, count = [0] * len(models), 0
    for model in models:
        model.eval()
    with torch.no_grad():
        for batch in batches:
            if not len(batch["label"]):
                continue
            x = to_tensor(batch["image"])
            labels = torch.as_tensor(np.array(batch["label"], dtype=np.int64))
            for i, model in enumerate(models):
                correct[i] += int((model(x).argmax(1) == labels).sum())
            count += len(labels)
    return [c / count if count else None for c in correct]


def decide(champion_test: float, challenger_test: float, champion_holdout: float | None,
           challenger_holdout: float | None, holdout_size: int, rule: GateSettings) -> tuple[bool, str]:
    """Promotion rule: better on the feedback holdout by `margin`, not worse on test by more than `tolerance`.

    With fewer than `min_holdout` feedback items there is nothing trustworthy to be better on, so
    the challenger must instead beat the champion on the base test split by `margin`.
    """
    if challenger_test < champion_test - rule.tolerance:
        return False, (f"worse on the base test split: {challenger_test:.4f} < {champion_test:.4f} "
                       f"- tolerance {rule.tolerance}")
    if holdout_size >= rule.min_holdout and champion_holdout is not None:
        if challenger_holdout >= champion_holdout + rule.margin:
            return True, (f"better on the feedback holdout ({challenger_holdout:.4f} vs {champion_holdout:.4f}, "
                          f"margin {rule.margin}) and within tolerance on test ({challenger_test:.4f} vs "
                          f"{champion_test:.4f}, tolerance {rule.tolerance})")
        return False, (f"not better on the feedback holdout by the margin: {challenger_holdout:.4f} vs "
                       f"{champion_holdout:.4f} + {rule.margin}")
    if challenger_test >= champion_test + rule.margin:
        return True, (f"no usable feedback holdout ({holdout_size} < {rule.min_holdout}); better on test "
                      f"({challenger_test:.4f} vs {champion_test:.4f}, margin {rule.margin})")
    return False, (f"no usable feedback holdout ({holdout_size} < {rule.min_holdout}) and not better on test "
                   f"by the margin: {challenger_test:.4f} vs {champion_test:.4f} + {rule.margin}")


def run_gate(champion: ImageClassifier, champion_version: str, challenger: ImageClassifier,
             challenger_version: str, gate_set: GateSet, rule: GateSettings) -> GateResult:
    """Score both models on the same gate set and apply the promotion rule."""
    if champion.classes != challenger.classes:
        return GateResult(False, f"class lists differ: {champion.classes} vs {challenger.classes}",
                          champion_version, challenger_version, 0.0, 0.0, None, None, 0,
                          rule.margin, rule.tolerance)
    champion_test, challenger_test = _accuracies([champion, challenger], gate_set.test())
    if champion_test is None:
        raise ValueError("the gate's test split is empty")
    champion_holdout, challenger_holdout = (_accuracies([champion, challenger], gate_set.holdout())
                                            if gate_set.holdout_size else (None, None))
    scores = {"champion_test": champion_test, "challenger_test": challenger_test,
              "champion_holdout": champion_holdout, "challenger_holdout": challenger_holdout}
    size = gate_set.holdout_size
    passed, reason = decide(scores["champion_test"], scores["challenger_test"], scores["champion_holdout"],
                            scores["challenger_holdout"], size, rule)
    return GateResult(passed, reason, champion_version, challenger_version, holdout_size=size,
                      margin=rule.margin, tolerance=rule.tolerance, **scores)
