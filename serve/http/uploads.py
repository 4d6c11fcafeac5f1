"""Reading images out of a request: multipart files or base64 in JSON, every limit checked."""

from __future__ import annotations

from fastapi import HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.settings import ServeSettings
from serve import images, schemas

IMAGE_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "application/json": {"schema": schemas.ImageB64.model_json_schema()},
}, "required": True}}
BATCH_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": schemas.ImagesB64.model_json_schema()},
}, "required": True}}


def rejected(exc: images.ImageRejected, position: int | None = None) -> HTTPException:
    where = f"image {position}: " if position is not None else ""
    return HTTPException(413 if exc.too_large else 400, where + exc.detail)


async def read_images(request: Request, limits: ServeSettings, field: str, many: bool) -> list[bytes]:
    """Image bytes from multipart `field` or JSON image_b64/images_b64."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        blobs = await from_multipart(request, limits, field)
        if not many and len(blobs) > 1:
            raise HTTPException(422, f"{len(blobs)} files in `{field}`: send one, or several to /v1/predict/batch")
    elif content_type.startswith("application/json"):
        blobs = await from_json(request, limits, many)
    else:
        raise HTTPException(415, "send multipart/form-data or application/json")
    if not blobs:
        raise HTTPException(422, "no images in the batch")
    if len(blobs) > limits.max_batch_images:
        raise HTTPException(413, f"{len(blobs)} images; the limit per batch is {limits.max_batch_images}")
    for position, data in enumerate(blobs):
        try:
            images.check_size(data, limits.max_upload_bytes)
        except images.ImageRejected as exc:
            raise rejected(exc, position if many else None) from None
    return blobs


async def from_multipart(request: Request, limits: ServeSettings, field: str) -> list[bytes]:
    try:
        form = await request.form(max_files=limits.max_batch_images + 1)
    except HTTPException:
        raise  # the body ran past its limit (BodyLimit)
    except StarletteHTTPException as exc:  # Starlette's own: past max_files, or a malformed part
        if "too many files" in str(exc.detail).lower():
            raise HTTPException(413, f"more than {limits.max_batch_images} files; the limit per batch is "
                                     f"{limits.max_batch_images}") from None
        raise HTTPException(400, f"cannot parse multipart body: {exc.detail}") from None
    except Exception as exc:  # noqa: BLE001 - malformed multipart is the client's error
        raise HTTPException(400, f"cannot parse multipart body: {exc}") from None
    uploads = form.getlist(field)
    if not uploads:
        raise HTTPException(422, f"multipart field `{field}` is missing")
    blobs = []
    for upload in uploads:
        if isinstance(upload, str):
            raise HTTPException(422, f"multipart field `{field}` must be a file")
        blobs.append(await upload.read(limits.max_upload_bytes + 1))
    return blobs


async def from_json(request: Request, limits: ServeSettings, many: bool) -> list[bytes]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise HTTPException(400, "body is not valid JSON") from None
    try:
        parsed = (schemas.ImagesB64 if many else schemas.ImageB64).model_validate(body)
    except ValueError as exc:
        raise HTTPException(422, str(exc).splitlines()[0] + ": expected "
                            + ('{"images_b64": [...]}' if many else '{"image_b64": "..."}')) from None
    texts = parsed.images_b64 if many else [parsed.image_b64]
    blobs = []
    for position, text in enumerate(texts):
        try:
            blobs.append(images.from_base64(text, limits.max_upload_bytes))
        except images.ImageRejected as exc:
            raise rejected(exc, position if many else None) from None
    return blobs
