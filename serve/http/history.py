"""Routes: prediction history, paged by offset or by cursor, one prediction with its feedback, and its image."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from serve import images, schemas
from serve.http.context import Context
from serve.http.deps import GUARDED
from store import Prediction, UnknownPrediction

# Offsets past this are refused (422) rather than handed to a database integer that cannot hold them.
MAX_OFFSET = 2**31 - 1


def encode_cursor(created_at: datetime, prediction_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), prediction_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, prediction_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(at), str(prediction_id)
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise HTTPException(400, "invalid cursor") from None


def record(p: Prediction) -> schemas.PredictionRecord:
    return schemas.PredictionRecord(
        prediction_id=p.id, label=p.label, confidence=p.confidence, probabilities=p.probabilities,
        model_version=p.model_version, created_at=p.created_at, features=p.features, image_sha256=p.blob_key,
        feedback=[schemas.FeedbackOut(feedback_id=f.id, label=f.label, created_at=f.created_at, source=f.source)
                  for f in p.feedback])


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["history"])
    store = ctx.store

    @api.get("/v1/predictions", response_model=schemas.PredictionPage)
    async def predictions(limit: int = Query(ctx.settings.serve.page_size, ge=1, le=500),
                          offset: int = Query(0, ge=0, le=MAX_OFFSET),
                          cursor: str | None = None) -> schemas.PredictionPage:
        """Prediction history, newest first; page with offset or with the `next_cursor` of the last page."""
        before = decode_cursor(cursor) if cursor else None
        if not ctx.settings.store.durable_predictions:  # else every answered prediction is committed already
            await asyncio.to_thread(store.flush)
        rows = await asyncio.to_thread(store.list_predictions, limit, 0 if before else offset, before)
        total, exact = await asyncio.to_thread(store.history_total)
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
        return schemas.PredictionPage(items=[record(p) for p in rows], limit=limit, offset=offset, total=total,
                                      total_exact=exact, next_cursor=next_cursor)

    @api.get("/v1/predictions/{prediction_id}", response_model=schemas.PredictionRecord)
    async def prediction(prediction_id: str) -> schemas.PredictionRecord:
        """One prediction with the feedback it received."""
        try:
            return record(await asyncio.to_thread(store.get_prediction, prediction_id))
        except UnknownPrediction:
            raise HTTPException(404, f"no prediction {prediction_id!r}") from None

    # The image is user data: an API key when keys are configured (the label queue links here).
    @api.get("/v1/predictions/{prediction_id}/image", response_class=Response, dependencies=[Depends(ctx.api_key)],
             responses={**GUARDED, 200: {"content": {"image/*": {}}, "description": "the image file as uploaded"},
                        404: {"model": schemas.ErrorOut, "description": "unknown prediction, or its image not kept"}})
    async def prediction_image(prediction_id: str) -> Response:
        """The image a prediction was made on, as uploaded; 404 when none was kept (store.image_sample_rate),
        or it went since (erasure, store.max_image_gb)."""
        try:
            key = (await asyncio.to_thread(store.get_prediction, prediction_id)).blob_key
        except UnknownPrediction:
            raise HTTPException(404, f"no prediction {prediction_id!r}") from None
        try:
            data = await asyncio.to_thread(store.blobs.get, key) if key else None
        except FileNotFoundError:
            data = None
        if data is None:
            raise HTTPException(404, f"prediction {prediction_id!r} has no image (not kept, or erased)")
        return Response(data, media_type=images.media_type(data),
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private"})

    return api
