"""Which task a dataset is for, read from its layout, and the image/mask pairs of a segmentation set.

    classification   root/<class>/<image>            one sub-folder per class (at least two)
    segmentation     root/images/<name>.<ext>        every image has a mask of the same name (stem),
                     root/masks/<name>.png           in sub-folders too: images/a/1.jpg <-> masks/a/1.png;
                                                     masks are PNG (class ids), or JPEG/WebP (read as binary)
                     root/<part>/images, .../masks   the same in every top folder (a set shipped as
                                                     train/ + test/: the parts are pooled, rayloop splits)

`data.task: auto` calls `detect_task`. Built-in names: "mnist" (the embedded digits) is classification,
"segmentation-demo" (cracks generated at prepare time, train/cracks.py) is segmentation. A local folder or
any URI pyarrow opens (s3://...) is listed the same way, through cluster.storage, without reading a pixel.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

import pandas as pd
from pyarrow import fs as pafs

from cluster.storage import filesystem
from train.decode import IMAGE_SUFFIXES, MNIST

Task = Literal["classification", "segmentation"]
TASKS: tuple[Task, ...] = ("classification", "segmentation")
SEGMENTATION_DEMO = "segmentation-demo"
BUILT_IN: dict[str, Task] = {MNIST: "classification", SEGMENTATION_DEMO: "segmentation"}
IMAGES, MASKS = "images", "masks"
MASK_SUFFIX = ".png"
LOSSY_SUFFIXES = {".jpg", ".jpeg", ".webp"}  # masks read as binary (train/masks.py)
MASK_SUFFIXES = {MASK_SUFFIX} | LOSSY_SUFFIXES
SHOWN = 5  # names listed in an error message

EXPECTED = ("expected one sub-folder per class (classification) or images/ + masks/ with a PNG mask "
            "of the same name for every image, at the top or in every top folder (segmentation)")


def _shown(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _top_level(source: str) -> tuple[list[str], list[str]]:
    """(folders, files) directly in the dataset's root, hidden entries left out."""
    fs, root = filesystem(source)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"dataset {source}: not a directory ({EXPECTED})")
    entries = [e for e in fs.get_file_info(pafs.FileSelector(root)) if not e.base_name.startswith(".")]
    folders = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
    files = sorted(e.base_name for e in entries if e.type == pafs.FileType.File)
    return folders, files


def _parts(fs: pafs.FileSystem, root: str, folders: list[str]) -> list[str]:
    """The top folders that hold images/ + masks/ themselves (a segmentation set split as train/, test/)."""
    parts = []
    for folder in folders:
        inner = {e.base_name for e in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}"))
                 if e.type == pafs.FileType.Directory}
        if {IMAGES, MASKS} <= inner:
            parts.append(folder)
    return parts


def detect_task(source: str) -> Task:
    """The task a dataset's layout says it is for; a ValueError naming what was found when it says neither.

    A segmentation layout is listed in full to check that images and masks pair up (no file is opened).
    """
    if source in BUILT_IN:
        return BUILT_IN[source]
    folders, files = _top_level(source)
    seg = [f for f in folders if f in (IMAGES, MASKS)]
    others = [f for f in folders if f not in (IMAGES, MASKS)]
    if seg and others:
        raise ValueError(f"dataset {source}: mixed layout, {'/ + '.join(seg)}/ (segmentation) beside other "
                         f"folders {_shown([f + '/' for f in others])} (classes?); {EXPECTED}")
    if seg == [IMAGES, MASKS]:
        pair_images_and_masks(source)  # raises when the names do not pair up
        return "segmentation"
    if seg:
        missing = MASKS if seg == [IMAGES] else IMAGES
        raise ValueError(f"dataset {source}: found {seg[0]}/ but no {missing}/; {EXPECTED}")
    fs, root = filesystem(source)
    parts = _parts(fs, root, folders)
    if parts:
        plain = [f for f in folders if f not in parts]
        if plain:
            raise ValueError(f"dataset {source}: {_shown([f + '/' for f in parts])} hold images/ + masks/ "
                             f"(segmentation) but {_shown([f + '/' for f in plain])} do not; {EXPECTED}")
        pair_images_and_masks(source)
        return "segmentation"
    if len(folders) >= 2:
        return "classification"
    images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES]
    found = (f"one folder ({folders[0]}/)" if folders else "no folders") + \
        (f" and {len(images)} image files at the top ({_shown(images)})" if images else "")
    raise ValueError(f"dataset {source}: found {found}; {EXPECTED}")


