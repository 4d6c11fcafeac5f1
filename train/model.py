"""The image classifier: raw [0,1] pixels in, logits out, drift features from the same pass."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def small_cnn(channels: int) -> tuple[nn.Module, int]:
    """A compact CNN for small gray images (MNIST-sized); returns (backbone, embedding size)."""

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    backbone = nn.Sequential(block(channels, 32), block(32, 64), block(64, 128),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return backbone, 128


def resnet18(channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 with a stem suited to small images; returns (backbone, embedding size)."""
    net = torchvision.models.resnet18(weights=None)
    if image_size <= 64:
        # The ImageNet stem (7x7 stride 2 + max-pool) throws away most of a small image.
        net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net, 512


def choose_arch(arch: str, channels: int, image_size: int) -> str:
    """`auto` picks the small CNN for small gray images and ResNet-18 otherwise."""
    if arch == "auto":
        return "cnn" if channels == 1 and image_size <= 32 else "resnet18"
    if arch not in {"cnn", "resnet18"}:
        raise ValueError(f"model.arch={arch!r}: expected auto, cnn or resnet18")
    return arch


class ImageClassifier(nn.Module):
    """Takes float32 NxCxHxW in [0, 1] (normalisation inside), returns logits."""

    def __init__(self, arch: str, classes: list[str], channels: int, image_size: int,
                 drift_dims: int = 8):
        super().__init__()
        self.arch = choose_arch(arch, channels, image_size)
        self.classes = list(classes)
        self.channels = channels
        self.image_size = image_size
        if self.arch == "cnn":
            self.backbone, width = small_cnn(channels)
        else:
            self.backbone, width = resnet18(channels, image_size)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(width, len(classes))
        self.register_buffer("pixel_mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("pixel_std", torch.full((1, channels, 1, 1), 0.25))
        # Principal axes of the validation embeddings: drift features come from them.
        self.register_buffer("drift_center", torch.zeros(width))
        self.register_buffer("drift_axes", torch.eye(width)[:, :drift_dims].clone())

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel pixel statistics of the training data."""
        self.pixel_mean.copy_(mean.reshape(1, -1, 1, 1))
        self.pixel_std.copy_(std.clamp_min(1e-3).reshape(1, -1, 1, 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding."""
        return self.backbone((x - self.pixel_mean) / self.pixel_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    @torch.no_grad()
    def fit_drift_axes(self, embeddings: torch.Tensor) -> None:
        """Principal components of reference embeddings, used to summarise any embedding."""
        center = embeddings.mean(0)
        _, _, v = torch.linalg.svd(embeddings - center, full_matrices=False)
        k = self.drift_axes.shape[1]
        self.drift_center.copy_(center)
        self.drift_axes.copy_(v[:k].T)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities plus drift features (embedding components, pixel stats) in one pass."""
        embedding = self.embed(x)
        probabilities = torch.softmax(self.head(embedding).float(), dim=1)
        gray = x.float().mean(1)
        return {
            "probabilities": probabilities,
            "embedding": (embedding.float() - self.drift_center) @ self.drift_axes,
            "brightness": gray.mean((1, 2)),
            "contrast": gray.std((1, 2)),
        }
