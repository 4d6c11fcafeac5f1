"""The embedded segmentation set: surface photos with thin branching cracks and their exact masks.

`make_crack_set(root, count)` writes root/images/<i>.png (RGB) and root/masks/<i>.png (0/255), the layout
train/layout.py reads as segmentation. Each crack is a random walk drawn as runs of 1-5 px width, with
branches that leave it and taper; the mask is drawn with the very same strokes, so it is exact: a pixel
is crack in the mask if and only if a crack stroke covered it (a slight camera blur then softens the
photo, never the mask). About one image in ten has no crack.

Every image comes from two generators seeded from (seed, index): one for the cracks, one for the surface,
whose texture family (`texture`) is the knob for a shift: the same seed with another texture gives the
same cracks on another surface. The same arguments give the same bytes; a larger `count` keeps the first
images unchanged. numpy + PIL only.

    python -m train.cracks OUT --count N [--size 128] [--texture concrete] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from train.masks import encode_mask_png

TEXTURES = ("concrete", "asphalt", "steel")
MAX_WIDTH = 5  # px, the widest crack stroke
RUN = 5  # segments per stroke of one width and depth
CHUNK = 64  # images per task when workers > 1


def _rngs(seed: int, index: int, texture: str) -> tuple[np.random.Generator, np.random.Generator]:
    """(cracks, surface) generators: the cracks do not depend on the texture, the surface does."""
    return (np.random.default_rng([seed, index, 0]),
            np.random.default_rng([seed, index, 1, zlib.crc32(texture.encode())]))


def _smooth_noise(rng: np.random.Generator, cells: tuple[int, int], width: int, height: int) -> np.ndarray:
    """A gaussian grid of cells (across, down) upscaled bilinearly to width x height: blotches, about N(0, 1)."""
    grid = rng.standard_normal((cells[1], cells[0]), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((width, height), Image.BILINEAR))


def _grain(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Fine per-pixel noise with unit standard deviation."""
    return rng.standard_normal((height, width), dtype=np.float32)


