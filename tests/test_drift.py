"""Drift detection: quiet on clean traffic, loud on real shifts, Evidently's report on disk."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from monitoring.drift import DriftSettings, check_drift
from simulation.shifts import SHIFT_KINDS, shift_images
from tests.support.models import tiny_classifier
from train.data import load_mnist
from train.features import feature_frame
from train.model import ImageClassifier
from train.transforms import to_tensor

WINDOW = DriftSettings().window_size
EPOCHS = 6


def train_tiny_classifier(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> ImageClassifier:
    """Train the tiny classifier in-process with plain torch (no Ray), a few epochs on CPU."""
    torch.manual_seed(0)
    model = tiny_classifier(classes)
    pixels = images.astype(np.float32) / 255.0
    model.set_normalisation(torch.tensor([pixels.mean()]), torch.tensor([pixels.std()]))
    x, y = to_tensor(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x)).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Real MNIST digits split into train / reference (validation) / held-out clean traffic."""
    images, labels, classes = load_mnist()
    order = np.random.default_rng(0).permutation(len(images))
    cut = {"train": order[:1500], "reference": order[1500:2000], "held_out": order[2000:3500]}
    return {"classes": classes, **{k: images[v] for k, v in cut.items()},
            **{f"{k}_labels": labels[v] for k, v in cut.items()}}


@pytest.fixture(scope="module")
def model(digits) -> ImageClassifier:
    """A tiny trained classifier whose drift axes are fitted on the reference, as training does."""
    model = train_tiny_classifier(digits["train"], digits["train_labels"], digits["classes"])
    with torch.no_grad():
        model.fit_drift_axes(model.embed(to_tensor(digits["reference"])))
    return model


@pytest.fixture(scope="module")
def reference(model, digits) -> pd.DataFrame:
    """The drift reference: features of the validation digits, as training computes it."""
    return feature_frame(model, to_tensor(digits["reference"]))


@pytest.fixture(scope="module")
def clean_traffic(model, digits) -> pd.DataFrame:
    """Drift features of held-out digits from the training distribution."""
    return feature_frame(model, to_tensor(digits["held_out"]))


@pytest.fixture(scope="module")
def features(digits) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, window) from an untrained model: enough for what a report holds and what check_drift refuses.
    Seeded: random weights would make a clean window's 12 column tests at p < 0.01 fail now and then."""
    torch.manual_seed(0)
    model = tiny_classifier(digits["classes"]).eval()
    with torch.no_grad():
        model.fit_drift_axes(model.embed(to_tensor(digits["reference"])))
    return feature_frame(model, to_tensor(digits["reference"])), feature_frame(model, to_tensor(digits["held_out"]))


def shifted_window(model, digits, kind: str, severity: float, seed: int = 0) -> pd.DataFrame:
    """Drift features of a window of held-out digits after a real image shift."""
    rng = np.random.default_rng(seed)
    images = digits["held_out"][rng.choice(len(digits["held_out"]), WINDOW, replace=False)]
    return feature_frame(model, to_tensor(shift_images(images, kind, severity, seed=seed)))


@pytest.mark.slow  # trains a classifier: the calibration tests below need one that learned the digits
def test_tiny_model_learned_digits(model, digits):
    # The drift tests mean little on a model that never learned the task.
    with torch.no_grad():
        predicted = model(to_tensor(digits["held_out"])).argmax(1).numpy()
    assert (predicted == digits["held_out_labels"]).mean() > 0.85


@pytest.mark.slow
def test_clean_windows_raise_no_false_alarm(reference, clean_traffic):
    reports = [check_drift(reference, clean_traffic.sample(WINDOW, random_state=seed)) for seed in range(20)]

    assert [r.drifted for r in reports] == [False] * 20
    assert max(r.share for r in reports) < DriftSettings().drift_share


@pytest.mark.slow
@pytest.mark.parametrize("kind,severity", [("rotate", 45), ("rotate", 90), ("noise", 0.3), ("invert", 1.0),
                                           ("blur", 2.0)])
