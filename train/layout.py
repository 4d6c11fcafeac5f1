"""Which task a dataset is for, read from its layout, and the image/mask pairs of a segmentation set.

    classification   root/<class>/<image>            one sub-folder per class (at least two)
    segmentation     root/images/<name>.<ext>        every image has a PNG mask of the same name (stem),
                     root/masks/<name>.png           in sub-folders too: images/a/1.jpg <-> masks/a/1.png

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
SHOWN = 5  # names listed in an error message

EXPECTED = ("expected one sub-folder per class (classification) or images/ + masks/ with a PNG mask "
            "of the same name for every image (segmentation)")


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
    is not a PNG, or two files in one folder share a name.
    """
    if source in BUILT_IN:
        raise ValueError(f"dataset {source} is built in: {SEGMENTATION_DEMO} is generated by prepare "
                         "(train/cracks.py); pair the folder it was written to")
    fs, root = filesystem(source)
    images, images_twice = _files_by_stem(fs, root, IMAGES)
    masks, masks_twice = _files_by_stem(fs, root, MASKS)
    problems = []
    if images_twice or masks_twice:
        problems.append(f"files sharing a name: {_shown(images_twice + masks_twice)}")
    lossy = sorted(p for p in masks.values() if PurePosixPath(p).suffix.lower() != MASK_SUFFIX)
    if lossy:
        problems.append(f"{len(lossy)} masks are not PNG ({_shown(lossy)}); masks must be PNG files")
    no_mask = sorted(images[s] for s in images.keys() - masks.keys())
    if no_mask:
        problems.append(f"{len(no_mask)} images have no mask ({_shown(no_mask)}); "
                        f"expected masks/<same name>{MASK_SUFFIX}")
    no_image = sorted(masks[s] for s in masks.keys() - images.keys())
    if no_image:
        problems.append(f"{len(no_image)} masks have no image ({_shown(no_image)})")
    if not images and not no_image:
        problems.append(f"no image files under {IMAGES}/ (image types: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if problems:
        raise ValueError(f"dataset {source}: " + "; ".join(problems))
    pairs = pd.DataFrame({"image": [images[s] for s in images], "mask": [masks[s] for s in images]})
    return pairs.sort_values("image", kind="stable").reset_index(drop=True)
