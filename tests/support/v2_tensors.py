"""Open Inference Protocol v2 bodies and answers as the official Triton and KServe clients encode them,
over images a brightness backend labels by their tenth (0.55 mean brightness -> "5")."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
from PIL import Image

HEADER = "Inference-Header-Content-Length"


def digit_png(tenth: int, size: int = 28) -> bytes:
    """A gray PNG the model labels `tenth` (its brightness is in the middle of that tenth)."""
    buf = io.BytesIO()
    Image.new("L", (size, size), round((tenth + 0.5) * 25.5)).save(buf, "PNG")
    return buf.getvalue()


def pixels(*tenths: int) -> np.ndarray:
    return np.stack([np.full((1, 28, 28), (t + 0.5) / 10, dtype=np.float32) for t in tenths])


def fp32(*tenths: int) -> dict:
    """An FP32 input tensor in JSON, one image per tenth."""
    return {"name": "input", "shape": [len(tenths), 1, 28, 28], "datatype": "FP32",
            "data": pixels(*tenths).ravel().tolist()}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def binary_request(header: dict, *tensors: bytes) -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + b"".join(tensors), {HEADER: str(len(text))}


def binary_outputs(response) -> tuple[dict, dict[str, bytes]]:
    """The JSON header and each binary output's bytes."""
    length = int(response.headers[HEADER])
    header, rest, blobs = json.loads(response.content[:length]), response.content[length:], {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[output["name"]], rest = rest[:size], rest[size:]
    assert rest == b""
    return header, blobs


def outputs(response) -> dict:
    return {o["name"]: o for o in response.json()["outputs"]}


def assert_refused(response, *codes: int) -> str:
    assert response.status_code in codes, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and body["detail"] == body["error"]
    return body["error"]
