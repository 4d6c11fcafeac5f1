"""A small model for tests and benchmarks that need a real ImageClassifier quickly."""

from __future__ import annotations

import torch
from torch import nn

from train.model import ImageClassifier


def tiny_classifier(classes: list[str]) -> ImageClassifier:
    """The production ImageClassifier (infer, drift axes, features) on a tiny backbone.

    The production CNN takes over a minute to train on two shared cores; this one takes seconds
    and goes through the same inference and drift-feature code.
    """
    model = ImageClassifier("cnn", classes, channels=1, image_size=28, drift_dims=8)
    model.backbone = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.head = nn.Linear(64, len(classes))
    model.drift_center = torch.zeros(64)
    model.drift_axes = torch.eye(64)[:, :8].clone()
    return model
