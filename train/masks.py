"""Segmentation masks in and out: PNG files of class ids, and COCO run-length encoding.

A mask is a uint8 HxW array of class ids: 0 is background, any other value is the class of that value.
A binary mask file may store its foreground as 255 (the usual 0/255 black-and-white PNG): it reads as 0/1,
and a binary mask is written back as 0/255 so it can be viewed. A dataset's masks may also be JPEG or WebP
(public crack sets ship them so): lossy files cannot hold class ids, so they read as binary, gray >= 128 the
class (`read_mask(data, lossy=True)`); masks sent as feedback are PNG. Light imports only (numpy, PIL), because the
serving replicas read corrected masks with this module and the decode tasks read training masks with it.
Metrics over masks are in train/mask_metrics.py.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_MASK_PIXELS = 50_000_000  # a mask as large as an image may be; a header claiming more is refused unread
GRAY_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L"}  # modes whose pixel values are the class ids
COLOUR_MODES = {"LA", "RGB", "RGBA"}  # accepted when every pixel is gray (r == g == b): a saved gray mask
LOSSY_FORMATS = {"JPEG", "WEBP", "MPO"}  # read as binary masks (threshold), where a dataset allows them
LOSSY_THRESHOLD = 128  # a lossy mask's gray value from which a pixel is the class


class MaskError(ValueError):
    """A mask that cannot be used, with the reason in words a client can act on (a 4xx, never a 5xx)."""


def _class_ids(pixels: np.ndarray) -> np.ndarray:
    """Pixel values -> uint8 class ids; a mask of only 0 and 255 is binary foreground 1."""
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise MaskError(f"mask has values {int(pixels.min())}..{int(pixels.max())}; class ids must be 0..255")
    mask = pixels.astype(np.uint8)
    if mask.size and mask.max() == 255 and not np.isin(mask, (0, 255), invert=True).any():
        mask = (mask == 255).astype(np.uint8)
    return mask


def read_mask(data: bytes, lossy: bool = False) -> np.ndarray:
    """A PNG mask file -> uint8 HxW class ids (0/255 files -> 0/1). Raises MaskError with the reason.

    lossy: also take a JPEG or WebP mask (a dataset's), as binary: gray >= LOSSY_THRESHOLD is class 1, so the
    compression's ringing around a crack does not become classes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if lossy and image.format in LOSSY_FORMATS:
                return (np.asarray(image.convert("L")) >= LOSSY_THRESHOLD).astype(np.uint8)
            if image.format != "PNG":
                raise MaskError(f"mask is a {image.format or 'non-PNG'} file; masks must be PNG "
                                "(lossy formats such as JPEG blur the class ids)")
            width, height = image.size
            if width * height > MAX_MASK_PIXELS:
                raise MaskError(f"mask is {width}x{height} pixels, more than the {MAX_MASK_PIXELS:,} allowed")
            mode = image.mode
            if mode not in GRAY_MODES | COLOUR_MODES:
                raise MaskError(f"mask has pixel mode {mode}; expected a gray or palette PNG of class ids")
            pixels = np.asarray(image.convert("RGB") if mode in COLOUR_MODES else image)
    except MaskError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MaskError(f"mask is not a readable PNG image ({exc.__class__.__name__})") from exc
    if mode in COLOUR_MODES:
        if (pixels[..., 0] != pixels[..., 1]).any() or (pixels[..., 0] != pixels[..., 2]).any():
            raise MaskError(f"mask is a colour ({mode}) image; expected gray values that are class ids "
                            "(0 background, 255 or 1.. a class)")
        pixels = pixels[..., 0]
    return _class_ids(np.asarray(pixels))


def validate_mask(mask: np.ndarray, image_size: tuple[int, int], num_classes: int = 2) -> np.ndarray:
    """Check a mask against its image: same size, class ids within 0..num_classes - 1; returns it as uint8.

    image_size is (width, height), as PIL's Image.size. num_classes counts the background (2 for binary).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"mask has shape {mask.shape}; expected one channel of class ids (height x width)")
    if mask.dtype.kind not in "biu":
        raise MaskError(f"mask has {mask.dtype} values; expected integer class ids")
    height, width = mask.shape
    if (width, height) != tuple(image_size):
        raise MaskError(f"mask is {width}x{height} (width x height) but its image is "
                        f"{image_size[0]}x{image_size[1]}; a mask must have its image's size")
    outside = np.unique(mask[(mask < 0) | (mask >= num_classes)])
    if outside.size:
        shown = ", ".join(str(int(v)) for v in outside[:8]) + (", ..." if outside.size > 8 else "")
        raise MaskError(f"mask has values {shown} outside the known classes 0..{num_classes - 1} "
                        "(0 background; a binary mask may use 255 for the class)")
    return mask.astype(np.uint8)


def parse_mask(data: bytes, image_size: tuple[int, int], num_classes: int = 2) -> np.ndarray:
    """read_mask + validate_mask: a mask file sent for an image of image_size (width, height)."""
    return validate_mask(read_mask(data), image_size, num_classes)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """uint8 class ids -> PNG bytes; a binary mask (only 0 and 1) is written as 0/255 so it can be viewed."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype.kind not in "biu":
        raise MaskError(f"cannot write a mask of shape {mask.shape} and type {mask.dtype}; expected HxW integers")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise MaskError(f"cannot write mask values {int(mask.min())}..{int(mask.max())}; class ids must be 0..255")
    pixels = mask.astype(np.uint8)
    if pixels.size and pixels.max() <= 1:
        pixels = pixels * np.uint8(255)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, "PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# COCO run-length encoding of a binary mask: counts of alternating runs, background first, over the pixels in
# column-major order (down each column, then the next column). "counts" is either a list of integers (the
# uncompressed form) or COCO's compressed string (what pycocotools.mask.encode returns, as str or bytes).

def encode_rle(mask: np.ndarray, compressed: bool = False) -> dict:
    """A binary mask (non-zero = foreground) -> {"size": [h, w], "counts": [...] or "..."} as COCO writes it."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"cannot run-length encode a mask of shape {mask.shape}; expected height x width")
    flat = (mask != 0).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.r_[0, edges, flat.size]
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # the first run is background, even when it is empty
    size = [int(mask.shape[0]), int(mask.shape[1])]
    return {"size": size, "counts": _compress(counts) if compressed else [int(c) for c in counts]}


def decode_rle(rle: dict) -> np.ndarray:
    """{"size": [h, w], "counts": [...] | "..."} -> uint8 HxW 0/1. Raises MaskError when it does not add up."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise MaskError('mask_rle must be an object {"size": [height, width], "counts": [...]}')
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise MaskError(f"mask_rle size must be [height, width], two positive integers (got {size!r})")
    height, width = size
    if height * width > MAX_MASK_PIXELS:
        raise MaskError(f"mask_rle is {width}x{height} pixels, more than the {MAX_MASK_PIXELS:,} allowed")
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _decompress(counts)
    if (not isinstance(counts, (list, tuple))
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise MaskError("mask_rle counts must be a list of non-negative integers (or COCO's compressed string)")
    if sum(counts) != height * width:
        raise MaskError(f"mask_rle counts add up to {sum(counts)} pixels but size {height}x{width} has "
                        f"{height * width}")
    values = np.arange(len(counts), dtype=np.int64) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape((height, width), order="F")


def _compress(counts: list[int]) -> str:
    """COCO's string form: each count (from the fourth on, less the count two before) in 5-bit groups, low
    first, as characters 48..111; bit 0x20 says another group follows, bit 0x10 of the last one is the sign."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _decompress(text: str | bytes) -> list[int]:
    """The inverse of _compress (pycocotools' rleFrString)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MaskError("mask_rle counts string is not ASCII; expected COCO's compressed RLE") from exc
    counts: list[int] = []
    position = 0
    while position < len(text):
        x, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise MaskError("mask_rle counts string ends in the middle of a number")
            c = ord(text[position]) - 48
            if not 0 <= c < 64:
                raise MaskError(f"mask_rle counts string has {text[position]!r}; COCO uses characters 0-o only")
            x |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            position, shift = position + 1, shift + 5
            if not more and c & 0x10:
                x -= 1 << shift
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    if any(c < 0 for c in counts):
        raise MaskError("mask_rle counts string decodes to a negative run length")
    return counts


def mask_to_json(mask: np.ndarray) -> dict:
    """Class ids HxW -> {"size": [h, w], "classes": {"<id>": compressed COCO counts}} for the ids present:
    how the store keeps a corrected mask (a crack mask of a 4000 x 3000 photo is a few kB)."""
    mask = np.asarray(mask)
    ids = [int(c) for c in np.unique(mask) if c != 0]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "classes": {str(c): encode_rle(mask == c, compressed=True)["counts"] for c in ids}}


def mask_from_json(stored: dict) -> np.ndarray:
    """mask_to_json's dict -> uint8 HxW class ids."""
    height, width = stored["size"]
    mask = np.zeros((height, width), np.uint8)
    for class_id, counts in stored["classes"].items():
        mask[decode_rle({"size": [height, width], "counts": counts}) != 0] = int(class_id)
    return mask
