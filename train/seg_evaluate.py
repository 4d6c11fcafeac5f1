"""Segmentation evaluation: how a mask model did on a split, and the figure and MLflow record of it.

The mirror of `train.evaluate` for models that return one logit per class and pixel (N x K x H x W,
class 0 the background). The scores come from `train.mask_metrics.MaskScores`; this module only streams
batches through the model, keeps a few examples to look at, and logs the result to the active MLflow run.
torch, matplotlib and mlflow are imported where they are used: `overlay` is numpy only, for serving too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from train.mask_metrics import MaskScores, class_iou

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

Example = tuple[np.ndarray, np.ndarray, np.ndarray]  # image uint8 HxWxC, true mask HxW, predicted mask HxW


@dataclass
class MaskEvaluation:
    """How a segmentation model did on one labelled set of images and masks."""

    loss: float                      # plain cross-entropy (no Dice term) averaged over every pixel scored
    count: int                       # images scored
    scores: dict[str, float]         # MaskScores.summary(): miou, iou, dice, pixel_accuracy, area/length error
    per_image_iou: np.ndarray        # foreground IoU per image, in the order scored: what a paired gate compares
    per_class_iou: dict[str, float]  # class name -> IoU over all pixels pooled; NaN for a class seen nowhere
    confusion: np.ndarray            # K x K pixel counts: rows true class, columns predicted class
    examples: list[Example]          # the first images scored, for a figure
    true_pixels: np.ndarray          # foreground pixels per image in the truth, in the order scored
    predicted_pixels: np.ndarray     # ... and in the prediction ("is there a crack?" per image)

    @property
    def accuracy(self) -> float:
        """The one headline score a gate or Tune compares: foreground (crack) IoU averaged over images."""
        return self.scores["iou"]

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics for MLflow/DVC, e.g. test_miou, test_iou, ..., test_loss."""
        return {**{f"{prefix}_{name}": float(value) for name, value in self.scores.items()},
                f"{prefix}_loss": self.loss}

    def log_mlflow(self, prefix: str = "test") -> None:
        log_mask_evaluation(self, prefix)

    def report(self, classes: list[str]) -> tuple[dict[str, float], list[tuple[str, str]]]:
        """DVC's view: every mask metric, and per image the question "is there a crack?" (foreground in the
        truth vs in the prediction), as (actual, predicted) with the background and the foreground classes."""
        names = [classes[0], "+".join(classes[1:])]
        pairs = [(names[int(a)], names[int(p)]) for a, p in zip(self.true_pixels > 0, self.predicted_pixels > 0)]
        return {k: round(v, 4) for k, v in self.metrics("test").items()}, pairs


def evaluate_masks(model: nn.Module, batches: Iterable[dict[str, np.ndarray]],
                   keep_examples: int = 4) -> MaskEvaluation:
    """Score a mask model on streamed batches {"image": uint8 NxHxWxC, "mask": uint8 NxHxW class ids}.

    One batch is in memory at a time. Masks must already have the logits' size (the data path resizes
    them); any other size is a ValueError rather than a silent resize that would change the scores.
    """
    import torch  # here, not at the top: `overlay` serves without torch

    from train.transforms import to_tensor

    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # a parameter-free model runs on the CPU
    scores = MaskScores(num_classes=len(model.classes))
    loss_sum, pixels, examples, true_pixels, predicted_pixels = 0.0, 0, [], [], []
    with torch.no_grad():
        for batch in batches:
            images, masks = np.asarray(batch["image"]), np.asarray(batch["mask"])
            if len(images) == 0:
                continue
            logits = model(to_tensor(images).to(device)).float().cpu()
            expected = (logits.shape[0], *logits.shape[2:])
            if masks.shape != expected:
                raise ValueError(f"masks have shape {masks.shape} but the model predicts {expected}: "
                                 "resize masks to the model's output before evaluating")
            target = torch.from_numpy(masks.astype(np.int64))
            loss_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            pixels += target.numel()
            predicted = logits.argmax(1).numpy()
            scores.update(predicted, masks)
            true_pixels.append(np.count_nonzero(masks.reshape(len(masks), -1), axis=1))
            predicted_pixels.append(np.count_nonzero(predicted.reshape(len(predicted), -1), axis=1))
            for i in range(min(len(images), keep_examples - len(examples))):
                examples.append((images[i].copy(), masks[i].copy(), predicted[i].astype(masks.dtype)))
    if scores.matrix is None:
        raise ValueError("cannot evaluate on an empty set")
    per_class = dict(zip(model.classes, (float(v) for v in class_iou(scores.matrix))))
    return MaskEvaluation(loss=loss_sum / pixels, count=len(scores.per_image_iou), scores=scores.summary(),
                          per_image_iou=np.array(scores.per_image_iou), per_class_iou=per_class,
                          confusion=scores.matrix, examples=examples, true_pixels=np.concatenate(true_pixels),
                          predicted_pixels=np.concatenate(predicted_pixels))


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 0, 0),
            alpha: float = 0.5) -> np.ndarray:
    """uint8 HxWx3 copy of an image (HxWx3, HxWx1 or HxW) with the mask's non-zero pixels tinted."""
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image has shape {image.shape}; expected HxW, HxWx1 or HxWx3")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {image.shape[:2]} differ in size")
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image.copy()
    tinted = (1 - alpha) * rgb[mask != 0] + alpha * np.asarray(colour, dtype=np.float64)
    rgb[mask != 0] = np.clip(np.rint(tinted), 0, 255).astype(np.uint8)
    return rgb


def examples_figure(evaluation: MaskEvaluation) -> Figure:
    """One row per kept example: the image, the true mask over it, the predicted mask over it with its IoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(evaluation.examples)
    if not rows:
        return plt.figure(figsize=(3, 1))  # kept no examples: an empty figure, not an error
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for row, (image, truth, predicted) in enumerate(evaluation.examples):
        score = evaluation.per_image_iou[row]
        panels = [(overlay(image, np.zeros_like(truth)), "image"),
                  (overlay(image, truth, colour=(0, 200, 0)), "true mask"),
                  (overlay(image, predicted), f"predicted, IoU {score:.3f}")]
        for ax, (picture, title) in zip(axes[row], panels):
            ax.imshow(picture)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return fig


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value  # NaN is not JSON: a class seen nowhere has no IoU


def log_mask_evaluation(evaluation: MaskEvaluation, prefix: str = "test") -> None:
    """Metrics, per-class IoU, confusion matrix and the examples figure, into the active MLflow run."""
    import mlflow

    mlflow.log_metrics(evaluation.metrics(prefix))
    mlflow.log_dict({name: _json_number(v) for name, v in evaluation.per_class_iou.items()},
                    "evaluation/per_class_iou.json")
    mlflow.log_dict({"classes": list(evaluation.per_class_iou), "confusion": evaluation.confusion.tolist()},
                    "evaluation/confusion.json")
    fig = examples_figure(evaluation)
    try:
        mlflow.log_figure(fig, "evaluation/examples.png")
    finally:
        import matplotlib.pyplot as plt  # after examples_figure chose the Agg backend

        plt.close(fig)
