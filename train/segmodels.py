"""Segmentation models: raw [0,1] pixels in, per-pixel logits out, drift features from the same pass.

They mirror `train.model.ImageClassifier` (normalisation buffers, `embed`, `infer`, `fit_drift_axes`,
`.backbone` for `parameter_groups`), so training, serving and drift code take either. Architectures
(SEG_ARCHS): a compact U-Net for small data sets, or torchvision's LR-ASPP / DeepLabV3 built without
weights. `load_seg_pretrained` fills a torchvision encoder from local weights (never downloads);
`dice_ce_loss` is the training loss.

Sizes: the U-Net pads its input (reflect) to a multiple of 16 and crops the logits back; the torchvision
models upsample their coarse logits bilinearly to the input size, as torchvision's own `forward` does.
Either way the logits have the input's height and width, for any input of at least 16 px.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.model import (
    _conv_like,
    _read_state_dict,
    _tv_models,
    _weights_file,
    fill_backbone,
)

SEG_ARCHS = ("unet", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50")
# The torchvision classifier each encoder comes from: its ImageNet weights fit the encoder.
ENCODER_ARCH = {"lraspp_mobilenet_v3_large": "mobilenet_v3_large",
                "deeplabv3_mobilenet_v3_large": "mobilenet_v3_large",
                "deeplabv3_resnet50": "resnet50"}
UNET_WIDTHS = (16, 32, 64, 128)
UNET_BOTTLENECK = 256
UNET_MULTIPLE = 2 ** len(UNET_WIDTHS)  # one halving per encoder level


def choose_seg_arch(arch: str) -> str:
    """`auto` picks the U-Net (small data sets train it from scratch); other names are checked."""
    if arch == "auto":
        return "unet"
    if arch not in SEG_ARCHS:
        raise ValueError(f"model.arch={arch!r}: expected auto or one of {', '.join(SEG_ARCHS)}")
    return arch


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """(3x3 conv, BatchNorm, ReLU) twice, size kept."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UNetEncoder(nn.Module):
    """Four levels (16, 32, 64, 128 wide) and a 256-wide bottleneck, halving the size at each step.

    Returns every level's map (the decoder's skips) and the bottleneck last, as "out".
    """

    def __init__(self, channels: int):
        super().__init__()
        widths = (channels, *UNET_WIDTHS)
        self.levels = nn.ModuleList(_conv_block(c_in, c_out) for c_in, c_out in zip(widths, widths[1:]))
        self.bottleneck = _conv_block(UNET_WIDTHS[-1], UNET_BOTTLENECK)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else F.max_pool2d(x, 2))
            features[f"level{i + 1}"] = x
        features["out"] = self.bottleneck(F.max_pool2d(x, 2))
        return features


