"""Model contract: raw [0,1] pixels in, logits out; drift features from the same pass."""

import pytest
import torch
import torchvision

from train.model import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassifier,
    choose_arch,
    imagenet_checkpoint,
    load_pretrained,
    parameter_groups,
)
from train.train import load_model, random_shift, save_model


@pytest.mark.parametrize("channels,size,arch", [(1, 28, "cnn"), (3, 32, "resnet18"), (3, 64, "resnet18"),
                                                (1, 48, "resnet18")])
def test_logits_for_any_batch_of_raw_pixels(channels, size, arch):
    model = ImageClassifier("auto", ["a", "b", "c"], channels, size).eval()
    assert model.arch == arch
    x = torch.rand(5, channels, size, size)
    logits = model(x)
    assert logits.shape == (5, 3) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_normalisation_lives_inside_the_model():
    model = ImageClassifier("cnn", ["a", "b"], 1, 28).eval()
    x = torch.rand(2, 1, 28, 28)
    before = model(x)
    model.set_normalisation(torch.tensor([0.1]), torch.tensor([0.3]))
    assert not torch.allclose(before, model(x))  # the stored statistics are applied to raw pixels


def test_infer_gives_probabilities_and_drift_features():
    model = ImageClassifier("cnn", ["a", "b", "c"], 1, 28, drift_dims=4).eval()
    x = torch.rand(6, 1, 28, 28)
    out = model.infer(x)
    assert torch.allclose(out["probabilities"].sum(1), torch.ones(6), atol=1e-5)
    assert out["embedding"].shape == (6, 4)
    assert torch.allclose(out["brightness"], x.mean((1, 2, 3)), atol=1e-5)
    reference = torch.rand(50, 1, 28, 28)
    model.fit_drift_axes(model.embed(reference))
    projected = model.infer(reference)["embedding"]
    assert projected.mean(0).abs().max() < 1e-3  # centred on the reference
    variances = projected.var(0)
    assert torch.all(variances[:-1] >= variances[1:] - 1e-6)  # principal axes, largest first


def test_save_and_load_round_trip(tmp_path):
    model = ImageClassifier("cnn", ["x", "y"], 1, 28).eval()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    x = torch.rand(3, 1, 28, 28)
    assert loaded.classes == ["x", "y"]
    assert torch.allclose(model(x), loaded(x))


def test_missing_model_dir_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="rayloop train"):
        load_model(tmp_path)


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="arch"):
        choose_arch("vgg", 3, 32)


def test_random_shift_moves_content_and_keeps_shape():
    x = torch.zeros(4, 1, 10, 10)
    x[:, :, 4:6, 4:6] = 1.0
    shifted = random_shift(x, 2)
    assert shifted.shape == x.shape
    assert torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))  # nothing lost within 2 px


def test_explicit_arch_names_are_checked_against_the_list():
    assert choose_arch("mobilenet_v3_small", 3, 96) == "mobilenet_v3_small"
    with pytest.raises(ValueError, match="efficientnet_b0"):  # the message lists what is allowed
        choose_arch("resnet101", 3, 224)


@pytest.mark.parametrize("arch,size", [(arch, 96) for arch in ARCHS[1:]]
                         + [("resnet18", 224), ("mobilenet_v3_small", 224)])
