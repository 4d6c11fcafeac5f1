"""Segmentation evaluation: the scores a mask model gets, the examples kept, and what reaches MLflow."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from train.seg_evaluate import evaluate_masks, examples_figure, log_mask_evaluation, overlay

SIZE = 16
DARK, BRIGHT = 40, 230


class BrightnessModel(nn.Module):
    """Stand-in for a segmentation model: a pixel is crack where it is brighter than `threshold`."""

    classes = ["background", "crack"]

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(threshold), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crack = 20 * (x.mean(dim=1, keepdim=True) - self.threshold)
        return torch.cat([-crack, crack], dim=1)


def sample(index: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with a bright vertical crack at column `index` (none for index 0), and its mask."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    if index:
        mask[2:SIZE - 2, index % SIZE] = 1
    image = np.where(mask[:, :, None] == 1, BRIGHT, DARK).astype(np.uint8)
    return np.repeat(image, channels, axis=2), mask


def batches(count: int, per_batch: int = 3, start: int = 1, channels: int = 3) -> list[dict[str, np.ndarray]]:
    pairs = [sample(i, channels) for i in range(start, start + count)]
    return [{"image": np.stack([p[0] for p in pairs[i:i + per_batch]]),
             "mask": np.stack([p[1] for p in pairs[i:i + per_batch]])} for i in range(0, count, per_batch)]


def test_a_perfect_model_scores_one_and_no_error():
    evaluation = evaluate_masks(BrightnessModel(), batches(7))

    assert evaluation.count == 7
    assert evaluation.scores["iou"] == evaluation.scores["miou"] == evaluation.scores["dice"] == 1.0
    assert evaluation.scores["pixel_accuracy"] == 1.0
    assert evaluation.scores["area_error_pct"] == evaluation.scores["length_error_px"] == 0.0
    assert evaluation.accuracy == 1.0
    assert evaluation.per_class_iou == {"background": 1.0, "crack": 1.0}
    assert evaluation.confusion.sum() == 7 * SIZE * SIZE
    assert evaluation.confusion[0, 1] == evaluation.confusion[1, 0] == 0
    assert evaluation.loss < 0.05


def test_a_model_that_sees_only_background_finds_no_crack():
    evaluation = evaluate_masks(BrightnessModel(threshold=2.0), batches(5))

    np.testing.assert_array_equal(evaluation.per_image_iou, np.zeros(5))
    assert evaluation.accuracy == 0.0
    assert evaluation.per_class_iou["crack"] == 0.0
    crack_pixels = 5 * (SIZE - 4)
    assert evaluation.confusion[1, 0] == crack_pixels and evaluation.confusion[:, 1].sum() == 0
    assert evaluation.scores["pixel_accuracy"] == pytest.approx(1 - crack_pixels / (5 * SIZE * SIZE))
    assert evaluation.scores["area_error_pct"] > 0 and evaluation.scores["length_error_px"] > 0


def test_per_image_iou_has_one_score_per_image_in_the_order_scored():
    # The first image has no crack: finding none there is right (1); the others are missed (0).
    evaluation = evaluate_masks(BrightnessModel(threshold=2.0), batches(6, per_batch=4, start=0))

    assert evaluation.count == len(evaluation.per_image_iou) == 6
    np.testing.assert_array_equal(evaluation.per_image_iou, [1, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("keep", [0, 2, 4, 10])
def test_at_most_keep_examples_are_kept_first_images_first(keep):
    data = batches(7)
    evaluation = evaluate_masks(BrightnessModel(), data, keep_examples=keep)

    assert len(evaluation.examples) == min(keep, 7)
    if keep:
        image, truth, predicted = evaluation.examples[0]
        np.testing.assert_array_equal(image, data[0]["image"][0])
        np.testing.assert_array_equal(truth, data[0]["mask"][0])
        np.testing.assert_array_equal(predicted, truth)


def test_metrics_are_flat_and_carry_the_prefix():
    metrics = evaluate_masks(BrightnessModel(), batches(2)).metrics("val")

    assert set(metrics) == {"val_miou", "val_iou", "val_dice", "val_pixel_accuracy", "val_area_error_pct",
                            "val_length_error_px", "val_loss"}
    assert all(isinstance(v, float) for v in metrics.values())


def test_a_grayscale_set_is_scored_too():
    assert evaluate_masks(BrightnessModel(), batches(3, channels=1)).accuracy == 1.0


@pytest.mark.parametrize("data", [[], [{"image": np.zeros((0, SIZE, SIZE, 3), np.uint8),
                                        "mask": np.zeros((0, SIZE, SIZE), np.uint8)}]])
def test_an_empty_set_cannot_be_evaluated(data):
    with pytest.raises(ValueError, match="cannot evaluate on an empty set"):
        evaluate_masks(BrightnessModel(), data)


def test_masks_of_another_size_than_the_prediction_are_an_error():
    data = batches(2)
    data[0]["mask"] = data[0]["mask"][:, :8, :8]

    with pytest.raises(ValueError, match="resize masks"):
        evaluate_masks(BrightnessModel(), data)


def test_overlay_tints_only_the_masked_pixels():
    image = np.full((4, 5, 3), 100, dtype=np.uint8)
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1, 2] = 1

    tinted = overlay(image, mask, colour=(255, 0, 0), alpha=0.5)

    assert tinted.dtype == np.uint8 and tinted.shape == (4, 5, 3)
    assert tuple(tinted[1, 2]) == (178, 50, 50)
    untouched = np.ones((4, 5), dtype=bool)
    untouched[1, 2] = False
    assert (tinted[untouched] == 100).all()
    assert (image == 100).all()  # the input is left as it was


def test_overlay_turns_a_gray_image_into_rgb():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)

    rgb = overlay(gray, np.zeros((2, 3), dtype=np.uint8))

    assert rgb.shape == (2, 3, 3)
    np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=2))


def test_examples_figure_has_image_truth_and_prediction_per_example():
    import matplotlib.pyplot as plt

    evaluation = evaluate_masks(BrightnessModel(), batches(5), keep_examples=3)
    fig = examples_figure(evaluation)
    try:
        assert len(fig.axes) == 3 * 3
        assert "IoU 1.000" in fig.axes[2].get_title()
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store of the module's own (SQLite, as rayloop's embedded store: this MLflow refuses a plain
    file store without an opt-out); the tracking URI is put back afterwards."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri keeps the two in step
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
    yield mlflow
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def experiment(store, tmp_path) -> str:
    """A fresh experiment whose artifacts live under the test's tmp_path."""
    return store.create_experiment(tmp_path.name, artifact_location=(tmp_path / "artifacts").as_uri())


