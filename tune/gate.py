"""The champion/challenger gate: both models scored on the same gate set, one documented rule.

The task (train/tasks) scores each item and says what the scores are as evidence: a classifier is right or wrong
per image (train/evidence.py's paired tests); a segmentation model scores each image by its foreground IoU
against the true mask (train/score_evidence.py's tests of a continuous score). Either evidence decides itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from cluster.settings import GateSettings
from train.evidence import EvidenceRule, Paired, Verdict
from train.factory import Model
from train.score_evidence import Scored
from train.tasks import task_of
from train.transforms import to_tensor

Batches = Callable[[], Iterable[dict]]  # a fresh stream of {"image": uint8 NxHxWxC, "label": int (, "mask")} per call


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
    """Both scores and the decision, with the reason in words and every number behind it (`evidence`)."""

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
    outcome: str = "reject"          # promote | reject | not_enough_evidence
    evidence: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """The numbers for MLflow: both models' scores and the evidence's counts, p-values and bounds."""
        scores = {k: v for k, v in self.as_dict().items() if k.endswith(("_test", "_holdout")) and v is not None}
        numbers = {f"gate_{k}": float(v) for k, v in self.evidence.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("rule_")}
        return {**scores, **numbers}


def right_answers(model: Model, batches: Iterable[dict]) -> np.ndarray:
    """Whether the model got each item of the stream right (the task says from which score: train/tasks)."""
    return task_of(model).right(_paired([model], batches).champion)


def _paired(models: list[Model], batches: Iterable[dict]) -> Paired | Scored:
    """Each of two models' score on each item of the same stream (read once), as the task's evidence: right or
    wrong with the labels (Paired) for a classifier, per-image IoU (Scored) for a segmentation model."""
    task = task_of(models[0])
    scores, labels = [[], []], []
    for model in models:
        model.eval()
    with torch.no_grad():
        for batch in batches:
            if not len(batch["label"]):
                continue
            x = to_tensor(batch["image"])
            truth = torch.as_tensor(np.array(batch[task.target], dtype=np.int64))
            for i, model in enumerate(models):
                scores[i].append(task.score(model(x), truth).numpy())
            labels.append(np.asarray(batch["label"], dtype=np.int64))
    joined = [np.concatenate(r) if r else np.zeros(0) for r in scores[:len(models)]]
    return task.evidence(joined[0], joined[-1], np.concatenate(labels) if labels else np.zeros(0, np.int64))


def evidence_rule(rule: GateSettings) -> EvidenceRule:
    return EvidenceRule(alpha=rule.alpha, power=rule.power, margin=rule.margin, tolerance=rule.tolerance,
                        class_tolerance=rule.class_tolerance, min_holdout=rule.min_holdout)


def decide(test: Paired | Scored, holdout: Paired | Scored, rule: GateSettings, classes: list[str] | None = None
           ) -> Verdict:
    """The promotion rule (train/evidence.py; per-image IoU: train/score_evidence.py): a paired test of the
    gain on the feedback holdout, non-inferior on the base test split, no class losing more than
    `class_tolerance`; "not enough evidence" (no promotion: the next trigger retries with more labels) when the
    holdout cannot tell.

    With fewer than `min_holdout` feedback items (a scheduled or on-demand retrain before labels came), the
    base test split is the only labelled data: the challenger must then show its gain there, by the same test.
    """
    if len(holdout.champion) >= rule.min_holdout:
        return holdout.decide(test, evidence_rule(rule), classes)
    return test.decide(test, evidence_rule(rule), classes, gain_on="base test split")


def run_gate(champion: Model, champion_version: str, challenger: Model,
             challenger_version: str, gate_set: GateSet, rule: GateSettings) -> GateResult:
    """Score both models on the same gate set, item by item, and apply the promotion rule."""
    if champion.classes != challenger.classes:
        return GateResult(False, f"class lists differ: {champion.classes} vs {challenger.classes}",
                          champion_version, challenger_version, 0.0, 0.0, None, None, 0,
                          rule.margin, rule.tolerance)
    test = _paired([champion, challenger], gate_set.test())
    if not len(test.champion):
        raise ValueError("the gate's test split is empty")
    holdout = (_paired([champion, challenger], gate_set.holdout()) if gate_set.holdout_size
               else task_of(champion).evidence(np.zeros(0), np.zeros(0), np.zeros(0, np.int64)))
    verdict = decide(test, holdout, rule, champion.classes)
    champion_test, challenger_test = test.accuracies()
    champion_holdout, challenger_holdout = holdout.accuracies() or (None, None)
    return GateResult(verdict.promoted, verdict.reason, champion_version, challenger_version, champion_test,
                      challenger_test, champion_holdout, challenger_holdout, len(holdout.champion), rule.margin,
                      rule.tolerance, verdict.outcome, verdict.as_dict())
