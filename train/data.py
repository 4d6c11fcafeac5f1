"""Datasets as manifests: which file, which class, which split. Pixels are decoded only when streamed.

A prepared dataset is `manifest.csv` (path, label, split, bytes, mtime_ns per image) and `meta.json`
(classes, pixel format, counts, version). Nothing here holds the images in memory: training reads
them through Ray Data (train/ingest.py), small local reads go through `Decoder` batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pyarrow import fs as pafs

from cluster.settings import DataSettings
from cluster.storage import filesystem
from train.cracks import make_crack_set
from train.decode import IMAGE_SUFFIXES, MNIST, Decoder, load_mnist, local_batches
from train.masks import read_mask
from train.task import SEGMENTATION_DEMO, pair_images_and_masks, resolve_task
from train.transforms import is_grayscale

SPLITS = ("train", "val", "test")
MAX_AUTO_SIZE = 224
MANIFEST_COLUMNS = ["path", "label", "split", "bytes", "mtime_ns"]
MASK_SAMPLE = 64  # masks read at prepare time to learn a segmentation set's classes
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
    task: str = "classification"  # or "segmentation": the manifest then has a `mask` column

    @property
    def segmentation(self) -> bool:
        return self.task == "segmentation"


def _list_files(source: str) -> tuple[list[str], pd.DataFrame]:
    """Class names and one row per image file (path relative to the root, label, bytes, mtime)."""
    fs, root = filesystem(source)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"dataset {source}: not a directory (expected one sub-folder per class)")
    folders = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root))
                     if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    rows = []
    for label, name in enumerate(folders):
        for entry in fs.get_file_info(pafs.FileSelector(f"{root}/{name}", recursive=True)):
            if entry.type == pafs.FileType.File and Path(entry.path).suffix.lower() in IMAGE_SUFFIXES:
                rows.append((entry.path[len(root) + 1:], label, entry.size,
                             int(entry.mtime_ns or 0)))
    return folders, pd.DataFrame(rows, columns=["path", "label", "bytes", "mtime_ns"])


def _probe(fs: pafs.FileSystem, path: str) -> tuple[int, bool] | str:
    """(short side, grayscale) from the image header, or the reason it cannot be read."""
    try:
        with fs.open_input_file(path) as handle, Image.open(handle) as image:
            return min(image.size), is_grayscale(image)
    except (UnidentifiedImageError, OSError) as exc:
        return f"{path}: {exc}"


def scan_image_folder(source: str) -> tuple[list[str], pd.DataFrame, list[int], bool]:
    """List an ImageFolder and read every header: (classes, readable files, short sides, all gray).

    Headers only (a few hundred bytes per file), in threads, so listing 40,000 photos takes seconds.
    Unreadable files and folders without images are skipped with a note on stderr.
    """
    folders, files = _list_files(source)
    fs, root = filesystem(source)
    if len(files) > 2000:
        print(f"dataset {source}: reading {len(files)} image headers", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=16) as pool:
        probes = list(pool.map(lambda p: _probe(fs, f"{root}/{p}"), files["path"]))
    broken = [p for p in probes if isinstance(p, str)]
    if broken:
        print(f"dataset {source}: skipped {len(broken)} unreadable files, e.g. {broken[0]}", file=sys.stderr)
    ok = np.array([not isinstance(p, str) for p in probes], dtype=bool)
    files = files[ok].reset_index(drop=True)
    good = [p for p in probes if not isinstance(p, str)]
    used = sorted(set(files["label"]))
    empty = [name for i, name in enumerate(folders) if i not in used]
    if empty:
        print(f"dataset {source}: ignoring folders with no images: {', '.join(empty)}", file=sys.stderr)
    if len(used) < 2:
        raise ValueError(f"dataset {source}: need at least 2 class folders with images, found {len(used)}")
    files["label"] = files["label"].map({old: new for new, old in enumerate(used)})
    return [folders[i] for i in used], files, [side for side, _ in good], all(gray for _, gray in good)


def mask_classes(fs: pafs.FileSystem, root: str, masks: pd.Series) -> list[str]:
    """A segmentation set's class names from a sample of its masks: background plus one per class id up to
    the largest seen (0/255 and 0/1 masks are binary: "foreground")."""
    picked = masks.iloc[np.unique(np.linspace(0, len(masks) - 1, min(MASK_SAMPLE, len(masks))).astype(int))]
    largest = 1
    for path in picked:
        with fs.open_input_stream(f"{root}/{path}") as handle:
            largest = max(largest, int(read_mask(handle.read()).max(initial=0)))
    return ["background"] + (["foreground"] if largest == 1 else [f"class_{i}" for i in range(1, largest + 1)])


def scan_segmentation_folder(source: str) -> tuple[list[str], pd.DataFrame, list[int], bool]:
    """List images/ + masks/ and read every image header: (classes, readable rows with a `mask` column,
    short sides, all gray). Classes come from a sample of the masks (mask_classes)."""
    pairs = pair_images_and_masks(source)
    fs, root = filesystem(source)
    infos = fs.get_file_info([f"{root}/{p}" for p in pairs["image"]])
    files = pd.DataFrame({"path": pairs["image"], "label": 0, "bytes": [i.size for i in infos],
                          "mtime_ns": [int(i.mtime_ns or 0) for i in infos], "mask": pairs["mask"]})
    with ThreadPoolExecutor(max_workers=16) as pool:
        probes = list(pool.map(lambda p: _probe(fs, f"{root}/{p}"), files["path"]))
    broken = [p for p in probes if isinstance(p, str)]
    if broken:
        print(f"dataset {source}: skipped {len(broken)} unreadable images, e.g. {broken[0]}", file=sys.stderr)
    files = files[[not isinstance(p, str) for p in probes]].reset_index(drop=True)
    good = [p for p in probes if not isinstance(p, str)]
    if files.empty:
        raise ValueError(f"dataset {source}: no readable image under images/")
    return mask_classes(fs, root, files["mask"]), files, [side for side, _ in good], all(g for _, g in good)


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
        columns = ["path", "label"] + (["mask"] if self.meta.segmentation else [])
        return part.iloc[order][columns].reset_index(drop=True)

    def decoder(self) -> "Decoder":
        classes = len(self.meta.classes) if self.meta.segmentation else 0
        return Decoder(self.meta.root, self.meta.image_size, self.meta.channels, classes)

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
        target = "mask" if meta.segmentation else "label"
        return np.concatenate([p["image"] for p in parts]), np.concatenate([p[target] for p in parts])


def _mnist_manifest() -> tuple[list[str], pd.DataFrame]:
    _, labels, classes = load_mnist()
    paths = [f"{MNIST}/{i:05d}" for i in range(len(labels))]
    return classes, pd.DataFrame({"path": paths, "label": labels, "bytes": 784, "mtime_ns": 0})


def build_manifest(settings: DataSettings, out_dir: Path | None = None) -> tuple[DatasetMeta, pd.DataFrame]:
    """List, check and split the configured dataset; the version is the hash of what was decided.

    The generated crack set is written below `out_dir` (the prepared folder) first.
    """
    task = resolve_task(settings.task, settings.dataset)
    source = settings.dataset
    if source == SEGMENTATION_DEMO:
        source = demo_folder(out_dir if out_dir is not None else Path("data/prepared"), settings.seed)
    if source == MNIST:
        if task != "classification":
            raise ValueError(f"data.task={settings.task}: the embedded digits are a classification set")
        classes, files = _mnist_manifest()
        size, channels, root = settings.image_size or 28, settings.channels or 1, MNIST
    else:
        scan = scan_segmentation_folder if task == "segmentation" else scan_image_folder
        classes, files, sides, gray = scan(source)
        if settings.dataset == SEGMENTATION_DEMO:
            classes = ["background", "crack"]
        size = settings.image_size or auto_size(sides)
        channels = settings.channels or (1 if gray else 3)
        root = filesystem(source)[1] if "://" not in source else source
    files = files[subset(files["path"], files["label"], settings.limit, settings.seed)].reset_index(drop=True)
    files["split"] = assign_splits(files["path"], files["label"], settings.val_fraction,
                                   settings.test_fraction, settings.seed)
    columns = MANIFEST_COLUMNS + (["mask"] if task == "segmentation" else [])
    files = files.sort_values("path", kind="stable").reset_index(drop=True)[columns]
    digest = hashlib.sha256(files.to_csv(index=False).encode())
    digest.update(json.dumps([classes, size, channels]).encode())
    counts = {s: int((files["split"] == s).sum()) for s in SPLITS}
    meta = DatasetMeta(source=settings.dataset, classes=classes, image_size=int(size), channels=int(channels),
                       counts=counts, version=digest.hexdigest()[:12], settings=_fingerprint(settings), root=root,
                       task=task)
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
