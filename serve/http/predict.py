"""Routes: health, and classifying one image or a batch (each prediction logged with its image)."""

from __future__ import annotations

import asyncio
import random

from fastapi import APIRouter, HTTPException, Request

from serve import images, schemas
from serve.http.context import Context
from serve.http.uploads import BATCH_BODY, IMAGE_BODY, read_images, rejected
from train.tasks import Task


def router(ctx: Context) -> APIRouter:
    api = APIRouter()
    limits = ctx.settings.serve

    async def predicted(data: bytes, route: float, position: int | None = None) -> dict:
        """The backend's answer for one image; a refusal as the HTTP error (naming its place in a batch)."""
        try:
            result = await ctx.backend.predict_image(data, route)
        except images.ImageRejected as exc:
            raise rejected(exc, position) from None
        if "error" in result:
            raise HTTPException(503, (f"image {position}: " if position is not None else "") + result["error"])
        return result

    def logged(task: Task, data: bytes, result: dict) -> schemas.Prediction:
        prediction_id = ctx.store.log_prediction(
            model_version=result["model_version"], label=result["label"], confidence=result["confidence"],
            probabilities=result["probabilities"], features=result.get("features"), image=data,
            prediction_id=result.get("prediction_id"))  # set by a rollout that scored both models on it
        answer = {k: result[k] for k in ("label", "confidence", "probabilities", "model_version")}
        return schemas.Prediction(prediction_id=prediction_id, **answer, **task.response_fields(result, data))

    async def recorded(predictions: list[schemas.Prediction]) -> list[schemas.Prediction]:
        """Answered only once durable (store.durable_predictions): an id a client holds is in the store.
        One the store did not take is a 503 (StoreUnavailable), and the client sends the request again."""
        if ctx.settings.store.durable_predictions:
            await ctx.store.recorded([p.prediction_id for p in predictions])
        return predictions

    @api.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """200 once a model is loaded."""
        info = await ctx.backend.info()
        return {"status": "ok", "model_version": info["model_version"]}

    @api.post("/v1/predict", response_model=schemas.Prediction, response_model_exclude_none=True,
              tags=["predict"], openapi_extra=IMAGE_BODY)
    async def predict(request: Request) -> schemas.Prediction:
        """Classify one image (multipart `file` or JSON `image_b64`); the model's task may add to the answer
        (a segmentation model: the mask at the image's size, `mask_png_b64`, and its area)."""
        [data] = await read_images(request, limits, "file", many=False)
        result = await predicted(data, random.random())
        [prediction] = await recorded([logged(await ctx.task(), data, result)])
        return prediction

    @api.post("/v1/predict/batch", response_model=schemas.PredictionBatch, response_model_exclude_none=True,
              tags=["predict"], openapi_extra=BATCH_BODY)
    async def predict_batch(request: Request) -> schemas.PredictionBatch:
        """Classify several images (multipart `files` or JSON `images_b64`); all or nothing."""
        blobs = await read_images(request, limits, "files", many=True)
        route = random.random()  # one model answers the whole batch, even during a canary
        answers = await asyncio.gather(*(predicted(b, route, i) for i, b in enumerate(blobs)),
                                       return_exceptions=True)
        for answer in answers:  # the first refusal, in order; nothing is logged unless every image passed
            if isinstance(answer, BaseException):
                raise answer
        task = await ctx.task()
        return schemas.PredictionBatch(predictions=await recorded([logged(task, data, result)
                                                                   for data, result in zip(blobs, answers)]))

    return api
