"""Segmentation model contract: raw [0,1] pixels in, logits of the input's size out, drift features from
the same pass, the encoder apart from the head, local pretrained weights only, a loss that learns."""

import pytest
import torch
import torchvision

from train.model import IMAGENET_MEAN, parameter_groups
from train.segmodels import (
    SEG_ARCHS,
    SegmentationModel,
    choose_seg_arch,
    dice_ce_loss,
    load_seg_pretrained,
)

CLASSES = ["background", "crack", "stain"]


@pytest.mark.parametrize("arch,channels,size", [
    ("unet", 1, 40), ("unet", 3, 37), ("unet", 3, 16),
    ("lraspp_mobilenet_v3_large", 3, 40), ("lraspp_mobilenet_v3_large", 1, 33),
    ("deeplabv3_mobilenet_v3_large", 1, 40), ("deeplabv3_mobilenet_v3_large", 3, 35),
    ("deeplabv3_resnet50", 3, 32),
])
def test_logits_have_the_input_size(arch, channels, size):
    model = SegmentationModel(arch, CLASSES, channels, size).eval()
    logits = model(torch.rand(2, channels, size, size + 3))
    assert logits.shape == (2, 3, size, size + 3) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["unet", "lraspp_mobilenet_v3_large"])
def test_infer_gives_pixel_probabilities_and_drift_features(arch):
    model = SegmentationModel(arch, CLASSES, 3, 40, drift_dims=4).eval()
    x = torch.rand(5, 3, 40, 44)
    out = model.infer(x)
    assert set(out) == {"probabilities", "embedding", "brightness", "contrast", "foreground"}
    assert out["probabilities"].shape == (5, 3, 40, 44) and out["probabilities"].dtype == torch.float32
    assert torch.allclose(out["probabilities"].sum(1), torch.ones(5, 40, 44), atol=1e-5)
    assert torch.allclose(out["probabilities"], torch.softmax(model(x), 1), atol=1e-5)  # the same pass
    assert out["embedding"].shape == (5, 4)
    assert torch.allclose(out["brightness"], x.mean((1, 2, 3)), atol=1e-5)
    assert torch.allclose(out["contrast"], x.mean(1).std((1, 2)), atol=1e-5)
    share = (model(x).argmax(1) != 0).float().mean((1, 2))
    assert torch.allclose(out["foreground"], share) and ((share >= 0) & (share <= 1)).all()


def test_foreground_is_the_share_of_pixels_not_called_background():
    model = SegmentationModel("unet", ["background", "crack"], 1, 32).eval()
    with torch.no_grad():  # a head that calls every pixel background, then one that calls none
        model.head.classify.weight.zero_()
        model.head.classify.bias.copy_(torch.tensor([0.0, -1.0]))
    assert model.infer(torch.rand(3, 1, 32, 32))["foreground"].tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        model.head.classify.bias.copy_(torch.tensor([-1.0, 0.0]))
    assert model.infer(torch.rand(3, 1, 32, 32))["foreground"].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("arch,width", [("unet", 256), ("lraspp_mobilenet_v3_large", 960)])
def test_drift_axes_summarise_the_embedding(arch, width):
    model = SegmentationModel(arch, CLASSES, 1, 32, drift_dims=6).eval()
    reference = torch.rand(20, 1, 32, 32)
    embeddings = model.embed(reference)
    assert embeddings.shape == (20, width) == (20, model.drift_axes.shape[0])
    assert torch.equal(model.drift_axes, torch.eye(width, 6))  # before fitting: the first components
    model.fit_drift_axes(embeddings)
    projected = model.infer(reference)["embedding"]
    assert projected.shape == (20, 6)
    assert projected.mean(0).abs().max() < 1e-3  # centred on the reference
    variances = projected.var(0)
    assert torch.all(variances[:-1] >= variances[1:] - 1e-6)  # principal axes, largest first


def test_normalisation_lives_inside_the_model():
    model = SegmentationModel("unet", CLASSES, 1, 32).eval()
    assert model.pixel_mean.shape == (1, 1, 1, 1) and model.pixel_std.flatten().tolist() == [0.25]
    x = torch.rand(2, 1, 32, 32)
    before = model(x)
    model.set_normalisation(torch.tensor([0.1]), torch.tensor([0.3]))
    assert not torch.allclose(before, model(x))


def test_arch_names_are_checked():
    assert choose_seg_arch("auto") == "unet"
    assert [choose_seg_arch(arch) for arch in SEG_ARCHS] == list(SEG_ARCHS)
    with pytest.raises(ValueError, match="model.arch='resnet18': expected auto or one of unet, lraspp"):
        choose_seg_arch("resnet18")
    with pytest.raises(ValueError, match="background"):
        SegmentationModel("unet", ["only"], 1, 32)
    model = SegmentationModel("auto", ["bg", "fg"], 1, 32)
    assert (model.arch, model.task, model.classes, model.pretrained) == ("unet", "segmentation", ["bg", "fg"], "")


@pytest.mark.parametrize("arch,head_first", [("unet", "head.ups.0.0.weight"),
                                             ("lraspp_mobilenet_v3_large", "head.cbr.0.weight"),
                                             ("deeplabv3_mobilenet_v3_large", "head.head.0.convs.0.0.weight")])
