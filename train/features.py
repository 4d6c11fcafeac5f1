"""Drift features: what the model saw and said about each image, as a table for Evidently.

For a segmentation model (per-pixel probabilities) the image's "confidence" is the mean top probability
over the pixels it called foreground (over all pixels when none), and its "predicted_class" is the
foreground class covering most pixels, or the background when it found none; its "area" is the share of
its pixels predicted as any foreground class (a column segmentation tables alone have).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from store.schema import EMBEDDING_KEY
from train.factory import Model

AREA_COLUMN = "area"
CORRECT_COLUMN = "correct"  # the drift reference's: whether the model got the image right (1.0) or not (0.0)


def feature_columns(drift_dims: int) -> list[str]:
    """Column names of the drift feature table."""
    embedding = [EMBEDDING_KEY.format(i) for i in range(drift_dims)]
    return ["confidence", "predicted_class", "brightness", "contrast"] + embedding


def image_confidence(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, predicted class) per image from NxK class or NxKxHxW pixel probabilities."""
    if probabilities.ndim == 2:
        return probabilities.max(1)
    top, pixel_class = probabilities.float().max(1)
    foreground = (pixel_class > 0).flatten(1)
    counts = foreground.sum(1)
    on_foreground = (top.flatten(1) * foreground).sum(1) / counts.clamp_min(1)
    confidence = torch.where(counts > 0, on_foreground, top.flatten(1).mean(1))
    areas = torch.stack([(pixel_class == k).flatten(1).sum(1) for k in range(1, probabilities.shape[1])], 1)
    return confidence, torch.where(counts > 0, areas.argmax(1) + 1, torch.zeros_like(counts))


def feature_rows(outputs: dict[str, torch.Tensor], classes: list[str]) -> list[dict]:
    """One dict of drift features per image, from the model's infer outputs (or ones whose probabilities were
    already summarised by image_confidence into "confidence" and "predicted")."""
    if "probabilities" in outputs:
        confidence, predicted = image_confidence(outputs["probabilities"])
    else:
        confidence, predicted = outputs["confidence"], outputs["predicted"]
    embedding = outputs["embedding"].cpu().numpy().round(5)
    brightness = outputs["brightness"].cpu().numpy()
    contrast = outputs["contrast"].cpu().numpy()
    area = outputs["foreground"].cpu().numpy() if "foreground" in outputs else None
    rows = []
    for i, (conf, cls) in enumerate(zip(confidence.tolist(), predicted.tolist())):
        row = {"confidence": round(conf, 5), "predicted_class": classes[cls],
               "brightness": round(float(brightness[i]), 5), "contrast": round(float(contrast[i]), 5)}
        if area is not None:
            row[AREA_COLUMN] = round(float(area[i]), 5)
        row.update({EMBEDDING_KEY.format(j): float(v) for j, v in enumerate(embedding[i])})
        rows.append(row)
    return rows


def feature_frame(model: Model, images: torch.Tensor, batch_size: int = 256) -> pd.DataFrame:
    """Drift feature table for a batch of model-ready images."""
    model.eval()
    rows: list[dict] = []
    for start in range(0, len(images), batch_size):
        rows.extend(feature_rows(model.infer(images[start:start + batch_size]), model.classes))
    return feature_table(rows, model.drift_axes.shape[1])


def feature_table(rows: list[dict], drift_dims: int) -> pd.DataFrame:
    """feature_rows' dicts as the typed table Evidently compares."""
    extra = [AREA_COLUMN] if rows and AREA_COLUMN in rows[0] else []
    frame = pd.DataFrame(rows, columns=feature_columns(drift_dims) + extra)
    return frame.astype({c: np.float64 for c in frame.columns if c != "predicted_class"})
