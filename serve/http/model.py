"""Routes: the champion and the served version, the latest drift check, and the saved drift reports."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from cluster import storage
from control.monitor import MonitorUnavailable
from serve import schemas
from serve.http.context import Context
from serve.http.deps import BEARER, GUARDED
from store import Event

# A report's file name: letters, digits, '-', '_' and one '.html' or '.json' (no path, no hidden file).
REPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,200}\.(html|json)")
REPORT_FLAG = ("check the latest window now and save Evidently's report (HTML + JSON) whatever the verdict (an "
               "API key when keys are configured: a report costs the monitor 1-2 s of CPU); by default the monitor "
               "saves one only for a window that drifted")


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["model"])
    settings = ctx.settings

    @api.get("/v1/model", response_model=schemas.ModelInfo)
    async def model() -> schemas.ModelInfo:
        """The champion in the registry and the version being served."""
        served = await ctx.backend.info()
        champion = await ctx.backend.champion()
        if champion is None:
            return schemas.ModelInfo(name=settings.registry.model_name, version=None,
                                     served_version=served["model_version"], classes=served["classes"],
                                     arch=served.get("arch"), task=served.get("task", "classification"))
        tags = champion.get("tags", {})
        return schemas.ModelInfo(
            name=champion["name"], version=champion["version"], served_version=served["model_version"],
            metrics=champion.get("metrics", {}), trained_at=tags.get("trained_at"),
            data_version=tags.get("data_version"), arch=tags.get("arch"), classes=served["classes"],
            run_id=champion.get("run_id"), task=served.get("task", "classification"))

    @api.get("/v1/drift", response_model=schemas.DriftStatus, responses=GUARDED)
    async def drift(request: Request, report: bool = Query(False, description=REPORT_FLAG)) -> schemas.DriftStatus:
        """The latest drift check (written by the monitor as a `drift_check` audit event), or with
        `report=true` a check of the latest window made now, with its Evidently report."""
        if report:
            # 401/403/429 as on the guarded routes; the plain read stays open, so the schema lists no security.
            await asyncio.to_thread(ctx.api_key, await BEARER(request))
            try:
                answer = await ctx.backend.drift_report()
            except MonitorUnavailable as exc:  # said like "too few predictions": why no check ran now
                return schemas.DriftStatus(status=str(exc))
            if answer.get("report") is None:
                return schemas.DriftStatus(status=answer["status"], model_version=answer.get("model_version"))
            details = answer["report"]
            return drift_status(details["checked_at"], {**details, "model_version": answer.get("model_version")})
        [latest] = await asyncio.to_thread(ctx.store.list_audit, 1, 0, Event.DRIFT_CHECK) or [None]
        [failed] = await asyncio.to_thread(ctx.store.list_audit, 1, 0, Event.DRIFT_CHECK_FAILED) or [None]
        if failed is not None and (latest is None or failed.at > latest.at):  # checks fail now: say so
            return schemas.DriftStatus(status=f"check failed: {failed.details.get('error')}", checked_at=failed.at)
        if latest is None:
            return schemas.DriftStatus(status="no check yet")
        return drift_status(latest.at, latest.details)

    @api.get("/v1/drift/reports/{name}", response_class=Response)
    async def drift_report(name: str) -> Response:
        """An Evidently drift report (HTML or JSON) saved by the monitor, from the shared reports folder."""
        # Only plain report names: nothing outside the reports folder is ever served.
        content = None
        if REPORT_NAME.fullmatch(name):
            try:
                content = await asyncio.to_thread(storage.read, settings.reports_root, name)
            except OSError:  # a name too long for the file system
                content = None
        if content is None:
            raise HTTPException(404, f"no drift report named {name!r} (reports are kept for the latest checks)")
        return Response(content, media_type="text/html" if name.endswith(".html") else "application/json")

    return api


def drift_status(checked_at, d: dict) -> schemas.DriftStatus:
    """The API's view of one drift check (a DriftReport's fields plus the model version)."""
    report = Path(d["html_path"]).name if d.get("html_path") else None
    return schemas.DriftStatus(status="checked", checked_at=checked_at, drifted=d.get("drifted"),
                               share=d.get("share"), features=d.get("scores", {}),
                               drifted_features=d.get("drifted_columns", []),
                               embedding_score=d.get("embedding_score"), model_version=d.get("model_version"),
                               window_size=d.get("window_size"),
                               report_url=f"/v1/drift/reports/{report}" if report else None,
                               decided_by=d.get("decided_by"), evidently_drifted=d.get("evidently_drifted"),
                               calibrated=d.get("calibrated"), estimated_accuracy=d.get("estimated_accuracy"),
                               estimate_error=d.get("estimate_error"))
