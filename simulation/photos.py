"""Synthetic "surface crack" photos: an ImageFolder of concrete-like RGB images, fast and deterministic.

`make_photo_folder(root, per_class)` writes root/<class>/<i>.jpg. Every image has a concrete texture
(smooth low-frequency mottling, finer grain, a per-image brightness and beige tint, a few pores, sometimes a
faint stain, a slight blur); images of the class "positive" also carry one to three thin, dark, irregular
crack lines (a random walk, 1-3 px wide, sometimes with a branch). Each image is drawn from its own RNG,
seeded from (seed, class name, index): the same arguments give the same bytes, and a larger `per_class`
keeps the first images unchanged. numpy + PIL only (no Ray): 300-460 images per CPU-second at 227 px, JPEG
files included (2,000 images, one process, on a shared 2-core VM; the low end under load from others).

    python -m simulation.photos OUT --per-class N [--size 227] [--jitter 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CRACK_CLASSES = {"positive", "crack", "cracked"}  # class names whose images get cracks
CHUNK = 64  # images per task when workers > 1


def _rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The image's own generator: stable across runs, processes and folder sizes."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), index])


def _mottling(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Large and medium blotches (coarse gaussian grids, bilinearly upscaled), about [-1.5, 1.5]."""
    large = Image.fromarray(rng.standard_normal((4, 4), dtype=np.float32), "F").resize((16, 16), Image.BILINEAR)
    coarse = np.asarray(large) + 0.6 * rng.standard_normal((16, 16), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((width, height), Image.BILINEAR))


def _crack_path(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random walk entering at one edge and wandering across: a crack's centre line, (n, 2) points."""
    side = int(rng.integers(4))  # enter from the left, right, top or bottom edge, heading inwards
    along = rng.uniform(0.1, 0.9)
    x, y, heading = [(0.0, along * height, 0.0), (float(width), along * height, math.pi),
                     (along * width, 0.0, math.pi / 2), (along * width, float(height), -math.pi / 2)][side]
    step = max(2.0, min(width, height) / 40)
    n = int(4 * (width + height) / step)
    headings = heading + rng.uniform(-0.6, 0.6) + np.cumsum(rng.normal(0, 0.3, n))
    lengths = step * rng.uniform(0.5, 1.5, n)
    xs = x + np.cumsum(np.cos(headings) * lengths)
    ys = y + np.cumsum(np.sin(headings) * lengths)
    outside = (xs < -step) | (xs > width + step) | (ys < -step) | (ys > height + step)
    stop = int(np.argmax(outside)) + 1 if outside.any() else n
    return np.column_stack([np.r_[x, xs[:stop]], np.r_[y, ys[:stop]]])


def _draw_cracks(rng: np.random.Generator, image: Image.Image, darkness: float) -> None:
    """Draw one to three cracks onto a gray image: 1-3 px wide, width and depth varying along each."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        points = _crack_path(rng, width, height).tolist()
        base = int(rng.integers(1, 4))
        for start in range(0, len(points) - 1, 6):  # runs of 6 segments, each with its own width and depth
            draw.line([tuple(p) for p in points[start:start + 7]], fill=int(darkness * rng.uniform(0.8, 1.25)),
                      width=min(3, max(1, base + int(rng.integers(-1, 2)))), joint="curve")
        if rng.random() < 0.4 and len(points) > 8:  # a hairline branch leaving from along the crack
            x, y = points[int(rng.integers(2, len(points) - 2))]
            headings = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.4, int(rng.integers(5, 20))))
            branch = np.column_stack([x + np.cumsum(4 * np.cos(headings)), y + np.cumsum(4 * np.sin(headings))])
            draw.line([(x, y)] + [tuple(p) for p in branch.tolist()], fill=int(darkness * 1.5), width=1)


def _stain(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A soft blob in [0, 1]: drawn at a quarter of the size, blurred, upscaled."""
    small = Image.new("L", (max(4, width // 4), max(4, height // 4)), 0)
    cx, cy = rng.uniform(0, small.width), rng.uniform(0, small.height)
    rx, ry = rng.uniform(0.1, 0.35) * small.width, rng.uniform(0.1, 0.35) * small.height
    ImageDraw.Draw(small).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    small = small.filter(ImageFilter.BoxBlur(max(1.0, min(rx, ry) / 2)))
    return np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.float32) * (1 / 255)


def render(seed: int, name: str, index: int, size: int = 227, jitter: int = 0, cracked: bool | None = None
           ) -> Image.Image:
    """One synthetic photo (RGB) of class `name`; `cracked` defaults to whether the name means cracks."""
    rng = _rng(seed, name, index)
    width, height = (size, size) if not jitter else \
        (int(rng.integers(size - jitter, size + jitter + 1)), int(rng.integers(size - jitter, size + jitter + 1)))
    cracked = name.lower() in CRACK_CLASSES if cracked is None else cracked

    # Concrete: a per-image brightness, large and medium mottling, fine grain.
    brightness, grain = rng.uniform(125, 195), rng.uniform(3, 8)
    gray = rng.integers(0, 64, (height, width), dtype=np.uint8).astype(np.float32)
    gray *= grain / 18.5  # uniform 0..63 has std 18.5: grain is the std in gray levels
    gray += brightness - grain * 1.7 + rng.uniform(6, 12) * _mottling(rng, width, height)
    if rng.random() < 0.4:  # a faint stain (either class: not a clue to the label)
        gray *= 1 - rng.uniform(0.04, 0.12) * _stain(rng, width, height)
    pores = int(rng.integers(0, 25))  # small pits, lighter than a crack
    gray[rng.integers(0, height, pores), rng.integers(0, width, pores)] *= rng.uniform(0.65, 0.85, pores)

    luminance = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L")
    if cracked:
        _draw_cracks(rng, luminance, brightness * rng.uniform(0.2, 0.4))
    luminance = luminance.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 0.6)))  # a camera's softness
    levels = np.arange(256, dtype=np.float32)  # a beige tint: red up, blue down, per image
    red = np.clip(levels * rng.uniform(1.0, 1.06), 0, 255).astype(np.uint8).tolist()
    blue = np.clip(levels * rng.uniform(0.86, 0.97), 0, 255).astype(np.uint8).tolist()
    return Image.merge("RGB", [luminance.point(red), luminance, luminance.point(blue)])