def test_every_arch_gives_logits_for_photos(arch, size):
    model = ImageClassifier(arch, ["a", "b", "c"], 3, size).eval()
    logits = model(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert model.infer(torch.rand(2, 3, size, size))["embedding"].shape == (2, 8)


def test_gray_photos_through_a_resnet():
    model = ImageClassifier("resnet34", ["a", "b"], 1, 128).eval()
    assert model.backbone.conv1.in_channels == 1 and model.backbone.conv1.kernel_size == (7, 7)
    assert model(torch.rand(2, 1, 128, 128)).shape == (2, 2)


def seeded_torchvision(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():
        net.conv1.weight.normal_()  # not what a fresh ImageClassifier would start with
    return net.state_dict()


def test_pretrained_weights_from_a_file(tmp_path):
    state = seeded_torchvision("resnet18")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "r18.pth")
    model = ImageClassifier("resnet18", ["a", "b"], 3, 224)
    description = load_pretrained(model, str(tmp_path / "r18.pth"))
    assert "r18.pth" in description and model.pretrained == description
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(model.pixel_std.flatten(), torch.tensor(IMAGENET_STD))
    assert model.head.out_features == 2  # the 1000-class fc was dropped, not loaded
    assert load_pretrained(ImageClassifier("resnet18", ["a"], 3, 224), "") == ""
    assert ImageClassifier("resnet18", ["a"], 3, 224).pretrained == ""


def test_gray_model_sums_the_rgb_kernel(tmp_path):
    state = seeded_torchvision("resnet18")
    torch.save(state, tmp_path / "r18.pt")
    model = ImageClassifier("resnet18", ["a", "b"], 1, 224)
    load_pretrained(model, str(tmp_path / "r18.pt"))
    assert torch.allclose(model.backbone.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor([sum(IMAGENET_MEAN) / 3]))


def test_weights_for_another_arch_are_refused(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), tmp_path / "mnv3.pt")
    with pytest.raises(ValueError, match="resnet18.*0 of"):
        load_pretrained(ImageClassifier("resnet18", ["a", "b"], 3, 224), str(tmp_path / "mnv3.pt"))
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match="no place"):  # a superset of ResNet-18's keys is still wrong
        load_pretrained(ImageClassifier("resnet18", ["a", "b"], 3, 224), str(tmp_path / "r34.pt"))
    with pytest.raises(ValueError, match="cnn"):
        load_pretrained(ImageClassifier("cnn", ["a", "b"], 1, 28), str(tmp_path / "mnv3.pt"))


def test_imagenet_weights_come_only_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    expected = imagenet_checkpoint("mobilenet_v3_small")
    assert expected.parent == tmp_path / "hub" / "hub" / "checkpoints"
    model = ImageClassifier("mobilenet_v3_small", ["a", "b"], 3, 224)
    with pytest.raises(FileNotFoundError, match=expected.name):
        load_pretrained(model, "imagenet")
    expected.parent.mkdir(parents=True)
    state = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(state, expected)
    assert load_pretrained(model, "imagenet").startswith("imagenet")
    assert torch.equal(model.backbone.classifier[0].weight, state["classifier.0.weight"])  # kept layer
    assert model(torch.rand(2, 3, 224, 224)).shape == (2, 2)


def test_parameter_groups_give_the_backbone_a_scaled_lr():
    model = ImageClassifier("resnet18", ["a", "b"], 3, 96)
    head, backbone = parameter_groups(model, 0.01, 0.1)
    assert head["lr"] == 0.01 and backbone["lr"] == pytest.approx(0.001)
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    assert {id(p) for p in head["params"]} == {id(model.head.weight), id(model.head.bias)}
    torch.optim.AdamW(parameter_groups(model, 0.01, 0.1))  # usable as given

    class Wrapped(torch.nn.Module):  # what DistributedDataParallel looks like from here
        def __init__(self):
            super().__init__()
            self.module = model

    assert parameter_groups(Wrapped(), 0.01, 0.1)[1]["lr"] == pytest.approx(0.001)
    assert len(parameter_groups(model, 0.01, 1.0)) == 1


def test_a_reference_smaller_than_the_drift_dims_still_fits_axes():
    model = ImageClassifier("cnn", ["a", "b"], 1, 28, drift_dims=8).eval()
    model.fit_drift_axes(model.embed(torch.rand(5, 1, 28, 28)))
    assert model.infer(torch.rand(3, 1, 28, 28))["embedding"].shape == (3, 8)
    assert model.drift_axes[:, 5:].abs().sum() == 0
