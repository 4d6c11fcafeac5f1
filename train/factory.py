"""A model described and rebuilt from its description (the task builds it: train/tasks).

Both model classes share one surface (embed, infer, drift axes, normalisation, `backbone`), so training, serving
and the drift features use either.
"""

from __future__ import annotations

from typing import Union

from train.model import ImageClassifier
from train.segmodels import SegmentationModel
from train.tasks import task_named, task_of

Model = Union[ImageClassifier, SegmentationModel]


def describe(model: Model) -> dict:
    """The constructor arguments that rebuild the model (with its state dict)."""
    return {"task": task_of(model).name, "arch": model.arch, "classes": model.classes, "channels": model.channels,
            "image_size": model.image_size, "drift_dims": int(model.drift_axes.shape[1])}


def rebuild(spec: dict) -> Model:
    """An untrained model shaped as `describe` said (a spec without "task" is a classifier's)."""
    spec = dict(spec)
    return task_named(spec.pop("task", None)).new_model(**spec)
