"""simulation.photos: synthetic surface-crack photo folders, deterministic, with cracks only in positives."""

import json

import numpy as np
import pytest
from PIL import Image

from simulation.photos import main, make_photo_folder, render


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def dark_fraction(image: Image.Image) -> float:
    """Share of pixels far darker than the image's median: crack pixels, not texture."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    return float((gray < 0.55 * np.median(gray)).mean())


def test_writes_an_image_folder_of_rgb_photos_at_the_size(tmp_path):
    counts = make_photo_folder(tmp_path / "photos", per_class=4)
    assert counts == {"negative": 4, "positive": 4}
    assert files(tmp_path / "photos") == [f"{c}/{i}.jpg" for c in ("negative", "positive") for i in range(4)]
    for path in (tmp_path / "photos").rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (227, 227)
            pixels = np.asarray(image, dtype=np.float32)
        assert 60 < pixels.mean() < 230 and pixels.std() > 2  # textured, neither blank nor saturated
        assert pixels[..., 0].mean() > pixels[..., 2].mean()  # beige-gray: more red than blue


def test_png_other_classes_and_size(tmp_path):
    counts = make_photo_folder(tmp_path / "p", per_class=2, size=64, classes=("a", "b", "c"), fmt="png")
    assert counts == {"a": 2, "b": 2, "c": 2}
    assert len(list((tmp_path / "p").rglob("*.png"))) == 6
    with Image.open(tmp_path / "p" / "c" / "1.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_same_bytes_and_a_larger_folder_keeps_the_first_images(tmp_path):
    make_photo_folder(tmp_path / "small", per_class=3, seed=5)
    make_photo_folder(tmp_path / "again", per_class=3, seed=5)
    make_photo_folder(tmp_path / "large", per_class=7, seed=5, workers=2)  # a pool writes the same files
    make_photo_folder(tmp_path / "other", per_class=3, seed=6)
    for name in files(tmp_path / "small"):
        first = (tmp_path / "small" / name).read_bytes()
        assert (tmp_path / "again" / name).read_bytes() == first
        assert (tmp_path / "large" / name).read_bytes() == first
        assert (tmp_path / "other" / name).read_bytes() != first
    assert len(files(tmp_path / "large")) == 14


def test_jitter_gives_sides_in_range_not_always_square(tmp_path):
    make_photo_folder(tmp_path / "j", per_class=10, size=100, jitter=20)
    sizes = []
    for path in (tmp_path / "j").rglob("*.jpg"):
        with Image.open(path) as image:
            sizes.append(image.size)
    assert all(80 <= side <= 120 for size in sizes for side in size)
    assert len(set(sizes)) > 5 and any(w != h for w, h in sizes)
    short = sorted(min(size) for size in sizes)
    assert 80 <= short[len(short) // 2] < 100  # the median short side sits below the nominal size


def test_positives_have_dark_crack_pixels_negatives_do_not():
    positive = [dark_fraction(render(0, "positive", i)) for i in range(12)]
    negative = [dark_fraction(render(0, "negative", i)) for i in range(12)]
    assert min(positive) > 0.0005  # every positive has a visible crack
    assert max(negative) < 0.0005
    assert np.mean(positive) > 0.003
    # not a brightness cue: the classes' overall brightness overlaps
    means = {c: [np.asarray(render(0, c, i)).mean() for i in range(12)] for c in ("positive", "negative")}
    assert abs(np.mean(means["positive"]) - np.mean(means["negative"])) < 20


@pytest.mark.parametrize("kwargs", [{"per_class": -1}, {"per_class": 1, "jitter": 300}, {"per_class": 1, "fmt": "gif"}])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_photo_folder(tmp_path, **kwargs)


def test_cli_writes_the_folder_and_reports_counts(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--per-class", "3", "--size", "48", "--workers", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"negative": 3, "positive": 3} and report["images_per_s"] > 0
    assert len(files(tmp_path / "cli")) == 6
