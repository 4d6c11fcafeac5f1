"""Segmentation: a class per pixel, from images/ + masks/ paired by name (train/layout.py).

Truth: the class-id mask ("mask"); loss Dice + cross-entropy; score the image's foreground IoU (1 where truth and
prediction are both empty); the gate's evidence is per-image IoU (signed-rank test and bootstrap,
train/score_evidence.py), an image counting as right from IoU 0.5. The answer carries the mask (class ids at the
model's size; /v1/predict sends it as a PNG at the image's size with its area); feedback is a corrected mask.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image

from train.masks import MaskError, decode_rle, encode_mask_png, mask_to_json, parse_mask, validate_mask
from train.scan import Scan, scan_segmentation_folder
from train.score_evidence import Scored
from train.seg_evaluate import MaskEvaluation, evaluate_masks
from train.segmodels import SegmentationModel, dice_ce_loss, load_seg_pretrained
from train.tasks.base import FeedbackError, Sent, Task

RIGHT_IOU = 0.5  # an image counts as right (the search plan's "how often is the champion right") from here


def foreground_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image: IoU of predicted and true foreground (any class but 0); 1 where both are empty."""
    predicted, truth = logits.argmax(1) > 0, target > 0
    inter = (predicted & truth).flatten(1).sum(1).double()
    union = (predicted | truth).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header (the replica has already checked and decoded the upload)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def full_size(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class ids HxW scaled to size (width, height) with nearest neighbours (a class id is never blended)."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize(size, Image.NEAREST))


def mask_fields(mask: np.ndarray, data: bytes) -> dict:
    """mask_png_b64 (0/255 for one class, the class ids otherwise), area_pixels and area_percent (foreground:
    every class but 0), width and height, at the uploaded image's own size."""
    width, height = image_size(data)
    scaled = full_size(mask, (width, height))
    area = int(np.count_nonzero(scaled))
    return {"mask_png_b64": base64.b64encode(encode_mask_png(scaled)).decode("ascii"), "area_pixels": area,
            "area_percent": round(100.0 * area / max(1, width * height), 4), "width": width, "height": height}


def mask_label(mask: np.ndarray, classes: list[str]) -> str:
    """The feedback row's label for a mask: the foreground class covering most pixels, else the background."""
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    return classes[int(counts[1:].argmax()) + 1] if counts[1:].any() else classes[0]


class Segmentation(Task):
    name = "segmentation"
    target = "mask"
    columns = ("mask",)
    score_name = "mean foreground IoU"
    score_metric = "iou"
    eval_batch = 64
    outputs = ("mask",)
    learns_from_masks = True

    def scan(self, source: str) -> Scan:
        return scan_segmentation_folder(source)

    def mask_classes(self, classes: list[str]) -> int:
        return len(classes)

    def new_model(self, arch: str, classes: list[str], channels: int, image_size: int,
                  drift_dims: int = 8) -> SegmentationModel:
        return SegmentationModel(arch, classes, channels, image_size, drift_dims)

    def fill_pretrained(self, model: SegmentationModel, weights: str) -> str:
        return load_seg_pretrained(model, weights)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, target)

    def score(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return foreground_iou(logits, target)

    def augment(self, x, target, shift):
        """Flips applied to the image and its mask alike (a shifted mask would have to move with its image)."""
        n = len(x)
        flip_w = torch.rand(n, device=x.device) < 0.5
        flip_h = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip_w[:, None, None, None], x.flip(3), x)
        x = torch.where(flip_h[:, None, None, None], x.flip(2), x)
        target = torch.where(flip_w[:, None, None], target.flip(2), target)
        target = torch.where(flip_h[:, None, None], target.flip(1), target)
        return x, target

    def evaluate(self, model: SegmentationModel, batches) -> MaskEvaluation:
        return evaluate_masks(model, batches)

    def evidence(self, champion: np.ndarray, challenger: np.ndarray, labels: np.ndarray) -> Scored:
        return Scored(champion, challenger)

    def right(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= RIGHT_IOU

    def answers(self, outputs, features, classes, version):
        """Per image: its class-id mask at the model's size ("mask"), the foreground class covering most pixels
        as "label" (the background when none), the mean top probability over the predicted foreground as
        "confidence", and the share of pixels given to each class as "probabilities"."""
        masks = outputs["probabilities"].argmax(1).to(torch.uint8).cpu().numpy()
        answers = []
        for mask, row in zip(masks, features):
            shares = np.bincount(mask.ravel(), minlength=len(classes)) / max(1, mask.size)
            answers.append({"label": row["predicted_class"], "confidence": float(row["confidence"]),
                            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, shares)},
                            "model_version": version, "features": row, "mask": mask})
        return answers

    def response_fields(self, answer: dict, image: bytes) -> dict:
        return mask_fields(answer["mask"], image)

    def explain_refusal(self, version: str) -> str | None:
        return (f"model v{version} segments: its mask (POST /v1/predict, mask_png_b64) shows where it found "
                "each class; Grad-CAM explanations are for classifiers")

    def truth(self, sent: Sent, prediction, blobs) -> tuple[str, dict]:
        """The corrected mask, checked against the prediction's image size and classes: 422 for a mask that is
        not usable, 409 when the image is no longer kept (erased, or pruned by retention)."""
        kind, value = sent
        if kind == "label":
            raise FeedbackError(422, "this server's model is a segmentation model: send the corrected mask as "
                                     "mask_png_b64 or mask_rle, not a label")
        if not prediction.blob_key:
            raise FeedbackError(409, f"prediction {prediction.id}'s image is no longer kept (erased or pruned): "
                                     "a mask cannot be checked against it")
        try:
            size = image_size(blobs.get(prediction.blob_key))
        except FileNotFoundError:
            raise FeedbackError(409, f"prediction {prediction.id}'s image is no longer kept") from None
        classes = list(prediction.probabilities)
        try:
            mask = (parse_mask(value, size, len(classes)) if kind == "png"
                    else validate_mask(decode_rle(value), size, len(classes)))
        except MaskError as exc:
            raise FeedbackError(422, str(exc)) from None
        return mask_label(mask, classes), mask_to_json(mask)
