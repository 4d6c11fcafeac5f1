"""Evaluation: accuracy, per-class report and confusion matrix of a classifier on a split, and its record in
MLflow and DVC (matplotlib and mlflow are imported where they are used)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from train.model import ImageClassifier
from train.transforms import to_tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Evaluation:
    """How a model did on one labelled set."""

    accuracy: float
    loss: float
    count: int
    confusion: np.ndarray          # rows: true class, columns: predicted class
    per_class: dict[str, dict[str, float]]
    actual: np.ndarray             # class index per image, in the order scored
    predicted: np.ndarray

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics for MLflow/DVC, e.g. test_accuracy, test_loss."""
        return {f"{prefix}_accuracy": self.accuracy, f"{prefix}_loss": self.loss}

    def log_mlflow(self, prefix: str = "test") -> None:
        """Metrics, per-class F1, the per-class report and the confusion matrix into the active MLflow run."""
        import matplotlib.pyplot as plt
        import mlflow

        mlflow.log_metrics(self.metrics(prefix))
        for name, scores in self.per_class.items():
            mlflow.log_metric(f"{prefix}_f1_class_{name}"[:250], scores["f1"])
        mlflow.log_dict(self.per_class, "evaluation/per_class.json")
        mlflow.log_dict({"confusion": self.confusion.tolist()}, "evaluation/confusion.json")
        fig = confusion_figure(self.confusion, list(self.per_class))
        try:
            mlflow.log_figure(fig, "evaluation/confusion_matrix.png")
        finally:
            plt.close(fig)

    def report(self, classes: list[str]) -> tuple[dict[str, float], list[tuple[str, str]]]:
        """DVC's view: metrics beyond accuracy and loss (macro F1), and (actual, predicted) class per image."""
        macro_f1 = round(float(np.mean([c["f1"] for c in self.per_class.values()])), 4)
        return {"macro_f1": macro_f1}, [(classes[int(a)], classes[int(p)]) for a, p in zip(self.actual, self.predicted)]


def confusion_figure(confusion: np.ndarray, classes: list[str]) -> Figure:
    """Confusion matrix as a heat map with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for (i, j), count in np.ndenumerate(confusion):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > confusion.max() / 2 else "black")
    fig.tight_layout()
    return fig


def evaluate(model: ImageClassifier, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Score a model on labelled uint8 images held in memory (small sets)."""
    return evaluate_batches(model, [{"image": images[i:i + 256], "label": labels[i:i + 256]}
                                    for i in range(0, len(images), 256)])


def evaluate_batches(model: ImageClassifier, batches: Iterable[dict[str, np.ndarray]]) -> Evaluation:
    """Score a model on streamed batches {"image": uint8 NxHxWxC, "label": int}: one batch in memory at a time."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, actual, predicted = 0.0, [], []
    with torch.no_grad():
        for batch in batches:
            if len(batch["label"]) == 0:
                continue
            logits = model(to_tensor(batch["image"]).to(device)).float().cpu()
            target = torch.as_tensor(np.array(batch["label"], dtype=np.int64))
            loss_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            actual.append(target.numpy())
            predicted.append(logits.argmax(1).numpy())
    if not actual:
        raise ValueError("cannot evaluate on an empty set")
    actual_all, predicted_all = np.concatenate(actual), np.concatenate(predicted)
    k = len(model.classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (actual_all, predicted_all), 1)
    per_class = {}
    for i, name in enumerate(model.classes):
        tp = confusion[i, i]
        precision = tp / max(1, confusion[:, i].sum())
        recall = tp / max(1, confusion[i].sum())
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "support": int(confusion[i].sum())}
    accuracy = float((predicted_all == actual_all).mean())
    return Evaluation(accuracy, loss_sum / len(actual_all), len(actual_all), confusion, per_class,
                      actual_all, predicted_all)
