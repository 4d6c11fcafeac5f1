"""A corrected mask sent as feedback: decoded, checked against the prediction's image, kept as run-length JSON.

Every refusal is a MaskFeedbackError with the status and the reason in words: 422 for a mask that is not
usable (not a PNG, wrong size, class ids the model does not have, bad run-length counts), 409 when the
prediction's image is no longer kept (erased, or pruned by retention) so no size can be checked.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from serve import schemas
from serve.segment import image_size
from store import Store
from train.masks import MaskError, decode_rle, mask_to_json, parse_mask, validate_mask


class MaskFeedbackError(ValueError):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def sent_mask(body: schemas.FeedbackIn, max_bytes: int) -> tuple[str, object] | None:
    """("png", bytes) or ("rle", dict) from the body; None when it carries a label instead. Exactly one of
    label, mask_png_b64 and mask_rle must be given."""
    given = [name for name in ("label", "mask_png_b64", "mask_rle") if getattr(body, name) is not None]
    if len(given) != 1:
        raise MaskFeedbackError(422, "send exactly one of label (classification), mask_png_b64 or mask_rle "
                                     f"(segmentation); got {', '.join(given) or 'none'}")
    if body.mask_rle is not None:
        return "rle", body.mask_rle
    if body.mask_png_b64 is None:
        return None
    text = body.mask_png_b64.split(",", 1)[1] if body.mask_png_b64.startswith("data:") else body.mask_png_b64
    if len(text) > max_bytes * 4 // 3 + 4:
        raise MaskFeedbackError(413, f"mask_png_b64 is larger than {max_bytes} bytes")
    try:
        return "png", base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MaskFeedbackError(422, "mask_png_b64 is not valid base64") from None


def checked_mask(store: Store, prediction, sent: tuple[str, object]) -> tuple[np.ndarray, dict]:
    """The mask as class ids, validated against the prediction's image size and classes, and its stored JSON."""
    if not prediction.blob_key:
        raise MaskFeedbackError(409, f"prediction {prediction.id}'s image is no longer kept (erased or pruned): "
                                     "a mask cannot be checked against it")
    try:
        size = image_size(store.blobs.get(prediction.blob_key))
    except FileNotFoundError:
        raise MaskFeedbackError(409, f"prediction {prediction.id}'s image is no longer kept") from None
    classes = len(prediction.probabilities)
    kind, value = sent
    try:
        mask = parse_mask(value, size, classes) if kind == "png" else validate_mask(decode_rle(value), size, classes)
    except MaskError as exc:
        raise MaskFeedbackError(422, str(exc)) from None
    return mask, mask_to_json(mask)


def mask_label(mask: np.ndarray, classes: list[str]) -> str:
    """The feedback row's label for a mask: the foreground class covering most pixels, else the background."""
    counts = np.bincount(mask.ravel(), minlength=len(classes))
    return classes[int(counts[1:].argmax()) + 1] if counts[1:].any() else classes[0]
