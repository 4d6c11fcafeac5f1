"""Datasets as manifests: which file, which class, which split. Pixels are decoded only when streamed.

A prepared dataset is `manifest.csv` (path, label, split, bytes, mtime_ns per image) and `meta.json`
(classes, pixel format, counts, version). Nothing here holds the images in memory: training reads
them through Ray Data (train/ingest.py), small local reads go through `Decoder` batch by batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from cluster.settings import DataSettings
from cluster.storage import filesystem
from train.cracks import make_crack_set
from train.decode import MNIST, Decoder, load_mnist, local_batches
from train.layout import BUILT_IN, SEGMENTATION_DEMO, resolve_task
from train.tasks import Task, task_named

SPLITS = ("train", "val", "test")
MAX_AUTO_SIZE = 224
MANIFEST_COLUMNS = ["path", "label", "split", "bytes", "mtime_ns"]
DEMO_COUNT, DEMO_SIZE = 800, 96  # the generated crack set: images, px


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
    root: str = ""  # where manifest paths are relative to ("" for the embedded digits)
    task: str = "classification"  # train/tasks: "segmentation" adds a `mask` column to the manifest

    @property
    def kind(self) -> Task:
        """The task the data is for (train/tasks)."""
        return task_named(self.task)


def demo_folder(out_dir: Path, seed: int) -> str:
    """The generated crack set (train/cracks.py) beside the manifest, made once per seed."""
    folder = out_dir / SEGMENTATION_DEMO
    stamp = {"count": DEMO_COUNT, "size": DEMO_SIZE, "seed": seed, "texture": "concrete"}
    made = folder / "made.json"
    if not made.is_file() or json.loads(made.read_text()) != stamp:
        print(f"[rayloop] generating the {SEGMENTATION_DEMO} set: {DEMO_COUNT} crack photos and masks, "
              f"{DEMO_SIZE} px, seed {seed}", flush=True)
        made.unlink(missing_ok=True)
        make_crack_set(folder, DEMO_COUNT, size=DEMO_SIZE, seed=seed, texture="concrete")
        made.write_text(json.dumps(stamp) + "\n")
    return str(folder.resolve())


def auto_size(short_sides: list[int]) -> int:
    """The data's median short side, at most 224 (the standard stems' size) and at least 16."""
    return int(min(MAX_AUTO_SIZE, max(16, int(np.median(short_sides)))))


def _unit_hash(seed: int, keys: pd.Series) -> np.ndarray:
    """A number in [0, 1) per key, fixed by the key and the seed alone."""
    return np.array([int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:12], 16) / 16**12 for k in keys])


def assign_splits(paths: pd.Series, labels: pd.Series, val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """train/val/test per file by a hash of its path: a file added later never moves an old one.

    Stratified in expectation (every class is cut by the same thresholds); a class that would be
    left without a training image gives its highest-hash file to train.
    """
    if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum to less than 1")
    u = _unit_hash(seed, paths)
    split = np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))
    for label in np.unique(labels):
        members = np.flatnonzero(labels.to_numpy() == label)
        if not (split[members] == "train").any():
            split[members[np.argmax(u[members])]] = "train"
    return split.astype(object)


def subset(paths: pd.Series, labels: pd.Series, limit: int, seed: int) -> np.ndarray:
    """Boolean mask of a class-balanced subset of about `limit` files (the lowest hashes per class)."""
    keep = np.ones(len(paths), dtype=bool)
    if limit <= 0 or limit >= len(paths):
        return keep
    keep[:] = False
    u = _unit_hash(seed + 1, paths)
    for label in np.unique(labels):
        members = np.flatnonzero(labels.to_numpy() == label)
        take = max(1, int(round(limit * len(members) / len(paths))))
        keep[members[np.argsort(u[members])[:take]]] = True
    return keep


def _fingerprint(settings: DataSettings) -> dict:
    source = settings.dataset
    if source not in (MNIST, SEGMENTATION_DEMO) and "://" not in source:
        source = str(Path(source).expanduser().resolve())
    fields = asdict(settings)
    fields.pop("stream_buffer_mb")  # how the data is streamed, not which data
    return {**fields, "dataset": source}


@dataclass
class PreparedData:
    """A prepared dataset: its meta and its manifest (one row per image, no pixels)."""

    meta: DatasetMeta
    manifest: pd.DataFrame

    def rows(self, split: str) -> pd.DataFrame:
        """path + label (+ mask) of a split, in a fixed shuffled order (classes mixed, so any prefix is a sample)."""
        part = self.manifest[self.manifest["split"] == split]
        order = np.argsort(_unit_hash(self.meta.settings.get("seed", 0) + 2, part["path"]), kind="stable")
        columns = ["path", "label", *self.meta.kind.columns]
        return part.iloc[order][columns].reset_index(drop=True)

    def decoder(self) -> "Decoder":
        meta = self.meta
        return Decoder(meta.root, meta.image_size, meta.channels, meta.kind.mask_classes(meta.classes))

    def batches(self, split: str, batch_size: int = 256, limit: int | None = None) -> Iterator[dict]:
        """Decode a split in this process, batch by batch: {"image": uint8 NxHxWxC, "label": int64} (+ "mask":
        uint8 NxHxW class ids for segmentation)."""
        rows = self.rows(split).iloc[:limit]
        masks = rows["mask"].to_numpy() if "mask" in rows else None
        yield from local_batches(self.decoder(), rows["path"].to_numpy(), rows["label"].to_numpy(), batch_size,
                                 masks)

    def split(self, name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A whole split as arrays: for small sets (tests, the simulator), not for training."""
        parts = list(self.batches(name, limit=limit))
        meta = self.meta
        if not parts:
            return np.zeros((0, meta.image_size, meta.image_size, meta.channels), np.uint8), np.zeros(0, np.int64)
        target = meta.kind.target
        return np.concatenate([p["image"] for p in parts]), np.concatenate([p[target] for p in parts])


