"""Classification: one class per image, from a folder per class.

Truth: the class index ("label"); loss cross-entropy; score 1 right / 0 wrong; the gate's evidence is right or
wrong per item with the labels (exact McNemar, train/evidence.py). The answer is the top class with its
probability; feedback is the true label.
"""

from __future__ import annotations

import numpy as np
import torch

from train.evaluate import Evaluation, evaluate_batches
from train.evidence import Paired
from train.model import ImageClassifier, load_pretrained
from train.scan import Scan, scan_image_folder
from train.tasks.base import FeedbackError, Sent, Task


class Classification(Task):
    name = "classification"
    target = "label"
    columns = ()
    score_name = "accuracy"
    score_metric = "accuracy"
    eval_batch = 256
    outputs = ()
    learns_from_masks = False

    def scan(self, source: str) -> Scan:
        return scan_image_folder(source)

    def new_model(self, arch: str, classes: list[str], channels: int, image_size: int,
                  drift_dims: int = 8) -> ImageClassifier:
        return ImageClassifier(arch, classes, channels, image_size, drift_dims)

    def fill_pretrained(self, model: ImageClassifier, weights: str) -> str:
        return load_pretrained(model, weights)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, target)

    def score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == target).double()

    def augment(self, x, target, shift):
        return shift(x), target

    def evaluate(self, model: ImageClassifier, batches) -> Evaluation:
        return evaluate_batches(model, batches)

    def evidence(self, champion: np.ndarray, challenger: np.ndarray, labels: np.ndarray) -> Paired:
        return Paired(np.asarray(champion) > 0.5, np.asarray(challenger) > 0.5, np.asarray(labels, dtype=np.int64))

    def right(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > 0.5

    def answers(self, outputs, features, classes, version):
        probabilities = outputs["probabilities"].float().cpu().numpy()
        answers = []
        for probs, row in zip(probabilities, features):
            best = int(probs.argmax())
            answers.append({"label": classes[best], "confidence": float(probs[best]),
                            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs)},
                            "model_version": version, "features": row})
        return answers

    def truth(self, sent: Sent, prediction, blobs) -> tuple[str, None]:
        kind, value = sent
        if kind != "label":
            raise FeedbackError(422, "this server's model is a classifier: send label, not a mask")
        return str(value), None
