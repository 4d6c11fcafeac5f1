"""The Open Inference Protocol v2 wire format, as the official clients (tritonclient.http, kserve) use it.

Pure functions, no I/O: a raw request body becomes a `Call`; predictions become the response body.
- JSON is taken whatever the content-type says, or with none (tritonclient sends none).
- Binary tensor data: the JSON header (its length in `Inference-Header-Content-Length`), then each input's
  raw bytes, `parameters.binary_data_size` long: FP32 little-endian, BYTES as elements each led by a
  4-byte little-endian length. Outputs come back the same way when asked with `binary_data: true`.
- Neither client will put bytes that are not UTF-8 (any PNG or JPEG) in JSON, so a BYTES element in JSON is
  the base64 text of an image file; in binary it is the file itself (its base64 text is taken too).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from fastapi import Response
from pydantic import ValidationError

from serve import images, schemas

HEADER = "Inference-Header-Content-Length"
OUTPUTS = ("probabilities", "label")
MASK = "mask"  # a segmentation model's extra output: UINT8 [N, H, W] class ids at the model's input size


class V2Error(Exception):
    """A refusal with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Call:
    """An infer request, parsed: the images to classify and the outputs wanted (name -> as binary)."""

    id: str | None
    datatype: str
    items: list  # FP32: CxHxW float32 arrays; BYTES: encoded image files
    outputs: dict[str, bool]
    chosen: bool = False  # outputs named by the request (else the defaults: all the model has)


def inflated(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before compression (tritonclient's request_compression_algorithm), at most `limit`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(415, f"content-encoding {encoding!r} is not supported: send gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise V2Error(400, f"the body is not valid {encoding} data") from None
    if len(data) > limit:
        raise V2Error(413, f"the body inflates past the limit of {limit} bytes")
    return data


def parsed(body: bytes, header_length: str | None, shape: tuple[int, ...], limits) -> Call:
    """Raw request body (JSON, or JSON header + binary tensor data) -> Call; V2Error for bad input."""
    binary = b""
    if header_length is not None:
        digits = header_length.strip()
        if not (digits.isascii() and digits.isdigit() and len(digits) < 20 and 0 < int(digits) <= len(body)):
            raise V2Error(400, f"{HEADER} must be the JSON header's length, from 1 to {len(body)}")
        body, binary = body[:int(digits)], body[int(digits):]
    try:
        request = schemas.InferRequest.model_validate(json.loads(body))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and ValidationError are ValueErrors
        reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]) \
            if isinstance(exc, ValidationError) else "not JSON"
        raise V2Error(400, f"invalid inference request: {reason}") from None
    if len(request.inputs) != 1:
        raise V2Error(400, f"{len(request.inputs)} inputs; this model takes one")
    [tensor] = request.inputs
    raw = binary_part(tensor, binary)
    if tensor.datatype == "FP32":
        items = pixel_batch(tensor, raw, shape, limits)
    elif tensor.datatype == "BYTES":
        items = image_files(tensor, raw, limits)
    else:
        raise V2Error(400, f"datatype {tensor.datatype!r} is not supported: send FP32 [N, "
                           f"{', '.join(map(str, shape))}] pixels in [0, 1], or BYTES [N] image files")
    return Call(request.id, tensor.datatype, items, requested(request), bool(request.outputs))


