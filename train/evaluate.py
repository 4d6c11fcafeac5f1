"""Evaluation: accuracy, per-class report and confusion matrix of a model on a split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.model import ImageClassifier
from train.transforms import to_tensor


@dataclass
class Evaluation:
    """How a model did on one labelled set."""

    accuracy: float
    loss: float
    count: int
    confusion: np.ndarray          # rows: true class, columns: predicted class
    per_class: dict[str, dict[str, float]]

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics for MLflow/DVC, e.g. test_accuracy, test_loss."""
        return {f"{prefix}_accuracy": self.accuracy, f"{prefix}_loss": self.loss}


@torch.no_grad()
def predict_logits(model: ImageClassifier, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Logits for uint8 NxHxWxC images."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [model(to_tensor(images[i:i + batch_size]).to(device)).float().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, len(model.classes))


def evaluate(model: ImageClassifier, images: np.ndarray, labels: np.ndarray) -> Evaluation:
    """Score a model on labelled uint8 images."""
    if len(images) == 0:
        raise ValueError("cannot evaluate on an empty set")
    logits = predict_logits(model, images)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    loss = float(torch.nn.functional.cross_entropy(logits, target))
    predicted = logits.argmax(1).numpy()
    k = len(model.classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (target.numpy(), predicted), 1)
    per_class = {}
    for i, name in enumerate(model.classes):
        tp = confusion[i, i]
        precision = tp / max(1, confusion[:, i].sum())
        recall = tp / max(1, confusion[i].sum())
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "support": int(confusion[i].sum())}
    accuracy = float((predicted == target.numpy()).mean())
    return Evaluation(accuracy, loss, len(labels), confusion, per_class)