def test_log_mask_evaluation_records_metrics_and_artifacts_in_the_run(experiment):
    import mlflow
    from mlflow.tracking import MlflowClient

    evaluation = evaluate_masks(BrightnessModel(threshold=2.0), batches(4))
    with mlflow.start_run(experiment_id=experiment) as run:
        log_mask_evaluation(evaluation, prefix="test")

    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.metrics == pytest.approx(evaluation.metrics("test"))
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {"evaluation/per_class_iou.json", "evaluation/confusion.json", "evaluation/examples.png"}
    per_class = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluation/per_class_iou.json")
    assert per_class == {"background": pytest.approx(evaluation.per_class_iou["background"]), "crack": 0.0}


def test_a_class_seen_nowhere_has_no_iou_and_is_logged_as_null(experiment):
    import mlflow

    class ThreeClasses(BrightnessModel):
        classes = ["background", "crack", "spall"]

        def forward(self, x):
            return torch.cat([super().forward(x), torch.full_like(x[:, :1], -10.0)], dim=1)

    evaluation = evaluate_masks(ThreeClasses(), batches(2))
    assert np.isnan(evaluation.per_class_iou["spall"]) and evaluation.scores["miou"] == 1.0
    with mlflow.start_run(experiment_id=experiment) as run:
        log_mask_evaluation(evaluation)
    per_class = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluation/per_class_iou.json")
    assert per_class == {"background": 1.0, "crack": 1.0, "spall": None}
