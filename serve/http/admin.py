"""Routes: the loop's admin actions (through control/, as the CLI and the monitor do) and the audit trail."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Query

from control import retrain, rollout
from serve import schemas
from serve.http.context import Context
from serve.http.deps import GUARDED
from serve.http.history import MAX_OFFSET


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["admin"], responses=GUARDED)
    settings, store = ctx.settings, ctx.store

    @api.post("/v1/admin/retrain", status_code=202, response_model=schemas.JobStarted,
              responses={409: {"model": schemas.ErrorOut, "description": "a retrain is running"},
                         503: {"model": schemas.ErrorOut, "description": "the job service is not reachable"}})
    async def admin_retrain(actor: str = Depends(ctx.api_key)) -> schemas.JobStarted:
        """Start a retrain now: a Ray Job running Ray Tune, then the gate and, on a pass, a rolling update."""
        try:
            submission = await asyncio.to_thread(retrain.request, settings, store, "manual", actor)
        except retrain.RetrainBusy as busy:
            raise HTTPException(409, str(busy)) from busy
        except Exception as exc:  # noqa: BLE001 - no dashboard/job service: say so instead of crashing
            raise HTTPException(503, f"cannot submit the retrain job: {type(exc).__name__}: {str(exc)[:300]}",
                                headers={"Retry-After": "30"}) from exc
        return schemas.JobStarted(job_id=submission, status="submitted")

    @api.post("/v1/admin/rollback", response_model=schemas.RolledBack,
              responses={409: {"model": schemas.ErrorOut, "description": "no previous champion"},
                         503: {"model": schemas.ErrorOut, "description": "Serve did not follow (audited)"}})
    async def admin_rollback(actor: str = Depends(ctx.api_key)) -> schemas.RolledBack:
        """Put the previous champion back: registry aliases, then a rolling update, answered once it is done."""
        try:
            frm, to = await asyncio.to_thread(rollout.roll_back, settings, store, actor)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        except rollout.RolloutFailed as exc:
            raise HTTPException(503, str(exc)) from exc
        return schemas.RolledBack(previous=frm, champion=to, status="rolled out")

    @api.get("/v1/audit", response_model=schemas.AuditPage)
    async def audit(limit: int = Query(settings.serve.page_size, ge=1, le=500),
                    offset: int = Query(0, ge=0, le=MAX_OFFSET),
                    event: str | None = Query(None, max_length=64, pattern=r"^[a-z_]+$",
                                              description="an event name, e.g. gate_decision"),
                    actor: str = Depends(ctx.api_key)) -> schemas.AuditPage:
        """The audit trail, newest first (API key)."""
        rows = await asyncio.to_thread(store.list_audit, limit, offset, event)
        return schemas.AuditPage(items=[schemas.AuditEventOut(**vars(r)) for r in rows], limit=limit, offset=offset)

    return api
