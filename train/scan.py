"""Listing a dataset folder for its manifest: one row per image, from file listings and image headers only.

    scan_image_folder          root/<class>/<image>: classes from the folders
    scan_segmentation_folder   root/images + root/masks paired by name (train/layout.py): classes from a sample
                               of the masks

Headers only (a few hundred bytes per file), in threads, so listing 40,000 photos takes seconds; no pixel is
decoded. Each task's `scan` (train/tasks) is one of these.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from pyarrow import fs as pafs

from cluster.storage import filesystem
from train.decode import IMAGE_SUFFIXES
from train.layout import LOSSY_SUFFIXES, pair_images_and_masks
from train.masks import LOSSY_THRESHOLD, MaskError, read_mask
from train.transforms import is_grayscale

MASK_SAMPLE = 64  # masks read at prepare time to learn a segmentation set's classes
Scan = tuple[list[str], pd.DataFrame, list[int], bool]  # classes, files, short sides, all gray


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


def scan_image_folder(source: str) -> Scan:
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
        try:
            with fs.open_input_stream(f"{root}/{path}") as handle:
                largest = max(largest, int(read_mask(handle.read(), lossy=True).max(initial=0)))
        except (MaskError, OSError) as exc:
            raise ValueError(f"mask {path}: {exc}") from None
    lossy = [p for p in masks if PurePosixPath(p).suffix.lower() in LOSSY_SUFFIXES]
    if lossy:
        print(f"[rayloop] {len(lossy)} masks are JPEG/WebP (e.g. {lossy[0]}): read as binary, gray >= "
              f"{LOSSY_THRESHOLD} is the class", file=sys.stderr, flush=True)
    return ["background"] + (["foreground"] if largest == 1 else [f"class_{i}" for i in range(1, largest + 1)])


def scan_segmentation_folder(source: str) -> Scan:
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
