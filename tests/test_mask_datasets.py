"""Segmentation sets as public crack sets ship them: split into top folders (train/, test/), masks as JPEG.
In process, no Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cluster.settings import DataSettings
from train.data import prepare
from train.layout import detect_task, pair_images_and_masks
from train.masks import MaskError, read_mask

SIZE = 40


def crack_mask(seed: int) -> np.ndarray:
    """0/255: a 3-px diagonal band somewhere in the image."""
    y, x = np.mgrid[:SIZE, :SIZE]
    return np.where(np.abs(y - x - (seed % 9) + 4) <= 1, 255, 0).astype(np.uint8)


def jpeg(array: np.ndarray, quality: int = 75) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_split_set(root, parts=("train", "test"), per_part: int = 6):
    """root/<part>/images/<i>.jpg and root/<part>/masks/<i>.jpg, as the usual public crack sets are laid out."""
    rng = np.random.default_rng(0)
    truth = {}
    for part in parts:
        for folder in ("images", "masks"):
            (root / part / folder).mkdir(parents=True)
        for i in range(per_part):
            mask = crack_mask(i)
            photo = np.clip(rng.normal(150, 10, (SIZE, SIZE, 3)) - (mask[..., None] > 0) * 90, 0, 255)
            (root / part / "images" / f"{i}.jpg").write_bytes(jpeg(photo.astype(np.uint8), 90))
            (root / part / "masks" / f"{i}.jpg").write_bytes(jpeg(mask))
            truth[f"{part}/images/{i}.jpg"] = mask > 0
    return truth


def test_a_jpeg_mask_reads_as_binary_where_a_dataset_allows_it_and_never_as_feedback():
    mask = crack_mask(3)
    data = jpeg(mask, quality=50)
    ringing = np.unique(np.asarray(Image.open(io.BytesIO(data))))
    assert len(ringing) > 2  # the compression made gray values that would be classes if read as ids
    read = read_mask(data, lossy=True)
    assert set(np.unique(read)) == {0, 1} and (read == (mask > 0)).mean() > 0.98
    with pytest.raises(MaskError, match="masks must be PNG"):
        read_mask(data)


def test_a_set_split_in_top_folders_with_jpeg_masks_is_segmentation_and_prepares_pooled(tmp_path):
    truth = write_split_set(tmp_path / "cracks")
    source = str(tmp_path / "cracks")
    assert detect_task(source) == "segmentation"
    pairs = pair_images_and_masks(source)
    assert pairs["image"].tolist()[:2] == ["test/images/0.jpg", "test/images/1.jpg"]
    assert (pairs["mask"] == pairs["image"].str.replace("/images/", "/masks/")).all() and len(pairs) == 12

    data = prepare(DataSettings(dataset=source, val_fraction=0.2, test_fraction=0.2), tmp_path / "prepared")
    assert data.meta.task == "segmentation" and data.meta.classes == ["background", "foreground"]
    assert data.meta.image_size == SIZE and sum(data.meta.counts.values()) == 12
    seen = 0
    for split in ("train", "val", "test"):
        rows = data.rows(split)
        for batch in data.batches(split):
            for path, mask in zip(rows["path"], batch["mask"]):
                assert set(np.unique(mask)) <= {0, 1} and (mask == truth[path]).mean() > 0.98
                seen += 1
    assert seen == 12


def test_a_split_set_with_a_top_folder_lacking_masks_is_refused_naming_it(tmp_path):
    write_split_set(tmp_path / "cracks")
    (tmp_path / "cracks" / "extra").mkdir()
    (tmp_path / "cracks" / "extra" / "1.jpg").write_bytes(jpeg(crack_mask(1)))
    with pytest.raises(ValueError, match=r"train/ hold images/ \+ masks/ \(segmentation\) but extra/ do not"):
        detect_task(str(tmp_path / "cracks"))


def test_an_unreadable_mask_at_prepare_is_named(tmp_path):
    write_split_set(tmp_path / "cracks", parts=("train",), per_part=3)
    colour = np.zeros((SIZE, SIZE, 3), np.uint8)
    colour[..., 0] = crack_mask(0)  # a red crack on black: not class ids
    buffer = io.BytesIO()
    Image.fromarray(colour).save(buffer, format="PNG")
    (tmp_path / "cracks" / "train" / "masks" / "0.jpg").unlink()
    (tmp_path / "cracks" / "train" / "masks" / "0.png").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"mask train/masks/0.png: mask is a colour \(RGB\) image"):
        prepare(DataSettings(dataset=str(tmp_path / "cracks")), tmp_path / "prepared")
