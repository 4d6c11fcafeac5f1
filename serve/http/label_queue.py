"""Route: the labelling queue, the predictions most worth a person's label (labelled through /v1/feedback)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query

from serve import schemas
from serve.http.context import Context
from serve.http.deps import GUARDED
from store.label_queue import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Candidate,
    DriftEpisode,
    classes_of,
    latest_drift_episode,
    rank,
    unlabelled,
)

MAX_LIMIT = 100


def item(c: Candidate, episode: DriftEpisode | None) -> schemas.LabelQueueItem:
    return schemas.LabelQueueItem(
        prediction_id=c.prediction_id, created_at=c.created_at, label=c.label, runner_up=c.runner_up,
        confidence=c.confidence, margin=round(c.margin, 6), entropy=round(c.entropy, 6), model_version=c.model_version,
        drifted=episode is not None and episode.covers(c.created_at),
        image_url=f"/v1/predictions/{c.prediction_id}/image")


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["labelling"])
    store = ctx.store

    def queued(limit: int, window: int) -> tuple[list[Candidate], DriftEpisode | None, list[Candidate]]:
        candidates = unlabelled(store, window)
        episode = latest_drift_episode(store)
        return candidates, episode, rank(candidates, limit, episode)  # a sort of up to MAX_WINDOW: off the loop

    # Guarded like the image it points to: both are user data.
    @api.get("/v1/label-queue", response_model=schemas.LabelQueue, responses=GUARDED,
             dependencies=[Depends(ctx.api_key)])
    async def label_queue(
            limit: int = Query(20, ge=1, le=MAX_LIMIT, description="how many predictions to list"),
            window: int = Query(DEFAULT_WINDOW, ge=1, le=MAX_WINDOW,
                                description="how many of the newest predictions to consider")) -> schemas.LabelQueue:
        """The predictions most worth a person's label: with an image, not labelled yet, those of the latest
        drift episode first, then the closest calls; label one with POST /v1/feedback and it leaves the queue."""
        if not ctx.settings.store.durable_predictions:  # else every answered prediction is committed already
            await asyncio.to_thread(store.flush)
        candidates, episode, chosen = await asyncio.to_thread(queued, limit, window)
        return schemas.LabelQueue(
            items=[item(c, episode) for c in chosen], classes=classes_of(chosen), limit=limit, window=window,
            candidates=len(candidates), drift_episode=episode is not None,
            drifted_since=episode.start if episode else None, drifted_until=episode.end if episode else None)

    return api
