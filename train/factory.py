"""The model of a task: built fresh, filled with pretrained weights, described and rebuilt from the description.

Both model classes share one surface (embed, infer, drift axes, normalisation, `backbone`), so training, serving
and the drift features use either; this is where the task picks the class.
"""

from __future__ import annotations

from typing import Union

from train.model import ImageClassifier, load_pretrained
from train.segmodels import SegmentationModel, load_seg_pretrained

Model = Union[ImageClassifier, SegmentationModel]


def task_of(model: Model) -> str:
    """"classification" or "segmentation" (a model pickled before tasks existed is a classifier)."""
    return getattr(model, "task", "classification")


def new_model(task: str, arch: str, classes: list[str], channels: int, image_size: int, drift_dims: int = 8
              ) -> Model:
    """A freshly initialised model for `task`."""
    kind = SegmentationModel if task == "segmentation" else ImageClassifier
    return kind(arch, classes, channels, image_size, drift_dims)


def fill_pretrained(model: Model, weights: str) -> str:
    """Load local pretrained weights into the model's backbone (train.model / train.segmodels say which)."""
    if task_of(model) == "segmentation":
        return load_seg_pretrained(model, weights)
    return load_pretrained(model, weights)


def describe(model: Model) -> dict:
    """The constructor arguments that rebuild the model (with its state dict)."""
    return {"task": task_of(model), "arch": model.arch, "classes": model.classes, "channels": model.channels,
            "image_size": model.image_size, "drift_dims": int(model.drift_axes.shape[1])}


def rebuild(spec: dict) -> Model:
    """An untrained model shaped as `describe` said (a spec without "task" is a classifier's)."""
    spec = dict(spec)
    return new_model(spec.pop("task", "classification"), **spec)