class UNetDecoder(nn.Module):
    """Upsamples the bottleneck level by level, each time joined with the encoder's map of that size."""

    def __init__(self, num_classes: int):
        super().__init__()
        widths = (UNET_BOTTLENECK, *reversed(UNET_WIDTHS))
        # A 1x1 conv then bilinear upsampling: a quarter of a transposed conv's weights, no checkerboard.
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.Upsample(scale_factor=2, mode="bilinear"))
            for c_in, c_out in zip(widths, widths[1:]))
        self.blocks = nn.ModuleList(_conv_block(2 * c_out, c_out) for c_out in widths[1:])
        self.classify = nn.Conv2d(UNET_WIDTHS[0], num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        *skips, x = features.values()
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.classify(x)


class DeepestMapHead(nn.Module):
    """DeepLabV3's head, which takes the deepest map alone, applied to the encoder's dict of maps."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features["out"])


def torchvision_segmentation(arch: str, num_classes: int, channels: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, head) of a freshly initialised torchvision segmentation model; the encoder returns a dict."""
    aux = {"aux_loss": False} if arch.startswith("deeplabv3") else {}
    net = getattr(_tv_models().segmentation, arch)(weights=None, weights_backbone=None,
                                                    num_classes=num_classes, **aux)
    encoder = net.backbone  # IntermediateLayerGetter: {"low", "high"} for LR-ASPP, {"out"} for DeepLabV3
    if channels != 3:
        first = next(name for name, m in encoder.named_modules() if isinstance(m, nn.Conv2d))
        encoder.set_submodule(first, _conv_like(encoder.get_submodule(first), channels))
    head = net.classifier if arch.startswith("lraspp") else DeepestMapHead(net.classifier)
    return encoder, head


def build_encoder_head(arch: str, num_classes: int, channels: int) -> tuple[nn.Module, nn.Module]:
    """(encoder mapping pixels to a dict of feature maps, deepest last; head mapping that dict to logits)."""
    if arch == "unet":
        return UNetEncoder(channels), UNetDecoder(num_classes)
    return torchvision_segmentation(arch, num_classes, channels)


def _deepest(features: dict[str, torch.Tensor]) -> torch.Tensor:
    return next(reversed(features.values()))


class SegmentationModel(nn.Module):
    """Takes float32 NxCxHxW in [0, 1] (normalisation inside), returns NxKxHxW logits; class 0 is background."""

    task = "segmentation"
    pretrained = ""  # what load_seg_pretrained put in the encoder; class default for older pickles

    def __init__(self, arch: str, classes: list[str], channels: int, image_size: int, drift_dims: int = 8):
        super().__init__()
        if len(classes) < 2:
            raise ValueError(f"classes={list(classes)}: a segmentation model needs the background and "
                             "at least one more class")
        self.arch = choose_seg_arch(arch)
        self.classes = list(classes)
        self.channels = channels
        self.image_size = image_size
        self.size_multiple = UNET_MULTIPLE if self.arch == "unet" else 1
        self.backbone, self.head = build_encoder_head(self.arch, len(self.classes), channels)
        # The embedding width: every encoder here ends with the convolution giving its deepest map.
        width = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.register_buffer("pixel_mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("pixel_std", torch.full((1, channels, 1, 1), 0.25))
        # Principal axes of the validation embeddings: drift features come from them.
        self.register_buffer("drift_center", torch.zeros(width))
        self.register_buffer("drift_axes", torch.eye(width, min(drift_dims, width)))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel pixel statistics of the training data."""
        self.pixel_mean.copy_(mean.reshape(1, -1, 1, 1))
        self.pixel_std.copy_(std.clamp_min(1e-3).reshape(1, -1, 1, 1))

    def _padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.size_multiple
        return -(-height // m) * m, -(-width // m) * m

    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The encoder's maps of the normalised input, padded (reflect, bottom and right) to the size multiple."""
        x = (x - self.pixel_mean) / self.pixel_std
        height, width = self._padded_size(*x.shape[-2:])
        if (height, width) != x.shape[-2:]:
            x = F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), mode="reflect")
        return self.backbone(x)

    def _logits(self, features: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
        """The head's logits at the input's size: upsampled if coarser, the padding cropped off."""
        logits = self.head(features)
        padded = self._padded_size(height, width)
        if logits.shape[-2:] != padded:
            logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., :height, :width]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled deepest encoder map: N x W."""
        return _deepest(self._encode(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self._encode(x), *x.shape[-2:])

    @torch.no_grad()
    def fit_drift_axes(self, embeddings: torch.Tensor) -> None:
        """Principal components of reference embeddings, used to summarise any embedding."""
        center = embeddings.mean(0)
        _, _, v = torch.linalg.svd(embeddings - center, full_matrices=False)
        k = min(self.drift_axes.shape[1], v.shape[0])  # a reference smaller than drift_dims: zero axes after k
        self.drift_center.copy_(center)
        self.drift_axes.zero_()
        self.drift_axes[:, :k] = v[:k].T

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel probabilities plus drift features (embedding components, pixel stats, foreground share),
        from one encoder pass."""
        features = self._encode(x)
        probabilities = torch.softmax(self._logits(features, *x.shape[-2:]).float(), dim=1)
        embedding = _deepest(features).mean((2, 3))
        gray = x.float().mean(1)
        return {
            "probabilities": probabilities,
            "embedding": (embedding.float() - self.drift_center) @ self.drift_axes,
            "brightness": gray.mean((1, 2)),
            "contrast": gray.std((1, 2)),
            "foreground": (probabilities.argmax(1) != 0).float().mean((1, 2)),
        }


def _as_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors named as in the encoder: a segmentation model's `backbone.` prefix and a MobileNetV3
    classifier's `features.` prefix removed, an auxiliary head dropped (ResNet keys already fit)."""
    return {key.removeprefix("backbone.").removeprefix("features."): value for key, value in state.items()
            if not key.startswith("aux_classifier.")}


def load_seg_pretrained(model: SegmentationModel, weights: str) -> str:
    """Fill the encoder from "imagenet" (local hub cache only) or a state-dict file; "" does nothing.

    The file holds a torchvision classifier (mobilenet_v3_large, resnet50) or a whole torchvision
    segmentation model (`backbone.*`; its heads are not loaded). Refuses (ValueError) a file for another
    arch: under half the encoder's parameters (by count or by size) matched, or tensors it has no place
    for. Sets ImageNet normalisation and `model.pretrained`; returns that text.
    """
    if not weights:
        return ""
    if model.arch not in ENCODER_ARCH:
        raise ValueError(f"pretrained weights need a torchvision arch ({', '.join(ENCODER_ARCH)}); "
                         f"model.arch={model.arch!r} has none")
    path = _weights_file(ENCODER_ARCH[model.arch], weights)
    return fill_backbone(model, path, _as_encoder_keys(_read_state_dict(path)), weights == "imagenet")


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy (BCE for two classes) + dice_weight * (1 - soft Dice), in float32.

    logits NxKxHxW, target NxHxW class ids. Dice is pooled over the whole batch per class (smooth 1, so a
    batch without foreground stays finite) and averaged over the non-background classes.
    """
    logits = logits.float()
    cross_entropy = F.cross_entropy(logits, target)
    probabilities = logits.softmax(1)
    truth = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    overlap = (probabilities * truth).sum((0, 2, 3))
    total = probabilities.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    dice = (2 * overlap + 1.0) / (total + 1.0)
    return cross_entropy + dice_weight * (1 - dice[1:].mean())
