"""What bench/serve.py serves in each of its modes, and how its section of bench/RESULTS.md names it.

    digits (the default)  the registry's champion (--mlflow-uri) on 200 test digits as PNGs
    --photos PER_CLASS    the default photo model, trained here, on 200 generated 227-px JPEG crack photos
    --segmentation        the crack U-Net, trained here on the generated crack set, on 200 unseen 96-px PNG
                          crack photos: every target answers with the mask at the upload's size and its area

Before a target is timed, `check_answer` posts one upload to it and refuses to go on unless the answer carries
what this mode's answers must (for segmentation: mask_png_b64 decoding to the upload's width x height), so the
benchmark never compares a target that skips part of the work with one that does it.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench import uploads

ANSWER = ("label", "confidence", "probabilities", "model_version")
MASK_ANSWER = ("mask_png_b64", "area_pixels", "area_percent", "width", "height")


@dataclass
class Workload:
    section: str  # its section of bench/RESULTS.md
    title: str
    traffic: str  # what the requests send, for the record
    system_goal: str
    script: Path  # the wrk script
    probe: bytes  # the upload check_answer sends
    kind: str  # png | jpeg
    mlflow_uri: str
    env: dict = field(default_factory=dict)  # for every target: the dataset its champion was trained on
    cost: dict | None = None  # bench.uploads.decode_cost's figures
    segmentation: bool = False
    masks: dict = field(default_factory=dict)  # target -> the mask it answered for `probe` (segmentation)


def digits(workdir: Path, mlflow_uri: str) -> Workload:
    files = uploads.sample_pngs()
    return Workload("bench/serve.py", "## Serving: /v1/predict, the whole system and Serve alone vs plain FastAPI",
                    "one multipart PNG per request, 200 different test digits in turn",
                    "goal >= 1.5x, p99 no worse, zero errors", uploads.wrk_script(workdir / "predict.lua", files),
                    files[0], "png", mlflow_uri)


def photos(workdir: Path, per_class: int) -> Workload:
    folder, uri = uploads.photo_champion(workdir, per_class)
    files = uploads.photo_uploads(folder)
    cost = uploads.decode_cost(files, uri)
    traffic = ("one multipart JPEG per request, 200 different generated 227-px crack photos in turn (mean "
               "{upload_kb:.1f} KiB), served by the default model for them (`model.arch: auto` -> {arch} at "
               "{size} px, trained by the benchmark)").format(**cost)
    return Workload("bench/serve.py:photos", "## Serving the default photo model: 227-px JPEG uploads, the whole "
                    "system and Serve alone vs FastAPI", traffic, "goal >= 1.0x, p99 no worse",
                    uploads.wrk_script(workdir / "predict.lua", files, "jpeg"), files[0], "jpeg", uri,
                    {"RAYLOOP_DATASET": str(folder)}, cost)


def segmentation(workdir: Path) -> Workload:
    from train.layout import SEGMENTATION_DEMO

    uri = uploads.crack_champion(workdir)
    files = uploads.crack_uploads()
    cost = uploads.decode_cost(files, uri)
    traffic = ("one multipart PNG per request, 200 different generated 96-px concrete crack photos in turn (seed 5, "
               "unseen in training; mean {upload_kb:.1f} KiB), served by the segmentation model trained by the "
               "benchmark on `segmentation-demo` at its default epochs ({arch} at {size} px); every target answers "
               "with the mask at the upload's size as a PNG and its area (the baseline calls the same "
               "train.tasks.segmentation.mask_fields)").format(**cost)
    return Workload("bench/serve.py:segmentation", "## Serving segmentation: 96-px crack photos, masks in the "
                    "answer, the whole system and Serve alone vs FastAPI", traffic, "goal >= 1.0x, p99 no worse",
                    uploads.wrk_script(workdir / "predict.lua", files), files[0], "png", uri,
                    {"RAYLOOP_DATASET": SEGMENTATION_DEMO}, cost, segmentation=True)


def check_answer(name: str, url: str, workload: Workload) -> None:
    """POST the probe upload to a started target; a RuntimeError unless the answer is a 200 with this mode's
    fields (for segmentation: a mask PNG of the upload's width x height, matching its width and height fields)."""
    request = urllib.request.Request(url, data=uploads.multipart(workload.probe, workload.kind), method="POST",
                                     headers={"Content-Type": uploads.CONTENT_TYPE})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    except OSError as exc:
        raise RuntimeError(f"{name}: the check request failed: {exc}") from None
    expected = ANSWER + (MASK_ANSWER if workload.segmentation else ())
    missing = [key for key in expected if key not in answer]
    if missing:
        raise RuntimeError(f"{name} answered without {missing}: {sorted(answer)}")
    if not workload.segmentation:
        return
    with Image.open(io.BytesIO(workload.probe)) as upload:
        size = upload.size
    try:
        with Image.open(io.BytesIO(base64.b64decode(answer["mask_png_b64"]))) as image:
            mask = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{name}: mask_png_b64 is not a PNG: {exc}") from None
    if mask.shape[::-1] != size or (answer["width"], answer["height"]) != size:
        raise RuntimeError(f"{name}: mask {mask.shape[1]}x{mask.shape[0]}, width x height {answer['width']}x"
                           f"{answer['height']}, for an upload of {size[0]}x{size[1]}")
    workload.masks[name] = mask


def notes(workload: Workload) -> list[str]:
    """The record's lines on what one request costs and on the answers checked before the timed rounds."""
    if workload.cost is None:
        return []
    lines = ["", "Per request, measured in the benchmark's process on one thread: decoding and resizing the upload "
             "{decode_ms:.2f} ms; the model's forward pass on one image {forward_ms:.1f} ms".format(**workload.cost)
             + ("; the mask fields (scaled to the upload, PNG, area) {mask_ms:.2f} ms.".format(**workload.cost)
                if "mask_ms" in workload.cost else ".")]
    if workload.masks:
        width, height = next(iter(workload.masks.values())).shape[::-1]
        reference = workload.masks.get("baseline", next(iter(workload.masks.values())))
        differ = {name: int(np.count_nonzero(mask != reference)) for name, mask in workload.masks.items()}
        lines += ["", f"Checked before each target was timed: its answer to the same upload carried mask_png_b64 at "
                  f"the upload's {width}x{height} with area and size fields; pixels differing from the baseline's "
                  "mask: " + ", ".join(f"{name} {count}" for name, count in differ.items()) + "."]
    return lines