def _mnist_manifest() -> tuple[list[str], pd.DataFrame]:
    _, labels, classes = load_mnist()
    paths = [f"{MNIST}/{i:05d}" for i in range(len(labels))]
    return classes, pd.DataFrame({"path": paths, "label": labels, "bytes": 784, "mtime_ns": 0})


def build_manifest(settings: DataSettings, out_dir: Path | None = None) -> tuple[DatasetMeta, pd.DataFrame]:
    """List, check and split the configured dataset; the version is the hash of what was decided.

    The generated crack set is written below `out_dir` (the prepared folder) first.
    """
    task = task_named(resolve_task(settings.task, settings.dataset))
    source = settings.dataset
    if source == SEGMENTATION_DEMO:
        source = demo_folder(out_dir if out_dir is not None else Path("data/prepared"), settings.seed)
    if source == MNIST:
        if task.name != BUILT_IN[MNIST]:
            raise ValueError(f"data.task={settings.task}: the embedded digits are a {BUILT_IN[MNIST]} set")
        classes, files = _mnist_manifest()
        size, channels, root = settings.image_size or 28, settings.channels or 1, MNIST
    else:
        classes, files, sides, gray = task.scan(source)
        if settings.dataset == SEGMENTATION_DEMO:
            classes = ["background", "crack"]
        size = settings.image_size or auto_size(sides)
        channels = settings.channels or (1 if gray else 3)
        root = filesystem(source)[1] if "://" not in source else source
    files = files[subset(files["path"], files["label"], settings.limit, settings.seed)].reset_index(drop=True)
    files["split"] = assign_splits(files["path"], files["label"], settings.val_fraction,
                                   settings.test_fraction, settings.seed)
    columns = MANIFEST_COLUMNS + list(task.columns)
    files = files.sort_values("path", kind="stable").reset_index(drop=True)[columns]
    digest = hashlib.sha256(files.to_csv(index=False).encode())
    digest.update(json.dumps([classes, size, channels]).encode())
    counts = {s: int((files["split"] == s).sum()) for s in SPLITS}
    meta = DatasetMeta(source=settings.dataset, classes=classes, image_size=int(size), channels=int(channels),
                       counts=counts, version=digest.hexdigest()[:12], settings=_fingerprint(settings), root=root,
                       task=task.name)
    return meta, files


def prepare(settings: DataSettings, out_dir: Path) -> PreparedData:
    """Write the manifest and meta under out_dir (the DVC `prepare` stage)."""
    meta, manifest = build_manifest(settings, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("dataset.npz",):  # the array file of rayloop before manifests
        (out_dir / stale).unlink(missing_ok=True)
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    (out_dir / "meta.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return PreparedData(meta, manifest)


def load_prepared(out_dir: Path) -> PreparedData:
    """Read a dataset saved by prepare()."""
    meta = DatasetMeta(**json.loads((out_dir / "meta.json").read_text()))
    manifest = pd.read_csv(out_dir / "manifest.csv", dtype={"path": str, "split": str, "mask": str})
    return PreparedData(meta, manifest)


def prepared_or_new(settings: DataSettings, out_dir: Path) -> PreparedData:
    """Reuse the saved manifest when it was made with the same settings, else prepare anew.

    Files added to the folder since are picked up by `rayloop prepare` (they join a split without
    moving any earlier file).
    """
    meta_path = out_dir / "meta.json"
    if meta_path.is_file() and (out_dir / "manifest.csv").is_file():
        saved = json.loads(meta_path.read_text())
        if saved.get("settings") == _fingerprint(settings) and "root" in saved:
            return load_prepared(out_dir)
    return prepare(settings, out_dir)