def test_real_shifts_are_flagged(model, digits, reference, kind, severity):
    report = check_drift(reference, shifted_window(model, digits, kind, severity))

    assert report.drifted
    assert report.share >= DriftSettings().drift_share
    assert report.embedding_drifted


def test_report_is_saved_as_html_and_json(features, tmp_path):
    reference, clean_traffic = features
    report = check_drift(reference, clean_traffic.head(WINDOW), data_dir=tmp_path, report=True)

    assert report.html_path.startswith(str(tmp_path / "drift")) and report.html_path.endswith(".html")
    assert "<html" in open(report.html_path).read(2000).lower()
    saved = json.loads(open(report.json_path).read())
    assert saved  # Evidently's snapshot, parseable
    assert set(report.scores) == set(reference.columns)  # every feature column was tested
    assert report.window_size == WINDOW and report.reference_size == len(reference)


def test_empty_window_is_refused(features):
    reference, _ = features
    with pytest.raises(ValueError, match="0 rows"):
        check_drift(reference, reference.head(0))


def test_missing_columns_are_named(features):
    reference, clean_traffic = features
    with pytest.raises(ValueError, match="emb_3"):
        check_drift(reference, clean_traffic.head(WINDOW).drop(columns=["emb_3"]))
    with pytest.raises(ValueError, match="confidence"):
        check_drift(reference.drop(columns=["confidence"]), clean_traffic.head(WINDOW))


def test_non_numeric_features_are_refused(features):
    reference, clean_traffic = features
    window = clean_traffic.head(WINDOW).copy()
    window.loc[window.index[0], "brightness"] = np.nan
    with pytest.raises(ValueError, match="brightness"):
        check_drift(reference, window)


@pytest.mark.parametrize("kind", sorted(SHIFT_KINDS))
def test_shifts_keep_the_image_format(digits, kind):
    images = digits["reference"][:8]
    shifted = shift_images(images, kind, seed=1)
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    assert not np.array_equal(shifted, images)
    assert np.array_equal(shifted, shift_images(images, kind, seed=1))  # seeded: reproducible


def test_unknown_shift_is_refused(digits):
    with pytest.raises(ValueError, match="rotate"):
        shift_images(digits["reference"][:2], "sepia", 1.0)


@pytest.mark.parametrize("window", ["clean head", "clean tail", "brighter", "embedding moved"])
def test_the_monitor_decides_as_evidentlys_report_would_without_building_it(features, window):
    from monitoring.drift import _table, column_results, column_tests, evidently_report, validate

    reference, clean = features
    current = {"clean head": clean.head(WINDOW), "clean tail": clean.tail(WINDOW),
               "brighter": clean.head(WINDOW).assign(brightness=lambda f: f.brightness + 0.05),
               "embedding moved": clean.head(WINDOW).assign(emb_0=lambda f: f.emb_0 + 1.0, emb_1=lambda f: f.emb_1 * 2)
               }[window]
    settings = DriftSettings()
    numeric, embedding = validate(reference, current, settings)
    ref, cur = _table(reference, numeric), _table(current, numeric)

    scores, drifted = column_tests(ref, cur, numeric, settings)
    report_scores, report_drifted = column_results(evidently_report(ref, cur, numeric, embedding, settings).dict())

    assert scores.keys() == report_scores.keys()
    same = [c for c in scores if abs(scores[c] - report_scores[c]) < 1e-9
            or (np.isnan(scores[c]) and np.isnan(report_scores[c]))]  # one predicted class on both sides
    assert same == list(scores), (scores, report_scores)
    assert sorted(drifted) == sorted(report_drifted)
    assert (window in {"brighter", "embedding moved"}) == bool(drifted)


def test_a_report_is_built_only_for_a_window_that_drifted_unless_asked(features, tmp_path):
    reference, clean = features
    calm = check_drift(reference, clean.head(WINDOW), data_dir=tmp_path)
    assert not calm.drifted and calm.html_path is None and not (tmp_path / "drift").exists()

    asked = check_drift(reference, clean.head(WINDOW), data_dir=tmp_path, report=True)
    assert asked.html_path and asked.html_path.endswith(".html")
