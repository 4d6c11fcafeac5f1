"""Open Inference Protocol v2 REST routes (KServe's and Triton's "predict protocol v2"), binary tensor data included.

The official clients work unchanged: the infer routes read the raw body themselves (tritonclient posts JSON with
no content-type), and every refusal is `{"error": ...}`, what both clients read; it carries `detail` too,
rayloop's usual key. serve/http/v2_codec.py has the wire format.
"""

from __future__ import annotations

import asyncio
import random

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from cluster.settings import Settings
from serve import images, schemas
from serve.http.v2_codec import HEADER, OUTPUTS, V2Error, answer, inflated, parsed
from store import Store, StoreUnavailable
from train.tasks import TASKS, task_named

PARSE_IN_THREAD_BYTES = 256 * 1024
ERRORS = {code: {"model": schemas.V2ErrorOut, "description": why} for code, why in (
    (400, "bad input"), (404, "unknown model or version"), (413, "too large"))}


def refusal(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """A v2 route: whatever refuses the request, the answer is the protocol's `{"error": ...}`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handled(request: Request) -> Response:
            try:
                return await handler(request)
            except V2Error as exc:
                return refusal(exc.status, exc.message)
            except images.ImageRejected as exc:
                return refusal(413 if exc.too_large else 400, exc.detail)
            except HTTPException as exc:  # the body ran past its limit while it streamed in (BodyLimit)
                return refusal(exc.status_code, str(exc.detail), exc.headers)
            except StoreUnavailable as exc:
                return refusal(503, str(exc), {"Retry-After": "1"})

        return handled


def inline(schema: dict) -> dict:
    """A pydantic JSON schema with its $defs written in place (an OpenAPI requestBody cannot point at them)."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node
    return resolve(schema)


INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline(schemas.InferRequest.model_json_schema())},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"JSON header ({HEADER} bytes), then tensor data"}}}}}


def router(backend, store: Store, settings: Settings) -> APIRouter:
    """The /v2 routes over a Backend (serve/http/context.py) and the store that logs every prediction."""
    limits, model_name = settings.serve, settings.registry.model_name
    # The bound BodyLimit (serve/http/context.py) puts on a /v2/models/ body, kept for the body once inflated.
    body_limit = (limits.max_upload_bytes * 4 // 3 + 65536) * limits.max_batch_images
    api = APIRouter(tags=["v2"], route_class=V2Route, responses=ERRORS)

    async def served(name: str, version: str | None) -> dict:
        """What the replicas serve, when `name` (and `version`, if given) is it; else 404."""
        if name != model_name:
            raise V2Error(404, f"unknown model {name!r}; this server has {model_name!r}")
        info = await backend.info()
        if version is not None and version != info["model_version"]:
            raise V2Error(404, f"model {name!r} has no version {version!r} here; it serves version "
                               f"{info['model_version']}")
        return info

    async def metadata(name: str, version: str | None) -> schemas.ModelMetadata:
        info = await served(name, version)
        k = len(info["classes"])
        return schemas.ModelMetadata(
            name=name, versions=[info["model_version"]], platform="pytorch",
            inputs=[schemas.TensorMetadata(name="input", datatype="FP32", shape=[-1, *info["input_shape"]])],
            outputs=[schemas.TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, k]),
                     schemas.TensorMetadata(name="label", datatype="BYTES", shape=[-1])]
            # a task's own outputs (a segmentation model's "mask") are class ids per pixel at the input size
            + [schemas.TensorMetadata(name=output, datatype="UINT8", shape=[-1, *info["input_shape"][1:]])
               for output in task_named(info.get("task")).outputs])

    async def infer(request: Request, name: str, version: str | None) -> Response:
        info = await served(name, version)
        body = inflated(await request.body(), request.headers.get("content-encoding", ""), body_limit)
        args = (body, request.headers.get(HEADER), tuple(info["input_shape"]), limits)
        # A big body is parsed in a thread: the event loop keeps serving the other requests meanwhile.
        call = parsed(*args) if len(body) < PARSE_IN_THREAD_BYTES else await asyncio.to_thread(parsed, *args)
        task = task_named(info.get("task"))
        for output in call.outputs:
            if output not in OUTPUTS and output not in task.outputs:
                owners = " or ".join(t.name for t in TASKS.values() if output in t.outputs)
                raise V2Error(400, f"output {output!r} comes from a {owners} model; this {task.name} model "
                                   f"answers {', '.join((*OUTPUTS, *task.outputs))}")
        predict = backend.predict_pixels if call.datatype == "FP32" else backend.predict_image
        # One draw for the request: during a canary all its items go to one model. A request for a version by
        # number is the champion's (served() checked): never routed to the canary.
        route = 1.0 if version is not None else random.random()
        results = await asyncio.gather(*(predict(item, route) for item in call.items), return_exceptions=True)
        for i, result in enumerate(results):
            if isinstance(result, images.ImageRejected):
                raise V2Error(413 if result.too_large else 400, f"image {i}: {result.detail}")
            if isinstance(result, BaseException):
                raise result
        if any("error" in r for r in results):
            raise V2Error(503, next(r["error"] for r in results if "error" in r))
        if len({r["model_version"] for r in results} | ({version} if version else set())) > 1:
            raise V2Error(503, "the served model version changed during the request; send it again")
        ids = [store.log_prediction(model_version=r["model_version"], label=r["label"], confidence=r["confidence"],
                                    probabilities=r["probabilities"], features=r.get("features"),
                                    image=item if call.datatype == "BYTES" else None,
                                    prediction_id=r.get("prediction_id"))
               for item, r in zip(call.items, results)]
        if settings.store.durable_predictions:  # answered once logged for good, as /v1/predict is
            await store.recorded(ids)  # or StoreUnavailable: a 503 the client may send again
        return answer(name, results, call)

    @api.get("/v2", response_model=schemas.ServerMetadata)
    async def server_metadata() -> schemas.ServerMetadata:
        return schemas.ServerMetadata(name="rayloop", version="0.1.0", extensions=["binary_tensor_data"])

    @api.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready() -> dict:
        try:
            await backend.info()
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason
            raise V2Error(503, f"not ready: {type(exc).__name__}: {str(exc)[:200]}") from None
        return {"ready": True}

    @api.get("/v2/models/{name}", response_model=schemas.ModelMetadata)
    async def model_metadata(name: str) -> schemas.ModelMetadata:
        """Inputs: FP32 [-1,C,H,W] in [0,1]; or BYTES [-1] of image files (base64 text in JSON)."""
        return await metadata(name, None)

    @api.get("/v2/models/{name}/versions/{version}", response_model=schemas.ModelMetadata)
    async def model_version_metadata(name: str, version: str) -> schemas.ModelMetadata:
        return await metadata(name, version)

    @api.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> dict:
        await served(name, None)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(name: str, version: str) -> dict:
        await served(name, version)
        return {"name": name, "version": version, "ready": True}

    @api.post("/v2/models/{name}/infer", response_model=schemas.InferResponse, openapi_extra=INFER_BODY)
    async def model_infer(name: str, request: Request) -> Response:
        """FP32 [N,C,H,W] pixels in [0,1], or BYTES [N] image files; JSON or binary tensor data, either way."""
        return await infer(request, name, None)

    @api.post("/v2/models/{name}/versions/{version}/infer", response_model=schemas.InferResponse,
              openapi_extra=INFER_BODY)
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    return api