def resolve_task(setting: str, source: str) -> Task:
    """`data.task` made definite: auto -> detect_task, or the named task (checked against the layout later)."""
    if setting == "auto":
        return detect_task(source)
    if setting not in TASKS:
        raise ValueError(f"data.task is {setting!r}; expected auto, {' or '.join(TASKS)}")
    return setting  # type: ignore[return-value]


def _files_by_stem(fs: pafs.FileSystem, root: str, folder: str) -> tuple[dict[str, str], list[str]]:
    """{path below root/folder without its suffix: path relative to root} of the image files there (other
    files are left out), and the names that occur twice."""
    by_stem: dict[str, str] = {}
    twice: list[str] = []
    for entry in fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", recursive=True)):
        if entry.type != pafs.FileType.File or entry.base_name.startswith("."):
            continue
        relative = PurePosixPath(entry.path[len(root) + 1:])
        if relative.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = str(relative.relative_to(folder).with_suffix(""))
        if stem in by_stem:
            twice.append(f"{by_stem[stem]} and {relative}")
        by_stem[stem] = str(relative)
    return by_stem, twice


def pair_images_and_masks(source: str) -> pd.DataFrame:
    """One row per image: image and mask paths relative to the root, sorted by image path.

    Raises ValueError naming a few of the offenders when an image has no mask, a mask has no image, a mask
    is not a PNG (or JPEG/WebP), or two files in one folder share a name. A set split in top folders
    (train/images, train/masks, test/...) pairs within each and pools them.
    """
    if source in BUILT_IN:
        raise ValueError(f"dataset {source} is built in: {SEGMENTATION_DEMO} is generated by prepare "
                         "(train/cracks.py); pair the folder it was written to")
    fs, root = filesystem(source)
    folders, _ = _top_level(source)
    prefixes = [""] if IMAGES in folders else [f"{part}/" for part in _parts(fs, root, folders)]
    images, masks, twice = {}, {}, []
    for prefix in prefixes:
        for folder, found in ((IMAGES, images), (MASKS, masks)):
            by_stem, repeated = _files_by_stem(fs, root, prefix + folder)
            found.update({prefix + stem: path for stem, path in by_stem.items()})
            twice.extend(repeated)
    problems = []
    if twice:
        problems.append(f"files sharing a name: {_shown(twice)}")
    other = sorted(p for p in masks.values() if PurePosixPath(p).suffix.lower() not in MASK_SUFFIXES)
    if other:
        problems.append(f"{len(other)} masks are neither PNG nor JPEG/WebP ({_shown(other)}); masks must be PNG "
                        "files of class ids (JPEG/WebP masks are read as binary)")
    no_mask = sorted(images[s] for s in images.keys() - masks.keys())
    if no_mask:
        problems.append(f"{len(no_mask)} images have no mask ({_shown(no_mask)}); "
                        f"expected masks/<same name>{MASK_SUFFIX} (or .jpg)")
    no_image = sorted(masks[s] for s in masks.keys() - images.keys())
    if no_image:
        problems.append(f"{len(no_image)} masks have no image ({_shown(no_image)})")
    if not images and not no_image:
        problems.append(f"no image files under {IMAGES}/ (image types: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if problems:
        raise ValueError(f"dataset {source}: " + "; ".join(problems))
    pairs = pd.DataFrame({"image": [images[s] for s in images], "mask": [masks[s] for s in images]})
    return pairs.sort_values("image", kind="stable").reset_index(drop=True)
