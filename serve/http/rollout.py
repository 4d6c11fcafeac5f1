"""Routes: the staged rollout (shadow, canary steps) and an operator's promote or abort of it."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException

from control import rollout
from serve import schemas
from serve.http.context import Context
from serve.http.deps import GUARDED
from store.rollouts import Rollout


def status(current: Rollout | None) -> schemas.RolloutStatus:
    if current is None:
        return schemas.RolloutStatus(rollout=None)
    body = {k: v for k, v in vars(current).items() if k in schemas.RolloutOut.model_fields}
    figures = {k: v for k, v in current.figures.items() if k != "steps"}
    return schemas.RolloutStatus(rollout=schemas.RolloutOut(
        **{**body, "figures": figures}, live=current.live, stale=current.stale(), steps=current.figures.get("steps")))


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["rollout"])
    store = ctx.store

    @api.get("/v1/rollout", response_model=schemas.RolloutStatus)
    async def rollout_now() -> schemas.RolloutStatus:
        """The newest staged rollout: its stage, the share the challenger answers, and how it does on live traffic."""
        return status(await asyncio.to_thread(rollout.rollout_status, store))

    async def command(name: str, actor: str) -> schemas.RolloutStatus:
        try:
            return status(await asyncio.to_thread(rollout.command_rollout, store, name, actor))
        except (rollout.NoRollout, rollout.RolloutStalled) as exc:
            raise HTTPException(409, str(exc)) from exc

    conflict = {409: {"model": schemas.ErrorOut, "description": "no rollout under way, or its driver stopped"}}

    @api.post("/v1/admin/rollout/promote", response_model=schemas.RolloutStatus, responses={**GUARDED, **conflict})
    async def promote(actor: str = Depends(ctx.api_key)) -> schemas.RolloutStatus:
        """Promote the challenger of the rollout under way now (its driver moves the champion and rolls Serve);
        answered once done, or as it stands after two minutes."""
        return await command("promote", actor)

    @api.post("/v1/admin/rollout/abort", response_model=schemas.RolloutStatus, responses={**GUARDED, **conflict})
    async def abort(actor: str = Depends(ctx.api_key)) -> schemas.RolloutStatus:
        """Roll the challenger of the rollout under way back: the champion answers everything within a poll."""
        return await command("abort", actor)

    return api
