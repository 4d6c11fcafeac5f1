"""Images the tests send and train on, made on the fly: small PNGs and JPEGs, broken and hostile ones,
and ImageFolder trees."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = [str(i) for i in range(10)]  # the digits a tiny registered model (tests/support/registry.py) knows


def png(value: int = 128, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def noisy_png(size: int = 64) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def write_image_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int,
                       seed: int = 0, gray: bool = False) -> Path:
    """An ImageFolder whose classes differ by colour and shape, in odd sizes, PNG and JPEG mixed."""
    rng = np.random.default_rng(seed)
    for index, (name, colour) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(18, 40)), int(rng.integers(18, 40))
            pixels = rng.integers(0, 60, size=(h, w, 3)).astype(np.float32)
            y0, x0 = h // 4, w // 4
            if index % 2 == 0:
                pixels[y0:h - y0, x0:w - x0] += colour
            else:
                pixels[:, x0:w - x0] += np.array(colour) * 0.8
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            if gray:
                image = image.convert("L")
            suffix = ".png" if i % 2 else ".jpg"
            image.save(folder / f"img_{i:03d}{suffix}")
    return root
