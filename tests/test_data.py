"""Data: the embedded MNIST set, any ImageFolder, and a split that is stratified and stable."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cluster.settings import DataSettings
from tests.support.images import write_image_folder
from train.data import assign_splits, load_mnist, prepare, prepared_or_new


def load_image_folder(root, image_size: int = 0, channels: int = 0):
    """A small folder prepared and decoded whole: what training would see, split aside."""
    data = prepare(DataSettings(dataset=str(root), image_size=image_size, channels=channels), root.parent / "prep")
    parts = [data.split(name) for name in ("train", "val", "test")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), data.meta.classes


def test_embedded_mnist_is_5000_balanced_digits():
    images, labels, classes = load_mnist()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    assert classes == [str(d) for d in range(10)]
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.mean() > 10  # real strokes, not blanks


def paths(n: int, classes: int = 5) -> tuple[pd.Series, pd.Series]:
    return pd.Series([f"c{i % classes}/{i:05d}.png" for i in range(n)]), pd.Series(np.arange(n) % classes)


def test_split_is_stratified_disjoint_and_complete():
    files, labels = paths(5000)
    split = assign_splits(files, labels, val_fraction=0.1, test_fraction=0.2, seed=7)
    assert set(split) == {"train", "val", "test"} and len(split) == len(files)  # every file exactly once
    for name, fraction in (("test", 0.2), ("val", 0.1)):
        for label in range(5):
            share = (split[labels.to_numpy() == label] == name).mean()
            assert share == pytest.approx(fraction, abs=0.04)  # every class cut at the same fractions


def test_split_is_stable_for_a_seed_and_changes_with_it():
    files, labels = paths(300, classes=3)
    first = assign_splits(files, labels, 0.1, 0.1, seed=1)
    assert (assign_splits(files, labels, 0.1, 0.1, seed=1) == first).all()
    assert not (assign_splits(files, labels, 0.1, 0.1, seed=2) == first).all()


def test_added_files_never_move_an_earlier_file_between_splits():
    files, labels = paths(400)
    before = assign_splits(files, labels, 0.1, 0.2, seed=3)
    more, more_labels = paths(900)
    after = assign_splits(more, more_labels, 0.1, 0.2, seed=3)
    assert (after[:400] == before).all()


def test_tiny_classes_keep_a_training_image():
    files = pd.Series(["a/1.png", "a/2.png"] + [f"b/{i}.png" for i in range(8)])
    labels = pd.Series([0, 0] + [1] * 8)
    split = assign_splits(files, labels, 0.3, 0.65, seed=0)
    assert "train" in split[:2]


def test_bad_fractions_are_refused():
    files, labels = paths(10)
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(files, labels, 0.6, 0.5, seed=0)


def test_rgb_image_folder_odd_sizes_become_one_rgb_size(tmp_path):
    root = write_image_folder(tmp_path / "f", {"b": (0, 0, 200), "a": (200, 0, 0)}, per_class=6)
    images, labels, classes = load_image_folder(root)
    assert classes == ["a", "b"]  # folder names, sorted
    assert images.ndim == 4 and images.shape[3] == 3
    assert images.shape[1] == images.shape[2] and 16 <= images.shape[1] <= 40  # the median short side
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
    with pytest.raises(ValueError, match=r"found one folder \(only/\)"):
        load_image_folder(root)


def test_prepare_saves_split_and_reuses_it(tmp_path):
    settings = DataSettings(limit=500)
    first = prepare(settings, tmp_path)
    counts = first.meta.counts
    assert sum(counts.values()) == 500 and 30 <= counts["test"] <= 70 and 30 <= counts["val"] <= 70
    assert (tmp_path / "manifest.csv").is_file() and not (tmp_path / "dataset.npz").exists()
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


def test_the_version_changes_when_a_file_changes_and_not_otherwise(tmp_path, rgb_folder):
    first = prepare(DataSettings(dataset=str(rgb_folder)), tmp_path / "a")
    assert prepare(DataSettings(dataset=str(rgb_folder)), tmp_path / "b").meta.version == first.meta.version
    victim = next((rgb_folder / "leaf").iterdir())
    Image.new("RGB", (31, 29), (1, 2, 3)).save(victim)  # same name, new pixels
    changed = prepare(DataSettings(dataset=str(rgb_folder)), tmp_path / "c")
    assert changed.meta.version != first.meta.version
    assert changed.manifest["path"].tolist() == first.manifest["path"].tolist()


def test_the_manifest_records_every_file_with_its_split_and_no_pixels(tmp_path, rgb_folder):
    data = prepare(DataSettings(dataset=str(rgb_folder)), tmp_path / "out")
    saved = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert list(saved.columns) == ["path", "label", "split", "bytes", "mtime_ns"]
    assert len(saved) == 90 and saved["path"].str.startswith(("apple/", "leaf/", "sky/")).all()
    assert (saved["bytes"] > 0).all()
    x, y = data.split("test")
    assert len(x) == data.meta.counts["test"] and x.dtype == np.uint8


def test_auto_size_is_the_median_short_side_up_to_224(tmp_path):
    from simulation.photos import make_photo_folder

    make_photo_folder(tmp_path / "big", per_class=3, size=260, fmt="png")
    assert prepare(DataSettings(dataset=str(tmp_path / "big")), tmp_path / "p1").meta.image_size == 224
    make_photo_folder(tmp_path / "mid", per_class=5, size=120, jitter=20, fmt="png")
    sides = [min(Image.open(p).size) for p in sorted((tmp_path / "mid").rglob("*.png"))]
    mid = prepare(DataSettings(dataset=str(tmp_path / "mid")), tmp_path / "p2")
    assert mid.meta.image_size == int(np.median(sides))


def test_pixel_statistics_are_streamed_and_match_the_whole_set():
    from train.train import pixel_statistics

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    batches = ({"image": images[i:i + 64]} for i in range(0, 300, 64))
    mean, std = pixel_statistics(batches, 3)
    whole = images.reshape(-1, 3) / 255.0
    assert np.allclose(mean.numpy(), whole.mean(0), atol=1e-5)
    assert np.allclose(std.numpy(), whole.std(0), atol=1e-5)


def test_a_model_built_with_pretrained_weights_keeps_their_normalisation(tmp_path, monkeypatch):
    import torch
    import torchvision

    from cluster.settings import load_settings
    from simulation.photos import make_photo_folder
    from train.train import build_model

    make_photo_folder(tmp_path / "photos", per_class=4, size=100, fmt="png")
    weights = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(weights, tmp_path / "weights.pt")
    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path / "data"), "RAYLOOP_DATASET": str(tmp_path / "photos"),
                              "RAYLOOP_MODEL_ARCH": "mobilenet_v3_small",
                              "RAYLOOP_MODEL_WEIGHTS": str(tmp_path / "weights.pt")})
    data = prepare(settings.data, settings.prepared_dir)

    model = build_model(settings, data)

    assert model.image_size == 100 and model.pretrained
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    first = next(k for k in weights if k.endswith("weight"))
    assert torch.equal(model.backbone.state_dict()[first], weights[first])


def test_the_stream_buffer_is_not_part_of_the_data_version(tmp_path):
    first = prepare(DataSettings(limit=200), tmp_path / "a")
    other = prepare(DataSettings(limit=200, stream_buffer_mb=64), tmp_path / "b")
    assert other.meta.version == first.meta.version
