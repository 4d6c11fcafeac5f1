"""Model contract: raw [0,1] pixels in, logits out; drift features from the same pass."""

import pytest
import torch

from train.model import ImageClassifier, choose_arch
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
