"""How good a predicted mask is, and what it says about the surface: IoU, Dice, pixel accuracy, mean IoU over
classes, crack area and crack length. numpy only.

Every function takes a batch: uint8 class-id arrays of shape NxHxW (an HxW mask is a batch of one), and
returns one value per image, except `mean_iou`, which pools the batch. Binary scores treat every non-zero
class as the crack. Where prediction and truth are both empty an image scores 1 (nothing to find, nothing
found). `MaskScores` accumulates batches into the figures a run reports and the per-image IoU a paired gate
needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DIAGONAL = math.sqrt(2)


def _batch(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2:
        return masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks have shape {masks.shape}; expected NxHxW or HxW class ids")
    return masks


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _batch(pred), _batch(target)
    if pred.shape != target.shape:
        raise ValueError(f"predicted masks {pred.shape} and true masks {target.shape} differ in shape")
    return pred, target


def iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per image: crack pixels in both / crack pixels in either (1 where both are empty)."""
    pred, target = _pair(pred, target)
    p, t = pred != 0, target != 0
    inter, union = (p & t).sum(axis=(1, 2)), (p | t).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def dice(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per image: 2 |P and T| / (|P| + |T|) over crack pixels (1 where both are empty)."""
    pred, target = _pair(pred, target)
    p, t = pred != 0, target != 0
    inter, total = (p & t).sum(axis=(1, 2)), p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def pixel_accuracy(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per image: the share of pixels whose class is right (every class, background included)."""
    pred, target = _pair(pred, target)
    return (pred == target).mean(axis=(1, 2))


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """num_classes x num_classes pixel counts over the batch: row = true class, column = predicted class."""
    pred, target = _pair(pred, target)
    if max(int(pred.max(initial=0)), int(target.max(initial=0))) >= num_classes:
        raise ValueError(f"masks hold class ids beyond the {num_classes} classes")
    codes = target.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(codes, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """IoU per class from a confusion matrix; NaN for a class in neither truth nor prediction."""
    inter = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int = 2) -> float:
    """IoU of each class over the whole batch, averaged over the classes present (background included)."""
    per_class = class_iou(confusion(pred, target, num_classes))
    return float(np.nanmean(per_class)) if not np.isnan(per_class).all() else 1.0


def crack_area(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (crack pixels, crack share of the image in %)."""
    masks = _batch(masks)
    pixels = (masks != 0).sum(axis=(1, 2))
    return pixels, 100.0 * pixels / max(1, masks.shape[1] * masks.shape[2])


def _neighbours(image: np.ndarray) -> list[np.ndarray]:
    """The 8 neighbours of every pixel of a padded NxHxW image, clockwise from north: P2..P9 of Zhang-Suen."""
    n, h, w = image.shape
    inner = (slice(None), slice(1, h - 1), slice(1, w - 1))
    offsets = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]
    return [image[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy, dx in offsets] + [image[inner]]


def skeleton(masks: np.ndarray) -> np.ndarray:
    """One-pixel-wide centre lines of the crack pixels (Zhang-Suen thinning), bool NxHxW.

    A blob of 2x2 pixels or less thins away entirely (a known trait of the method): it has no length.
    """
    image = np.pad(_batch(masks) != 0, ((0, 0), (1, 1), (1, 1)))
    while True:
        changed = False
        for step in (0, 1):
            *ring, centre = _neighbours(image)
            p2, _, p4, _, p6, _, p8, _ = ring
            count = sum(r.astype(np.uint8) for r in ring)
            transitions = sum((~ring[i] & ring[(i + 1) % 8]).astype(np.uint8) for i in range(8))
            if step == 0:
                side = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:
                side = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            remove = centre & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if remove.any():
                image[:, 1:-1, 1:-1] &= ~remove
                changed = True
        if not changed:
            return image[:, 1:-1, 1:-1]


def crack_length(masks: np.ndarray) -> np.ndarray:
    """Per image: the length of the cracks' centre lines in pixels.

    Along the skeleton, a step to a side neighbour counts 1 and a diagonal step sqrt(2) (unless the two
    pixels also touch through a side neighbour, whose steps are counted already); each end adds half a
    pixel and a lone pixel counts 1, so a straight line of n pixels is n long.
    """
    lines = np.pad(skeleton(masks), ((0, 0), (1, 1), (1, 1)))
    core = lines[:, 1:-1, 1:-1]
    east, south = lines[:, 1:-1, 2:], lines[:, 2:, 1:-1]
    south_east, south_west = lines[:, 2:, 2:], lines[:, 2:, :-2]
    west = lines[:, 1:-1, :-2]
    sides = (core & east).sum(axis=(1, 2)) + (core & south).sum(axis=(1, 2))
    diagonals = ((core & south_east & ~east & ~south).sum(axis=(1, 2))
                 + (core & south_west & ~west & ~south).sum(axis=(1, 2)))
    degree = sum(d.astype(np.uint8) for d in _neighbours(lines)[:8])
    ends = (core & (degree == 1)).sum(axis=(1, 2))
    alone = (core & (degree == 0)).sum(axis=(1, 2))
    return sides + DIAGONAL * diagonals + 0.5 * ends + alone


@dataclass
class MaskScores:
    """Scores accumulated over batches of (predicted, true) masks: what a segmentation run reports."""

    num_classes: int = 2
    matrix: np.ndarray | None = None
    per_image_iou: list[float] = field(default_factory=list)
    per_image_dice: list[float] = field(default_factory=list)
    area_errors: list[float] = field(default_factory=list)  # |predicted - true| crack share, % points
    length_errors: list[float] = field(default_factory=list)  # |predicted - true| crack length, pixels

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        pred, target = _pair(pred, target)
        matrix = confusion(pred, target, self.num_classes)
        self.matrix = matrix if self.matrix is None else self.matrix + matrix
        self.per_image_iou += iou(pred, target).tolist()
        self.per_image_dice += dice(pred, target).tolist()
        self.area_errors += np.abs(crack_area(pred)[1] - crack_area(target)[1]).tolist()
        self.length_errors += np.abs(crack_length(pred) - crack_length(target)).tolist()

    def summary(self) -> dict[str, float]:
        """mIoU (classes pooled over all pixels), and means over images of crack IoU, Dice, area and length
        error; pixel accuracy over all pixels."""
        if self.matrix is None:
            raise ValueError("no masks were scored")
        per_class = class_iou(self.matrix)
        return {"miou": float(np.nanmean(per_class)) if not np.isnan(per_class).all() else 1.0,
                "iou": float(np.mean(self.per_image_iou)),
                "dice": float(np.mean(self.per_image_dice)),
                "pixel_accuracy": float(np.trace(self.matrix) / max(1, self.matrix.sum())),
                "area_error_pct": float(np.mean(self.area_errors)),
                "length_error_px": float(np.mean(self.length_errors))}
