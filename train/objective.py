"""What a model learns from a batch and how a batch is scored, per task: the training loop's only task-specific part.

    classification   target "label" (class index per image); loss cross-entropy; score: right or wrong
    segmentation     target "mask" (class id per pixel); loss Dice + cross-entropy (BCE for one class);
                     score: the image's foreground IoU (1 where truth and prediction are both empty)

The loop reports the mean score as `val_accuracy` for either task, so Tune, early stopping and the gate compare
one number: for segmentation it is the mean foreground IoU per image (MLflow also gets it as `val_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.segmodels import dice_ce_loss


def foreground_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image: IoU of predicted and true foreground (any class but 0); 1 where both are empty."""
    predicted, truth = logits.argmax(1) > 0, target > 0
    inter = (predicted & truth).flatten(1).sum(1).double()
    union = (predicted | truth).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass(frozen=True)
class Objective:
    """One task's target column, loss, augmentation and score."""

    task: str
    target: str  # the batch column holding the truth

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """Column types for iter_torch_batches (every column needs one): pixels travel as uint8 to the device."""
        return {"image": torch.uint8, "label": torch.int64, self.target: torch.int64}

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            return dice_ce_loss(logits, target)
        return torch.nn.functional.cross_entropy(logits, target)

    def score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per item: 1/0 right or wrong (classification), foreground IoU (segmentation)."""
        if self.task == "segmentation":
            return foreground_iou(logits, target)
        return (logits.argmax(1) == target).double()

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(loss sum, score sum, items) of a batch, float64: summed over batches and workers, then divided."""
        n = len(target)
        return torch.tensor([float(self.loss(logits.float(), target)) * n, float(self.score(logits, target).sum()),
                             n], dtype=torch.float64)

    def augment(self, x: torch.Tensor, target: torch.Tensor, shift) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-preserving changes: random shifts (`shift(x)`) for a class; for masks, flips applied to the
        image and its mask alike (a shifted mask would have to move with its image)."""
        if self.task != "segmentation":
            return shift(x), target
        n = len(x)
        flip_w = torch.rand(n, device=x.device) < 0.5
        flip_h = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip_w[:, None, None, None], x.flip(3), x)
        x = torch.where(flip_h[:, None, None, None], x.flip(2), x)
        target = torch.where(flip_w[:, None, None], target.flip(2), target)
        target = torch.where(flip_h[:, None, None], target.flip(1), target)
        return x, target


def objective(task: str) -> Objective:
    """The objective of `task` ("classification" or "segmentation")."""
    if task == "segmentation":
        return Objective("segmentation", "mask")
    if task == "classification":
        return Objective("classification", "label")
    raise ValueError(f"task {task!r}: expected classification or segmentation")