def _concrete(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Beige-gray, mottled at two scales, fine grain and a few pores."""
    gray = rng.uniform(125, 195) + rng.uniform(3, 7) * _grain(rng, size, size)
    gray += rng.uniform(5, 10) * _smooth_noise(rng, (4, 4), size, size)
    gray += rng.uniform(2, 5) * _smooth_noise(rng, (16, 16), size, size)
    pores = int(rng.integers(0, max(2, size**2 // 2000)))
    gray[rng.integers(0, size, pores), rng.integers(0, size, pores)] *= rng.uniform(0.7, 0.85, pores)
    return gray, (rng.uniform(1.0, 1.06), rng.uniform(0.86, 0.97))


def _asphalt(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Dark and coarse: strong grain, light stones of aggregate, little tint."""
    gray = rng.uniform(70, 110) + rng.uniform(8, 14) * _grain(rng, size, size)
    gray += rng.uniform(3, 6) * _smooth_noise(rng, (6, 6), size, size)
    stones = _smooth_noise(rng, (max(4, size // 3), max(4, size // 3)), size, size)
    gray += rng.uniform(18, 30) * np.clip(stones - 1.2, 0, None)
    return gray, (rng.uniform(0.98, 1.02), rng.uniform(0.98, 1.04))


def _steel(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Brushed metal: light, bluish, with streaks along one direction."""
    streaks = _smooth_noise(rng, (max(2, size // 32), size), size, size)
    gray = rng.uniform(120, 175) + rng.uniform(4, 9) * streaks + rng.uniform(1.5, 3) * _grain(rng, size, size)
    gray += rng.uniform(3, 8) * _smooth_noise(rng, (3, 3), size, size)
    if rng.random() < 0.5:
        gray = gray.T.copy()  # brushed up and down instead of across
    return gray, (rng.uniform(0.92, 0.98), rng.uniform(1.02, 1.08))


SURFACES = {"concrete": _concrete, "asphalt": _asphalt, "steel": _steel}


def _walk(rng: np.random.Generator, start: tuple[float, float], heading: float, steps: int, step: float,
          wiggle: float, limit: float) -> np.ndarray:
    """A random walk of up to `steps` steps from `start`, stopping once it leaves the image; (n, 2) points."""
    headings = heading + np.cumsum(rng.normal(0, wiggle, steps))
    lengths = step * rng.uniform(0.6, 1.4, steps)
    xs = start[0] + np.cumsum(np.cos(headings) * lengths)
    ys = start[1] + np.cumsum(np.sin(headings) * lengths)
    outside = (xs < -step) | (xs > limit + step) | (ys < -step) | (ys > limit + step)
    stop = int(np.argmax(outside)) + 1 if outside.any() else steps
    return np.column_stack([np.r_[start[0], xs[:stop]], np.r_[start[1], ys[:stop]]])


def _main_crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """A crack entering at one edge (or starting inside) and wandering across."""
    step = max(2.0, size / 40)
    along = rng.uniform(0.1, 0.9) * size
    if rng.random() < 0.8:
        side = int(rng.integers(4))
        x, y, heading = [(0.0, along, 0.0), (float(size), along, math.pi),
                         (along, 0.0, math.pi / 2), (along, float(size), -math.pi / 2)][side]
        heading += rng.uniform(-0.6, 0.6)
    else:
        x, y, heading = rng.uniform(0.2, 0.8) * size, along, rng.uniform(0, 2 * math.pi)
    return _walk(rng, (x, y), heading, int(3 * size / step), step, 0.25, size)


def _widths(rng: np.random.Generator, runs: int, base: int, taper: bool) -> list[int]:
    """One width per run: wandering +-1 around `base`, narrowing towards the end of a branch."""
    widths = base + np.cumsum(rng.integers(-1, 2, runs)) // 2
    if taper:
        widths = np.minimum(widths, np.ceil(base * (1 - np.arange(runs) / max(1, runs))).astype(int))
    return np.clip(widths, 1, MAX_WIDTH).tolist()


def _strokes(rng: np.random.Generator, size: int) -> list[tuple[np.ndarray, list[int]]]:
    """The cracks of one image as (centre line, width per run of RUN segments); empty for a crack-free one."""
    strokes = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        line = _main_crack(rng, size)
        base = int(rng.choice([1, 2, 3, 4, 5], p=[0.25, 0.25, 0.2, 0.15, 0.15]))
        widths = _widths(rng, math.ceil((len(line) - 1) / RUN), base, taper=False)
        strokes.append((line, widths))
        for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.3, 0.35, 0.25, 0.1]))):
            if len(line) < 6:
                break
            at = int(rng.integers(2, len(line) - 2))
            dx, dy = line[at + 1] - line[at - 1]
            heading = math.atan2(dy, dx) + rng.choice([-1, 1]) * rng.uniform(0.35, 1.2)
            branch = _walk(rng, tuple(line[at]), heading, int(rng.integers(5, 25)), max(2.0, size / 40), 0.3, size)
            parent = widths[min(len(widths) - 1, (at - 1) // RUN)]
            strokes.append((branch, _widths(rng, math.ceil((len(branch) - 1) / RUN), max(1, parent - 1), True)))
    return strokes


def _draw(strokes: list[tuple[np.ndarray, list[int]]], rng: np.random.Generator, photo: Image.Image,
          mask: Image.Image, darkness: float) -> None:
    """Draw every stroke onto the photo (dark, depth varying per run) and the mask (1) alike."""
    on_photo, on_mask = ImageDraw.Draw(photo), ImageDraw.Draw(mask)
    for line, widths in strokes:
        points = [tuple(p) for p in line.tolist()]
        for run, width in enumerate(widths):
            part = points[run * RUN:run * RUN + RUN + 1]
            fill = int(np.clip(darkness * rng.uniform(0.8, 1.25), 0, 255))
            radius = (width - 1) / 2  # a round cap where runs of different widths meet
            for draw, value in ((on_photo, fill), (on_mask, 1)):
                draw.line(part, fill=value, width=width, joint="curve")
                if width > 2:
                    x, y = part[0]
                    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=value)


def render(seed: int, index: int, size: int = 128, texture: str = "concrete", crack_free: float = 0.1
           ) -> tuple[Image.Image, np.ndarray]:
    """One photo (RGB, size x size) and its mask (uint8 0/1, crack = 1)."""
    if texture not in SURFACES:
        raise ValueError(f"texture {texture!r}: expected one of {', '.join(TEXTURES)}")
    cracks, surface = _rngs(seed, index, texture)
    gray, (red_gain, blue_gain) = SURFACES[texture](surface, size)
    photo = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L")
    mask = Image.new("L", (size, size), 0)
    if cracks.random() >= crack_free:
        darkness = float(gray.mean()) * cracks.uniform(0.15, 0.45)
        _draw(_strokes(cracks, size), cracks, photo, mask, darkness)
    photo = photo.filter(ImageFilter.BoxBlur(surface.uniform(0.3, 0.6)))  # a camera's softness
    levels = np.arange(256, dtype=np.float32)
    red = np.clip(levels * red_gain, 0, 255).astype(np.uint8).tolist()
    blue = np.clip(levels * blue_gain, 0, 255).astype(np.uint8).tolist()
    return Image.merge("RGB", [photo.point(red), photo, photo.point(blue)]), np.asarray(mask, dtype=np.uint8)


def _write_chunk(task: tuple[Path, int, int, int, int, str, float]) -> int:
    """Render and save images [start, stop) with their masks; returns how many it wrote."""
    root, start, stop, seed, size, texture, crack_free = task
    for index in range(start, stop):
        photo, mask = render(seed, index, size, texture, crack_free)
        photo.save(root / "images" / f"{index}.png", compress_level=1)
        (root / "masks" / f"{index}.png").write_bytes(encode_mask_png(mask))
    return stop - start


def make_crack_set(root: Path, count: int, size: int = 128, seed: int = 0, texture: str = "concrete",
                   workers: int = 1, crack_free: float = 0.1) -> int:
    """Write root/images/<i>.png and root/masks/<i>.png for i < count; returns count.

    `crack_free` is the share of images without a crack. `workers` > 1 renders chunks of images in a
    process pool; the files are the same either way. Existing files of those names are overwritten.
    """
    if count < 0 or size < 16 or texture not in SURFACES or not 0 <= crack_free <= 1:
        raise ValueError(f"need count >= 0, size >= 16, texture in {TEXTURES} and 0 <= crack_free <= 1 "
                         f"(got {count}, {size}, {texture!r}, {crack_free})")
    root = Path(root)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    tasks = [(root, start, min(count, start + CHUNK), seed, size, texture, crack_free)
             for start in range(0, count, CHUNK)]
    if workers > 1 and len(tasks) > 1:
        with Pool(min(workers, len(tasks))) as pool:
            sum(pool.imap_unordered(_write_chunk, tasks))
    else:
        for task in tasks:
            _write_chunk(task)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.cracks",
                                     description="Write a synthetic surface-crack segmentation set.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texture", default="concrete", choices=TEXTURES)
    parser.add_argument("--crack-free", type=float, default=0.1, help="share of images without a crack")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    count = make_crack_set(args.out, args.count, args.size, args.seed, args.texture, args.workers, args.crack_free)
    seconds = time.perf_counter() - started
    print(json.dumps({"out": str(args.out), "count": count, "texture": args.texture, "seconds": round(seconds, 2),
                      "images_per_s": round(count / max(seconds, 1e-9), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
