"""A training step in micro-batches: the same gradient as the whole batch, within a measured memory budget."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from train.model import ImageClassifier
from train.steps import (
    CPU_BUDGET_MB,
    accumulate_gradients,
    activation_bytes_per_image,
    budget_bytes,
    eval_batch_size,
    micro_batch_size,
    micro_batches,
)

CPU = torch.device("cpu")
MB = 1024 ** 2


class TinyConvNet(nn.Module):
    """No BatchNorm: its gradient over micro-batches must equal the whole batch's exactly (up to rounding)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.layers(x)


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro", [1, 3, 5, 16])
def test_micro_batches_give_the_whole_batchs_gradient_and_mean_loss(micro):
    torch.manual_seed(0)
    model, images, targets = TinyConvNet(), torch.rand(10, 3, 12, 12), torch.randint(0, 4, (10,))
    loss_of = nn.functional.cross_entropy

    whole = loss_of(model(images), targets)
    whole.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    loss = accumulate_gradients(model, loss_of, images, targets, micro, contextlib.nullcontext)

    assert loss == pytest.approx(float(whole.detach()), rel=1e-5)
    for got, want in zip(gradients(model), expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_ddp_synchronises_only_with_the_last_micro_batch():
    calls = []

    class Wrapped(TinyConvNet):
        @contextlib.contextmanager
        def no_sync(self):
            calls.append("no_sync")
            yield

    accumulate_gradients(Wrapped(), nn.functional.cross_entropy, torch.rand(10, 3, 8, 8), torch.randint(0, 4, (10,)),
                         4, contextlib.nullcontext)
    assert calls == ["no_sync", "no_sync"]  # parts of 4, 4 and 2: the third backward all-reduces


def test_the_small_cnns_activations_are_measured_per_image_and_grow_with_pixels():
    small = activation_bytes_per_image(ImageClassifier("cnn", ["a", "b"], 3, 64), CPU, contextlib.nullcontext)
    large = activation_bytes_per_image(ImageClassifier("cnn", ["a", "b"], 3, 128), CPU, contextlib.nullcontext)
    # conv + BN + ReLU keep two 32-channel float maps per layer at full size, and more at 1/2 and 1/4 size:
    # about 16 MB per 128-px image (a batch of 64 held 1.1 GB), a quarter of it at 64 px
    assert 12 * MB < large < 20 * MB
    assert large / small == pytest.approx(4, rel=0.1)


def test_a_segmentation_model_is_measured_too():
    from train.segmodels import SegmentationModel

    model = SegmentationModel("auto", ["background", "crack"], 3, 64)
    assert 1 * MB < activation_bytes_per_image(model, CPU, contextlib.nullcontext) < 64 * MB


def test_the_probe_leaves_the_model_and_the_random_generator_as_they_were():
    model = ImageClassifier("cnn", ["a", "b"], 3, 32)
    model.eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.random.get_rng_state()

    activation_bytes_per_image(model, CPU, contextlib.nullcontext)

    assert not model.training
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), generator)


@pytest.mark.parametrize("batch, per_image, budget, expected", [
    (64, 16 * MB, 512 * MB, 32),    # 1 GB: two halves
    (64, 16 * MB, 400 * MB, 22),    # 25 fit: three parts, evened out (22 + 22 + 20), not 25 + 25 + 14
    (64, 1 * MB, 512 * MB, 64),     # fits: one part
    (64, 16 * MB, 0, 64),           # no budget
    (64, 900 * MB, 512 * MB, 2),    # not even one image fits: two at a time, for BatchNorm
])
def test_the_micro_batch_is_the_largest_even_split_within_the_budget(batch, per_image, budget, expected):
    assert micro_batch_size(batch, per_image, budget) == expected


def test_budget_auto_on_cpu_zero_for_none_and_megabytes():
    assert budget_bytes("auto", CPU) == CPU_BUDGET_MB * MB
    assert budget_bytes("0", CPU) == 0
    assert budget_bytes(" 256 ", CPU) == 256 * MB


@pytest.mark.parametrize("setting", ["-1", "lots", "1.5"])
def test_anything_else_is_refused_by_name(setting):
    with pytest.raises(ValueError, match="train.step_memory_mb"):
        budget_bytes(setting, CPU)


def test_a_batch_over_the_budget_is_split_and_says_so(capsys):
    model = ImageClassifier("cnn", ["a", "b"], 3, 128)

    micro = micro_batches(model, 64, CPU, "auto", contextlib.nullcontext, rank=0)

    assert 16 <= micro <= 32  # ~16.7 MB an image: 30 fit in 512 MB, so three parts of 22
    assert f"batches of 64 run as micro-batches of {micro} (train.step_memory_mb=auto: 512 MB)" in \
        capsys.readouterr().out
    assert micro_batches(ImageClassifier("cnn", ["a", "b"], 1, 28), 64, CPU, "auto", contextlib.nullcontext,
                         rank=0) == 64  # the digits: 0.8 MB an image, the whole batch
    assert micro_batches(model, 64, CPU, "0", contextlib.nullcontext, rank=0) == 64


def test_a_bad_setting_fails_before_training_starts():
    from cluster.settings import load_settings
    from train.train import TrainConfig, TrainingSets, make_trainer

    settings = load_settings({"RAYLOOP_TRAIN_STEP_MEMORY_MB": "plenty"})
    with pytest.raises(ValueError, match="train.step_memory_mb='plenty'"):
        make_trainer(settings, TrainingSets(None, None, 0), ImageClassifier("cnn", ["a", "b"], 1, 28),
                     TrainConfig.from_settings(settings), name="x", num_workers=0, use_gpu=False)


@pytest.mark.parametrize("image_size, expected", [(28, 256), (64, 256), (128, 64), (224, 20), (1024, 8)])
def test_evaluation_batches_shrink_as_images_grow(image_size, expected):
    assert eval_batch_size(image_size) == expected
    assert eval_batch_size(image_size, cap=32) == min(32, expected)  # a task's own cap (a mask model's) still holds


def test_streamed_passes_use_the_pixel_aware_batch(tmp_path):
    from simulation.photos import make_photo_folder
    from train.decode import Decoder
    from train.ingest import stream
    from train.scan import scan_image_folder

    make_photo_folder(tmp_path / "photos", per_class=50, size=60)
    rows = scan_image_folder(str(tmp_path / "photos"))[1]  # path + label: no Ray, decoded in this process
    sizes = [len(batch["label"]) for batch in stream(rows, Decoder(str(tmp_path / "photos"), 128, 3))]
    assert sizes == [64, 36]
