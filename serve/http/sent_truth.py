"""A feedback body as the truth it sends: ("label", str), ("png", bytes) or ("rle", dict) (train/tasks.Sent).

Which of them a model takes is its task's business (Task.truth); here only the body's shape is checked: exactly
one of label, mask_png_b64 and mask_rle, a PNG within the upload limit (413) and valid base64 (422).
"""

from __future__ import annotations

import base64
import binascii

from serve import schemas
from train.tasks import FeedbackError, Sent


def sent_truth(body: schemas.FeedbackIn, max_bytes: int) -> Sent:
    given = [name for name in ("label", "mask_png_b64", "mask_rle") if getattr(body, name) is not None]
    if len(given) != 1:
        raise FeedbackError(422, "send exactly one of label (classification), mask_png_b64 or mask_rle "
                                 f"(segmentation); got {', '.join(given) or 'none'}")
    if body.label is not None:
        return "label", body.label
    if body.mask_rle is not None:
        return "rle", body.mask_rle
    text = body.mask_png_b64.split(",", 1)[1] if body.mask_png_b64.startswith("data:") else body.mask_png_b64
    if len(text) > max_bytes * 4 // 3 + 4:
        raise FeedbackError(413, f"mask_png_b64 is larger than {max_bytes} bytes")
    try:
        return "png", base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FeedbackError(422, "mask_png_b64 is not valid base64") from None