def _write_chunk(task: tuple[Path, str, int, int, int, int, int, str]) -> int:
    """Render and save images [start, stop) of one class; returns how many it wrote."""
    root, name, start, stop, seed, size, jitter, fmt = task
    folder = root / name
    for index in range(start, stop):
        image = render(seed, name, index, size, jitter)
        path = folder / f"{index}.{fmt}"
        if fmt in {"jpg", "jpeg"}:
            image.save(path, "JPEG", quality=90)
        else:
            image.save(path)
    return stop - start


def make_photo_folder(root: Path, per_class: int, size: int = 227, seed: int = 0,
                      classes: tuple[str, ...] = ("negative", "positive"), fmt: str = "jpg", workers: int = 1,
                      jitter: int = 0) -> dict[str, int]:
    """Write root/<class>/<i>.<fmt> for i < per_class; returns the count per class.

    Image sides are `size`, or each in [size - jitter, size + jitter] (non-square) when jitter > 0. Images
    of a class named positive/crack/cracked have cracks, other classes none. Existing files are overwritten.
    `workers` > 1 renders chunks of images in a process pool; the files are the same either way.
    """
    fmt = fmt.lower()
    if per_class < 0 or size < 8 or not 0 <= jitter < size - 4 or fmt not in {"jpg", "jpeg", "png"}:
        raise ValueError(f"need per_class >= 0, size >= 8, 0 <= jitter < size - 4 and fmt jpg or png (got "
                         f"{per_class}, {size}, {jitter}, {fmt!r})")
    root = Path(root)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    tasks = [(root, name, start, min(per_class, start + CHUNK), seed, size, jitter, fmt)
             for name in classes for start in range(0, per_class, CHUNK)]
    if workers > 1 and len(tasks) > 1:
        with Pool(min(workers, len(tasks))) as pool:
            sum(pool.imap_unordered(_write_chunk, tasks))
    else:
        for task in tasks:
            _write_chunk(task)
    return {name: per_class for name in classes}


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children: a rate per core on a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation.photos",
                                     description="Write a synthetic surface-crack ImageFolder.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, required=True)
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--jitter", type=int, default=0, help="each side in [size - jitter, size + jitter]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    counts = make_photo_folder(args.out, args.per_class, args.size, args.seed, fmt=args.format,
                               workers=args.workers, jitter=args.jitter)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    total = sum(counts.values())
    print(json.dumps({"out": str(args.out), "counts": counts, "seconds": round(seconds, 2),
                      "images_per_s": round(total / max(seconds, 1e-9), 1), "cpu_seconds": round(cpu, 2),
                      "images_per_cpu_s": round(total / max(cpu, 1e-9), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
