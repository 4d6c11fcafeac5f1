"""The task interface: every decision that depends on what a model is for, in one place.

rayloop knows two tasks, classification (train/tasks/classification.py) and segmentation
(train/tasks/segmentation.py). Code elsewhere never asks which one it has: it asks the task.

    data        scan (list a folder into manifest rows: classes, files, short sides, all gray), columns (manifest
                columns beyond path and label), mask_classes (class ids the decoder checks masks against)
    model       new_model, fill_pretrained (local weights into the backbone)
    objective   target (the batch column holding the truth), loss, score (per item, in [0, 1]), augment,
                sums, dtypes; score_name and score_metric say what the mean score is, eval_batch how
                many images a validation batch holds
    metrics     evaluate: an evaluation that logs itself to MLflow (`log_mlflow`) and reports to DVC (`report`)
    gate        evidence (two models' per-item scores on the same items, which decide themselves: Paired or
                Scored), right (which items count as right)
    serving     answers (the replica's answer per image), response_fields (what /v1/predict adds to it),
                outputs (OIP v2 outputs beyond probabilities and label), explain_refusal
    feedback    truth (a label or a corrected mask for a prediction, checked; a FeedbackError otherwise),
                learns_from_masks (which feedback a retrain reads)

Drift features need no task: both model classes share embed/infer and the drift axes (train/features.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable

import numpy as np
import torch

if TYPE_CHECKING:
    from store.blobs import BlobStore
    from train.scan import Scan

Sent = tuple[str, object]  # a piece of feedback as sent: ("label", str), ("png", bytes) or ("rle", dict)


class FeedbackError(ValueError):
    """Feedback that cannot be taken: the HTTP status (413, 422, 409) and the reason in words."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Task(ABC):
    """One task's answers to the questions above: a subclass sets the class attributes and implements every
    abstract method (it cannot be made otherwise); the others have the common answer."""

    name: ClassVar[str]
    target: ClassVar[str]                 # the batch column holding the truth
    columns: ClassVar[tuple[str, ...]]    # manifest columns beyond path and label
    score_name: ClassVar[str]             # what the mean of `score` is called in logs
    score_metric: ClassVar[str]           # ... and in MLflow beside val_accuracy: val_<score_metric>
    eval_batch: ClassVar[int]             # images per validation batch (a mask model's logits are per pixel)
    outputs: ClassVar[tuple[str, ...]]    # OIP v2 outputs beyond probabilities and label
    learns_from_masks: ClassVar[bool]     # a retrain reads corrected masks (else labels)

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # data
    @abstractmethod
    def scan(self, source: str) -> Scan:
        ...

    def mask_classes(self, classes: list[str]) -> int:
        """How many class ids a decoded mask may hold (0: the rows have no masks)."""
        return 0

    # model
    @abstractmethod
    def new_model(self, arch: str, classes: list[str], channels: int, image_size: int,
                  drift_dims: int = 8) -> torch.nn.Module:
        ...

    @abstractmethod
    def fill_pretrained(self, model: torch.nn.Module, weights: str) -> str:
        ...

    # objective
    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Column types for iter_torch_batches (every column needs one): pixels travel as uint8 to the device."""
        return {"image": torch.uint8, "label": torch.int64, self.target: torch.int64}

    @abstractmethod
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per item, float64 in [0, 1]: what the loop, Tune and the gate average."""
        ...

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(loss sum, score sum, items) of a batch, float64: summed over batches and workers, then divided."""
        n = len(target)
        return torch.tensor([float(self.loss(logits.float(), target)) * n, float(self.score(logits, target).sum()),
                             n], dtype=torch.float64)

    @abstractmethod
    def augment(self, x: torch.Tensor, target: torch.Tensor, shift: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Changes that keep the truth true (`shift(x)`: the loop's random shifts of the images alone)."""
        ...

    # metrics
    @abstractmethod
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict]):
        """How `model` did on streamed labelled batches; `.accuracy` is the mean score."""
        ...

    # gate
    @abstractmethod
    def evidence(self, champion: np.ndarray, challenger: np.ndarray, labels: np.ndarray):
        """Two models' per-item scores on the same items as the gate's evidence (it has `.decide`)."""
        ...

    @abstractmethod
    def right(self, scores: np.ndarray) -> np.ndarray:
        """Which items a model got right, from its scores (bool)."""
        ...

    # serving
    @abstractmethod
    def answers(self, outputs: dict[str, torch.Tensor], features: list[dict], classes: list[str],
                version: str) -> list[dict]:
        """The replica's answer per image from the model's `infer` outputs and each image's drift features."""
        ...

    def response_fields(self, answer: dict, image: bytes) -> dict:
        """What /v1/predict adds to label, confidence and probabilities for `answer` on the uploaded `image`."""
        return {}

    def explain_refusal(self, version: str) -> str | None:
        """Why a model of this task has no Grad-CAM explanation (None: it has one)."""
        return None

    # feedback
    @abstractmethod
    def truth(self, sent: Sent, prediction, blobs: BlobStore) -> tuple[str, dict | None]:
        """(label, stored mask or None) for a prediction's feedback; FeedbackError when it does not fit."""
        ...
