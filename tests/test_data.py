"""Data: the embedded MNIST set, any ImageFolder, and a split that is stratified and stable."""

import numpy as np
import pytest

from cluster.settings import DataSettings
from tests.support.images import write_image_folder
from train.data import load_image_folder, load_mnist, prepare, prepared_or_new, stratified_split


def test_embedded_mnist_is_5000_balanced_digits():
    images, labels, classes = load_mnist()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    assert classes == [str(d) for d in range(10)]
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.mean() > 10  # real strokes, not blanks


def test_split_is_stratified_disjoint_and_complete():
    labels = np.repeat(np.arange(5), [100, 80, 60, 40, 20])
    split = stratified_split(labels, val_fraction=0.1, test_fraction=0.2, seed=7)
    joined = np.concatenate(list(split.values()))
    assert sorted(joined.tolist()) == list(range(len(labels)))  # every item exactly once
    for name, fraction in (("test", 0.2), ("val", 0.1)):
        counts = np.bincount(labels[split[name]], minlength=5)
        assert counts.tolist() == [round(n * fraction) for n in (100, 80, 60, 40, 20)]


def test_split_is_stable_for_a_seed_and_changes_with_it():
    labels = np.repeat(np.arange(3), 50)
    first = stratified_split(labels, 0.1, 0.1, seed=1)
    again = stratified_split(labels, 0.1, 0.1, seed=1)
    other = stratified_split(labels, 0.1, 0.1, seed=2)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])


def test_tiny_classes_keep_a_training_image():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    split = stratified_split(labels, 0.3, 0.5, seed=0)
    assert 0 in labels[split["train"]]


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(np.zeros(10, dtype=int), 0.6, 0.5, seed=0)


def test_rgb_image_folder_odd_sizes_become_one_rgb_size(tmp_path):
    root = write_image_folder(tmp_path / "f", {"b": (0, 0, 200), "a": (200, 0, 0)}, per_class=6)
    images, labels, classes = load_image_folder(root)
    assert classes == ["a", "b"]  # folder names, sorted
    assert images.ndim == 4 and images.shape[3] == 3
    assert images.shape[1] == images.shape[2] and 16 <= images.shape[1] <= 64
    assert np.bincount(labels).tolist() == [6, 6]
    red = images[labels == 0][..., 0].mean()
    blue = images[labels == 0][..., 2].mean()
    assert red > blue  # class "a" really holds the red images


def test_gray_image_folder_is_one_channel_and_size_can_be_forced(tmp_path):
    root = write_image_folder(tmp_path / "g", {"x": (150, 150, 150), "y": (60, 60, 60)}, per_class=4, gray=True)
    images, _, _ = load_image_folder(root, image_size=24)
    assert images.shape[1:] == (24, 24, 1)


def test_unreadable_files_and_empty_folders_are_skipped_with_a_note(tmp_path, capsys):
    root = write_image_folder(tmp_path / "f", {"a": (200, 0, 0), "b": (0, 0, 200)}, per_class=3)
    (root / "a" / "broken.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    images, labels, classes = load_image_folder(root)
    assert classes == ["a", "b"] and len(images) == 6
    err = capsys.readouterr().err
    assert "broken.png" in err and "empty" in err


def test_a_folder_with_one_class_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "f", {"only": (1, 2, 3)}, per_class=3)
    with pytest.raises(ValueError, match="at least 2"):
        load_image_folder(root)


def test_prepare_saves_split_and_reuses_it(tmp_path):
    settings = DataSettings(limit=500)
    first = prepare(settings, tmp_path)
    assert first.meta.counts == {"train": 400, "val": 50, "test": 50}
    x_train, y_train = first.split("train")
    x_test, _ = first.split("test")
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)  # no test image leaks into training
    again = prepared_or_new(settings, tmp_path)
    assert again.meta.version == first.meta.version
    assert np.array_equal(again.split("train")[1], y_train)
    changed = prepared_or_new(DataSettings(limit=500, seed=1), tmp_path)
    assert changed.meta.version != first.meta.version


def test_image_folder_path_dataset_prepares(tmp_path, rgb_folder):
    data = prepare(DataSettings(dataset=str(rgb_folder)), tmp_path / "out")
    assert data.meta.classes == ["apple", "leaf", "sky"] and data.meta.channels == 3
    assert sum(data.meta.counts.values()) == 90
