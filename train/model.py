"""The image classifier: raw [0,1] pixels in, logits out, drift features from the same pass.

Backbones: the small CNN or torchvision architectures (ARCHS); `load_pretrained` fills one from local
weights (never downloads); `parameter_groups` gives the backbone its own learning rate for fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ARCHS = ("cnn", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _tv_models():
    """torchvision.models, imported on first use: it pulls in torch._dynamo (2.7 s here), which the small
    CNN, the CLI and every serving replica of it never need."""
    import torchvision.models

    return torchvision.models


def _conv_like(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """The same convolution taking `channels` inputs (freshly initialised)."""
    return nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def resnet(arch: str, channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision ResNet-18/34/50 without `fc` (embedding 512/512/2048); small stem up to 64 px."""
    net = getattr(_tv_models(), arch)(weights=None)
    width = net.fc.in_features
    if image_size <= 64:
        # The ImageNet stem (7x7 stride 2 + max-pool) throws away most of a small image.
        net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = _conv_like(net.conv1, channels)
    net.fc = nn.Identity()
    return net, width


def resnet18(channels: int, image_size: int) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 with a stem suited to small images; returns (backbone, embedding size)."""
    return resnet("resnet18", channels, image_size)


def mobilenet_v3(arch: str, channels: int) -> tuple[nn.Module, int]:
    """MobileNetV3 up to its pretrained penultimate Linear+Hardswish (embedding 1024 small, 1280 large)."""
    net = getattr(_tv_models(), arch)(weights=None)
    net.classifier = net.classifier[:2]  # drops Dropout and the 1000-class Linear
    if channels != 3:
        net.features[0][0] = _conv_like(net.features[0][0], channels)
    return net, net.classifier[0].out_features


def efficientnet(arch: str, channels: int) -> tuple[nn.Module, int]:
    """EfficientNet features + average pool, classifier removed (embedding 1280 for B0)."""
    net = getattr(_tv_models(), arch)(weights=None)
    width = net.classifier[-1].in_features
    net.classifier = nn.Identity()
    if channels != 3:
        net.features[0][0] = _conv_like(net.features[0][0], channels)
    return net, width


def build_backbone(arch: str, channels: int, image_size: int) -> tuple[nn.Module, int]:
    """(backbone giving a flat NxW embedding, W) for a name in ARCHS."""
    if arch == "cnn":
        return small_cnn(channels)
    if arch.startswith("resnet"):
        return resnet(arch, channels, image_size)
    if arch.startswith("mobilenet_v3"):
        return mobilenet_v3(arch, channels)
    if arch.startswith("efficientnet"):
        return efficientnet(arch, channels)
    raise ValueError(f"model.arch={arch!r}: expected one of {', '.join(ARCHS)}")


def choose_arch(arch: str, channels: int, image_size: int) -> str:
    """`auto` picks the small CNN for small gray images and ResNet-18 otherwise."""
    if arch == "auto":
        return "cnn" if channels == 1 and image_size <= 32 else "resnet18"
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r}: expected auto or one of {', '.join(ARCHS)}")
    return arch


class ImageClassifier(nn.Module):
    """Takes float32 NxCxHxW in [0, 1] (normalisation inside), returns logits."""

    task = "classification"
    pretrained = ""  # what load_pretrained put in the backbone; class default for older pickles

    def __init__(self, arch: str, classes: list[str], channels: int, image_size: int,
                 drift_dims: int = 8):
        super().__init__()
        self.arch = choose_arch(arch, channels, image_size)
        self.classes = list(classes)
        self.channels = channels
        self.image_size = image_size
        self.backbone, width = build_backbone(self.arch, channels, image_size)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(width, len(classes))
        self.register_buffer("pixel_mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("pixel_std", torch.full((1, channels, 1, 1), 0.25))
        # Principal axes of the validation embeddings: drift features come from them.
        self.register_buffer("drift_center", torch.zeros(width))
        self.register_buffer("drift_axes", torch.eye(width, min(drift_dims, width)))

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
        k = min(self.drift_axes.shape[1], v.shape[0])  # a reference smaller than drift_dims: zero axes after k
        self.drift_center.copy_(center)
        self.drift_axes.zero_()
        self.drift_axes[:, :k] = v[:k].T

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


def imagenet_checkpoint(arch: str) -> Path:
    """Where torch hub caches torchvision's DEFAULT ImageNet weights for `arch`."""
    url = _tv_models().get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _weights_file(arch: str, weights: str) -> Path:
    if weights == "imagenet":
        path = imagenet_checkpoint(arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageNet weights for {arch} are not in the local torch hub cache: expected {path}. "
                f"On a machine with internet, `python -c \"import torchvision; "
                f"torchvision.models.{arch}(weights='DEFAULT')\"` fills the cache (copy it here, "
                f"TORCH_HOME chooses where), or pass the path of a .pt/.pth state dict instead.")
        return path
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {weights!r}: expected 'imagenet' or an existing "
                                f".pt/.pth file holding a torchvision {arch} state dict")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _fitting_tensors(backbone: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """(the file's tensors the backbone has with the same shape, the file's keys it has no place for).

    RGB first-conv kernels are summed for a 1-channel model. Classifier layers the backbone dropped
    (`fc.*`, `classifier.*` beyond what it keeps) fall away silently; so does a first conv of another
    shape (the small ResNet stem). Other unknown keys mean the file is for another architecture.
    """
    own = backbone.state_dict()
    first = next(name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
    fitting, unknown = {}, []
    for key, value in state.items():
        if key == first and value.ndim == 4 and value.shape[1] == 3 and own[key].shape[1] == 1:
            value = value.sum(1, keepdim=True)
        if key in own and own[key].shape == value.shape:
            fitting[key] = value
        elif key not in own and not key.startswith(("fc.", "classifier.")):
            unknown.append(key)
    return fitting, unknown


def load_pretrained(model: ImageClassifier, weights: str) -> str:
    """Fill the backbone from "imagenet" (local hub cache only) or a state-dict file; "" does nothing.

    Refuses (ValueError) a file for another arch: under half the backbone's parameters (by count or
    by size) matched, or tensors the backbone has no place for. Sets ImageNet normalisation (what
    the weights expect) and `model.pretrained`; returns that text.
    """
    if not weights:
        return ""
    if model.arch == "cnn":
        raise ValueError("pretrained weights need a torchvision arch "
                         f"({', '.join(ARCHS[1:])}); model.arch='cnn' has none")
    path = _weights_file(model.arch, weights)
    return fill_backbone(model, path, _read_state_dict(path), weights == "imagenet")


def fill_backbone(model: nn.Module, path: Path, state: dict[str, torch.Tensor], imagenet: bool) -> str:
    """Load a file's fitting tensors into `model.backbone` (a classifier's or a segmenter's encoder), refusing
    (ValueError) a file for another arch: under half the backbone's parameters (by count or by size) matched,
    or tensors it has no place for. Sets ImageNet normalisation and `model.pretrained`; returns that text."""
    fitting, unknown = _fitting_tensors(model.backbone, state)
    params = dict(model.backbone.named_parameters())
    matched = [name for name in params if name in fitting]
    size, matched_size = sum(p.numel() for p in params.values()), sum(params[n].numel() for n in matched)
    if len(matched) < len(params) / 2 or matched_size < size / 2 or unknown:
        raise ValueError(f"{path} does not fit model.arch={model.arch!r}: {len(matched)} of the backbone's "
                         f"{len(params)} parameter tensors ({matched_size / size:.0%} of its weights) "
                         f"matched, {len(unknown)} of the file's tensors have no place in it")
    model.backbone.load_state_dict(fitting, strict=False)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    if model.channels != 3:
        mean, std = mean.mean().repeat(model.channels), std.mean().repeat(model.channels)
    model.set_normalisation(mean, std)
    model.pretrained = f"{'imagenet' if imagenet else 'file'} {path.name} ({len(matched)}/{len(params)} tensors)"
    return model.pretrained


def parameter_groups(model: nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: head at `lr`, backbone at `lr * backbone_lr_scale` (DDP-aware)."""
    module = getattr(model, "module", model)
    if backbone_lr_scale == 1:
        return [{"params": list(module.parameters()), "lr": lr}]
    backbone = list(module.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in module.parameters() if id(p) not in ids]
    return [{"params": head, "lr": lr, "name": "head"},
            {"params": backbone, "lr": lr * backbone_lr_scale, "name": "backbone"}]