def binary_part(tensor: schemas.InferInput, binary: bytes) -> bytes | None:
    """The input's bytes after the JSON header, or None when its data is in the JSON."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise V2Error(400, f"{len(binary)} bytes follow the JSON header, but no input has binary_data_size")
        if tensor.data is None:
            raise V2Error(400, f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
        return None
    if tensor.data is not None:
        raise V2Error(400, f"input {tensor.name!r} has both data and parameters.binary_data_size")
    if type(size) is not int or size != len(binary):
        raise V2Error(400, f"input {tensor.name!r} has binary_data_size {size!r}, but {len(binary)} bytes "
                           f"follow the JSON header")
    return binary


def pixel_batch(tensor: schemas.InferInput, raw: bytes | None, shape: tuple[int, ...], limits) -> list[np.ndarray]:
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != shape or tensor.shape[0] < 1:
        raise V2Error(400, f"FP32 input shape {tensor.shape} must be [N, {', '.join(map(str, shape))}]")
    if tensor.shape[0] > limits.max_batch_images:
        raise V2Error(413, f"{tensor.shape[0]} images; the limit is {limits.max_batch_images}")
    count = math.prod(tensor.shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise V2Error(400, f"binary FP32 input of {len(raw)} bytes; shape {tensor.shape} takes {4 * count}")
        pixels = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        if len(tensor.data) > count:  # refused before numpy copies a huge list
            raise V2Error(400, f"{len(tensor.data)} values do not fit shape {tensor.shape}")
        try:
            pixels = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise V2Error(400, "FP32 data must be numbers") from None
        if pixels.size != count:
            raise V2Error(400, f"{pixels.size} values do not fill shape {tensor.shape}")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise V2Error(400, "FP32 pixels must be finite and in [0, 1]")
    return list(pixels.reshape(tensor.shape))


def image_files(tensor: schemas.InferInput, raw: bytes | None, limits) -> list[bytes]:
    most = limits.max_batch_images
    elements = unpacked(raw, most) if raw is not None else flattened(tensor.data)
    if len(elements) > most:
        raise V2Error(413, f"{len(elements)} images; the limit is {most}")
    if not elements or math.prod(tensor.shape) != len(elements):
        raise V2Error(400, f"{len(elements)} BYTES elements for shape {tensor.shape}; send [N] image files, N >= 1")
    files = []
    for i, element in enumerate(elements):
        if raw is None:
            if not isinstance(element, str):
                raise V2Error(400, f"BYTES element {i} in JSON must be a string: the base64 text of an image file")
            try:
                element = images.from_base64(element, limits.max_upload_bytes)
            except images.ImageRejected as exc:
                if exc.too_large:
                    raise
                raise V2Error(400, f"BYTES element {i} is not base64: JSON carries an image file as its base64 "
                                   f"text (or send it as binary data)") from None
        elif element.isascii():  # a file's base64 text rather than the file: PNG, JPEG, ... never are ASCII
            try:
                element = images.from_base64(element.decode(), limits.max_upload_bytes)
            except images.ImageRejected as exc:
                if exc.too_large:
                    raise
        images.check_size(element, limits.max_upload_bytes)
        files.append(element)
    return files


def unpacked(raw: bytes, most: int) -> list[bytes]:
    """BYTES binary data -> elements (each led by its 4-byte little-endian length); stops past `most`."""
    elements, offset = [], 0
    while offset < len(raw) and len(elements) <= most:
        if offset + 4 > len(raw):
            raise V2Error(400, "BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise V2Error(400, f"BYTES element {len(elements)} says {length} bytes; {len(raw) - offset} are left")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def flattened(data: list) -> list:
    """Nested JSON lists -> their elements in row-major order (iterative: nesting depth costs no stack)."""
    out, stack = [], [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            out.append(element)
        else:
            stack.pop()
    return out


def requested(request: schemas.InferRequest) -> dict[str, bool]:
    """Output name -> binary?: per output `binary_data`, else the request's `binary_data_output`."""
    binary = flag(request.parameters or {}, "binary_data_output", False)
    if not request.outputs:
        return {name: binary for name in OUTPUTS}
    chosen = {}
    for output in request.outputs:
        if output.name not in (*OUTPUTS, MASK):
            raise V2Error(400, f"unknown output {output.name!r}; expected {' or '.join(OUTPUTS)} (and {MASK} "
                               "from a segmentation model)")
        parameters = output.parameters or {}
        if parameters.get("classification"):
            raise V2Error(400, "the classification extension is not supported: ask for label and probabilities")
        chosen[output.name] = flag(parameters, "binary_data", binary)
    return chosen


def flag(parameters: dict, key: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise V2Error(400, f"parameter {key} must be true or false")
    return value


def packed(datatype: str, data: list) -> bytes:
    """Output data as the binary tensor data extension lays it out."""
    if datatype == "FP32":
        return np.asarray(data, dtype="<f4").tobytes()
    if datatype == "UINT8":
        return np.asarray(data, dtype=np.uint8).tobytes()
    return b"".join(struct.pack("<I", len(e)) + e for e in (s.encode() for s in data))


def answer(model_name: str, results: list[dict], call: Call) -> Response:
    """The infer response: all JSON, or (any output binary) the JSON header then the binary outputs."""
    classes = list(results[0]["probabilities"])
    tensors = {"probabilities": ("FP32", [len(results), len(classes)],
                                 [r["probabilities"][c] for r in results for c in classes]),
               "label": ("BYTES", [len(results)], [r["label"] for r in results])}
    wanted = dict(call.outputs)
    if MASK in results[0]:
        masks = np.stack([r[MASK] for r in results]).astype(np.uint8)
        tensors[MASK] = ("UINT8", list(masks.shape), masks.ravel().tolist())
        if not call.chosen:
            wanted[MASK] = next(iter(call.outputs.values()))
    outputs, blobs = [], []
    for name, binary in wanted.items():
        datatype, shape, data = tensors[name]
        if binary:
            blobs.append(packed(datatype, data))
            outputs.append(schemas.InferOutput(name=name, datatype=datatype, shape=shape,
                                               parameters={"binary_data_size": len(blobs[-1])}))
        else:
            outputs.append(schemas.InferOutput(name=name, datatype=datatype, shape=shape, data=data))
    header = schemas.InferResponse(model_name=model_name, model_version=results[0]["model_version"], id=call.id,
                                   outputs=outputs).model_dump_json(exclude_none=True).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER: str(len(header))})
