"""Routes: a prediction's true label or corrected mask (durable before the answer), and erasing it again."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Response

from serve import schemas
from serve.http.context import Context
from serve.http.deps import GUARDED
from serve.http.sent_truth import sent_truth
from store import UnknownFeedback, UnknownPrediction
from train.tasks import FeedbackError


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["feedback"])
    store = ctx.store
    limits = ctx.settings.serve

    @api.post("/v1/feedback", status_code=201, response_model=schemas.FeedbackCreated,
              responses={**GUARDED, 404: {"model": schemas.ErrorOut, "description": "unknown prediction"},
                         409: {"model": schemas.ErrorOut, "description": "the prediction's image is gone"},
                         503: {"model": schemas.ErrorOut, "description": "the store did not take the write"}})
    async def feedback(body: schemas.FeedbackIn, actor: str = Depends(ctx.api_key)) -> schemas.FeedbackCreated:
        """The truth of a prediction, stored durably before the answer, as the served model's task takes it: its
        label, or for a segmentation model its corrected mask (`mask_png_b64` or `mask_rle`, the image's size),
        checked against its image."""
        try:
            sent = sent_truth(body, limits.max_upload_bytes)
            prediction = await asyncio.to_thread(store.get_prediction, body.prediction_id)
            label, mask = await asyncio.to_thread((await ctx.task()).truth, sent, prediction, store.blobs)
        except UnknownPrediction:
            raise HTTPException(404, f"no prediction {body.prediction_id!r}") from None
        except FeedbackError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        if label not in prediction.probabilities:
            raise HTTPException(422, f"label {label!r} is not one of the model's classes "
                                     f"{sorted(prediction.probabilities)}")
        feedback_id = await asyncio.to_thread(store.add_feedback, body.prediction_id, label, "api", actor, mask)
        if ctx.metrics is not None:
            ctx.metrics.feedback.inc()
        return schemas.FeedbackCreated(feedback_id=feedback_id)

    @api.delete("/v1/feedback/{feedback_id}", status_code=204, response_class=Response,
                responses={**GUARDED, 404: {"model": schemas.ErrorOut, "description": "unknown feedback"}})
    async def erase_feedback(feedback_id: str, actor: str = Depends(ctx.api_key)) -> Response:
        """Erase a feedback (right to erasure): the label, its prediction's image, and the label in the audit
        trail; the erasure is audited by id and actor only, and no later retrain learns from it."""
        try:
            await asyncio.to_thread(store.erase_feedback, feedback_id, actor)
        except UnknownFeedback:
            raise HTTPException(404, f"no feedback {feedback_id!r}") from None
        return Response(status_code=204)

    return api