def test_the_encoder_gets_its_own_learning_rate_and_the_head_does_not(arch, head_first):
    model = SegmentationModel(arch, CLASSES, 3, 32)
    head, backbone = parameter_groups(model, 0.01, 0.1)
    assert head["lr"] == 0.01 and backbone["lr"] == pytest.approx(0.001)
    head_ids, backbone_ids = {id(p) for p in head["params"]}, {id(p) for p in backbone["params"]}
    assert not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(p) for p in model.parameters()}
    params = dict(model.named_parameters())
    assert id(params[head_first]) in head_ids
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert id(first_conv.weight) in backbone_ids
    torch.optim.AdamW(parameter_groups(model, 0.01, 0.1))  # usable as given


def test_loss_prefers_the_right_masks_and_trains():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 16))
    right = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10
    wrong = torch.nn.functional.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float() * 10
    assert dice_ce_loss(right, target) < 0.01 < 1 < dice_ce_loss(wrong, target)
    assert dice_ce_loss(wrong, target, dice_weight=0.0) < dice_ce_loss(wrong, target)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    dice_ce_loss(logits.bfloat16(), target).backward()
    assert dice_ce_loss(logits.bfloat16(), target).dtype == torch.float32
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_a_batch_without_foreground_has_a_finite_loss():
    background_only = torch.zeros(2, 16, 16, dtype=torch.long)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    loss = dice_ce_loss(logits, background_only)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    confident = torch.stack([torch.full((2, 16, 16), 10.0), torch.full((2, 16, 16), -10.0)], dim=1)
    assert dice_ce_loss(confident, background_only) < 0.01  # nothing to find, nothing found


def squares(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim noisy images each holding one bright square; the mask is the square."""
    images, masks = torch.rand(n, 1, size, size) * 0.4, torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        side = int(torch.randint(6, 12, ()))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,)))
        images[i, :, top:top + side, left:left + side] += 0.5
        masks[i, top:top + side, left:left + side] = 1
    return images, masks


def test_unet_learns_to_find_a_bright_square():
    torch.manual_seed(0)
    images, masks = squares(8, 32)
    model = SegmentationModel("unet", ["background", "square"], 1, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        dice_ce_loss(model(images), masks).backward()
        optimizer.step()
    test_images, test_masks = squares(8, 32)
    found = model.eval().infer(test_images)["probabilities"].argmax(1) == 1
    truth = test_masks == 1
    assert (found & truth).sum() / (found | truth).sum() > 0.5


def test_weights_from_a_torchvision_classifier_fill_the_encoder(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    torch.save(state, tmp_path / "mnv3.pth")
    model = SegmentationModel("lraspp_mobilenet_v3_large", CLASSES, 3, 64)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    description = load_seg_pretrained(model, str(tmp_path / "mnv3.pth"))
    assert "mnv3.pth" in description and model.pretrained == description
    encoder = model.backbone.state_dict()
    assert all(torch.equal(value, state[f"features.{key}"]) for key, value in encoder.items())
    assert all(torch.equal(value, head_before[k]) for k, value in model.head.state_dict().items())
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    gray = SegmentationModel("lraspp_mobilenet_v3_large", CLASSES, 1, 64)
    load_seg_pretrained(gray, str(tmp_path / "mnv3.pth"))
    assert torch.allclose(gray.backbone["0"][0].weight, state["features.0.0.weight"].sum(1, keepdim=True))
    assert gray(torch.rand(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_weights_of_a_whole_segmentation_model_fill_the_encoder(tmp_path):
    net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=21)
    torch.save({"model": net.state_dict()}, tmp_path / "lraspp.pt")
    model = SegmentationModel("lraspp_mobilenet_v3_large", CLASSES, 3, 64)
    assert load_seg_pretrained(model, str(tmp_path / "lraspp.pt")).startswith("file lraspp.pt")
    assert torch.equal(model.backbone["16"][0].weight, net.backbone["16"][0].weight)
    assert model.head.low_classifier.out_channels == 3  # the file's 21-class head stayed out


def test_weights_for_another_arch_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    model = SegmentationModel("lraspp_mobilenet_v3_large", CLASSES, 3, 64)
    with pytest.raises(ValueError, match="lraspp_mobilenet_v3_large.*0 of the backbone's"):
        load_seg_pretrained(model, str(tmp_path / "r18.pt"))
    assert model.pretrained == ""
    with pytest.raises(ValueError, match="unet.* has none"):
        load_seg_pretrained(SegmentationModel("unet", CLASSES, 3, 64), str(tmp_path / "r18.pt"))
    assert load_seg_pretrained(SegmentationModel("unet", CLASSES, 3, 64), "") == ""


def test_imagenet_weights_come_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    model = SegmentationModel("lraspp_mobilenet_v3_large", CLASSES, 3, 64)
    with pytest.raises(FileNotFoundError, match="mobilenet_v3_large.*not in the local torch hub cache"):
        load_seg_pretrained(model, "imagenet")
    assert not (tmp_path / "empty").exists()  # nothing was fetched


@pytest.mark.parametrize("arch", ["unet", "lraspp_mobilenet_v3_large"])
def test_a_rebuilt_model_loads_the_state_dict_and_agrees(arch):
    torch.manual_seed(0)
    model = SegmentationModel(arch, CLASSES, 1, 40, drift_dims=4)
    model.set_normalisation(torch.tensor([0.3]), torch.tensor([0.2]))
    model.fit_drift_axes(torch.randn(10, model.drift_axes.shape[0]))
    model.eval()
    rebuilt = SegmentationModel(arch, CLASSES, 1, 40, drift_dims=4)
    rebuilt.load_state_dict(model.state_dict())  # strict
    rebuilt.eval()
    x = torch.rand(2, 1, 40, 40)
    assert torch.equal(model(x), rebuilt(x))
    assert torch.equal(model.infer(x)["embedding"], rebuilt.infer(x)["embedding"])
