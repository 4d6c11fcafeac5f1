"""The HTTP layer: parse and validate requests, call the classifier backend and the store, shape answers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cluster.settings import Settings
from cluster.store import Store, StoreUnavailable, UnknownFeedback, UnknownPrediction
from serve import images, schemas, v2
from serve.metrics import HttpMetrics

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
# Offsets past this are refused (422) rather than handed to a database integer that cannot hold them.
MAX_OFFSET = 2**31 - 1
BEARER = HTTPBearer(auto_error=False, description="an API key from RAYLOOP_API_KEYS (when keys are configured)")
GUARDED = {401: {"model": schemas.ErrorOut, "description": "no API key"},
           403: {"model": schemas.ErrorOut, "description": "wrong API key"}}


class Backend(Protocol):
    """What the HTTP layer needs from the model side (a Serve handle in production, a fake in tests)."""

    async def predict_image(self, data: bytes) -> dict: ...

    async def predict_pixels(self, pixels: np.ndarray) -> dict: ...

    async def info(self) -> dict: ...

    async def champion(self) -> dict | None: ...


class KeyChecker:
    """Bearer API keys (off when none are configured) with an optional per-key requests/minute limit."""

    def __init__(self, keys: str, per_minute: int, shared=None):
        # "sha256:<hex>" entries are digests already: how keys travel in the Serve config.
        self.digests = {k.strip()[7:] if k.strip().startswith("sha256:") else self.digest(k.strip())
                        for k in keys.split(",") if k.strip()}
        self.per_minute = per_minute
        self.window = RateWindow()
        # shared(digest, per_minute) -> seconds to wait (0 = allowed): one window for every serving
        # replica (serve/app.py hands in a Ray actor's), so N replicas do not allow N times the limit.
        self.shared = shared

    @staticmethod
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def __call__(self, credentials: HTTPAuthorizationCredentials | None = Security(BEARER)) -> str:
        """The caller's actor name for the audit log (a key fingerprint, never the key)."""
        if not self.digests:
            return "anonymous"
        if credentials is None or not credentials.credentials.strip():
            raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"})
        digest = self.digest(credentials.credentials.strip())
        if digest not in self.digests:
            raise HTTPException(403, "invalid API key")
        if self.per_minute > 0:
            wait = None
            if self.shared is not None:
                try:
                    wait = self.shared(digest, self.per_minute)
                except Exception as exc:  # noqa: BLE001 - the limit must not take the route down with it
                    print(f"[rayloop] shared rate limit unavailable, limiting per replica: {exc!r}", flush=True)
            if wait is None:
                wait = self.window.hit(digest, self.per_minute)
            if wait > 0:
                raise HTTPException(429, f"rate limit of {self.per_minute} requests/minute exceeded",
                                    headers={"Retry-After": str(int(wait) + 1)})
        return f"key:{digest[:12]}"


class RateWindow:
    """Requests per key in the last minute (a sliding window)."""

    def __init__(self):
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def hit(self, key: str, per_minute: int) -> float:
        """Count a request; returns 0 when allowed, else the seconds until one would be."""
        now, window = time.monotonic(), self.recent[key]
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= per_minute:
            return max(0.001, 60 - (now - window[0]))
        window.append(now)
        return 0.0


class RequestMetrics:
    """Pure ASGI middleware counting requests by route template and status (BaseHTTPMiddleware is slow)."""

    def __init__(self, app, metrics: HttpMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the router fills this in
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)


class BodyLimit:
    """Pure ASGI middleware: refuse a request body past its route's limit (413) while it streams in,
    whether or not it declares a Content-Length, so an oversized upload never sits in memory whole."""

    def __init__(self, app, default_bytes: int, batch_bytes: int):
        self.app = app
        self.default_bytes = default_bytes
        self.batch_bytes = batch_bytes

    def limit(self, path: str) -> int:
        return self.batch_bytes if path == "/v1/predict/batch" or path.startswith("/v2/models/") else \
            self.default_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, seen = self.limit(scope["path"]), 0
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            message = f"request body is {int(length)} bytes; the limit is {limit}"
            # /v2 clients read the protocol's `error` key (tritonclient cannot decode an answer without it).
            body = {"detail": message, **({"error": message} if scope["path"].startswith("/v2/") else {})}
            return await JSONResponse(body, status_code=413)(scope, receive, send)

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        return await self.app(scope, counted, send)


def encode_cursor(created_at: datetime, prediction_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), prediction_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, prediction_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(at), str(prediction_id)
    except (ValueError, TypeError, binascii.Error):
        raise HTTPException(400, "invalid cursor") from None


def rejected(exc: images.ImageRejected) -> HTTPException:
    return HTTPException(413 if exc.too_large else 400, exc.detail)


def create_app(backend: Backend, store: Store, settings: Settings, metrics: HttpMetrics | None = None,
               shared_rate_limit=None) -> FastAPI:
    """The FastAPI app with every route of the contract in DESIGN.md (shared_rate_limit: see KeyChecker)."""
    limits = settings.serve
    model_name = settings.registry.model_name
    app = FastAPI(title="rayloop", version="0.1.0",
                  description="Image classification with feedback, drift watch and retraining on Ray.")
    api_key = KeyChecker(limits.api_keys, limits.rate_limit_per_minute, shared_rate_limit)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep FastAPI's list of errors but make every answer carry a readable `detail` string first.
        errors = [{k: v for k, v in e.items() if k in {"loc", "msg", "type"}} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse({"detail": summary, "errors": errors}, status_code=422)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        # Nothing was acknowledged: the client may send the same request again.
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    single_bytes = limits.max_upload_bytes * 4 // 3 + 65536
    app.add_middleware(BodyLimit, default_bytes=single_bytes, batch_bytes=single_bytes * limits.max_batch_images)
    if metrics is not None:
        app.add_middleware(RequestMetrics, metrics=metrics)

    async def predict_logged(data: bytes) -> schemas.Prediction:
        try:
            result = await backend.predict_image(data)
        except images.ImageRejected as exc:
            raise rejected(exc) from None
        if "error" in result:
            raise HTTPException(503, result["error"])
        prediction_id = store.log_prediction(
            model_version=result["model_version"], label=result["label"], confidence=result["confidence"],
            probabilities=result["probabilities"], features=result.get("features"), image=data)
        return schemas.Prediction(prediction_id=prediction_id, **{k: result[k] for k in (
            "label", "confidence", "probabilities", "model_version")})

    async def read_images(request: Request, field: str, many: bool) -> list[bytes]:
        """Image bytes from multipart `field` or JSON image_b64/images_b64."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=limits.max_batch_images + 1)
            except HTTPException:
                raise  # the body ran past its limit (BodyLimit)
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
        elif content_type.startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise HTTPException(400, "body is not valid JSON") from None
            try:
                parsed = (schemas.ImagesB64 if many else schemas.ImageB64).model_validate(body)
            except ValueError as exc:
                raise HTTPException(422, str(exc).splitlines()[0] + ": expected "
                                    + ('{"images_b64": [...]}' if many else '{"image_b64": "..."}')) from None
            texts = parsed.images_b64 if many else [parsed.image_b64]
            try:
                blobs = [images.from_base64(t, limits.max_upload_bytes) for t in texts]
            except images.ImageRejected as exc:
                raise rejected(exc) from None
        else:
            raise HTTPException(415, "send multipart/form-data or application/json")
        if not blobs:
            raise HTTPException(422, "no images in the batch")
        if len(blobs) > limits.max_batch_images:
            raise HTTPException(413, f"{len(blobs)} images; the limit per batch is {limits.max_batch_images}")
        for data in blobs:
            try:
                images.check_size(data, limits.max_upload_bytes)
            except images.ImageRejected as exc:
                raise rejected(exc) from None
        return blobs

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """200 once a model is loaded."""
        info = await backend.info()
        return {"status": "ok", "model_version": info["model_version"]}

    @app.post("/v1/predict", response_model=schemas.Prediction, tags=["predict"], openapi_extra=IMAGE_BODY)
    async def predict(request: Request) -> schemas.Prediction:
        """Classify one image (multipart `file` or JSON `image_b64`)."""
        [data] = await read_images(request, "file", many=False)
        return await predict_logged(data)

    @app.post("/v1/predict/batch", response_model=schemas.PredictionBatch, tags=["predict"],
              openapi_extra=BATCH_BODY)
    async def predict_batch(request: Request) -> schemas.PredictionBatch:
        """Classify several images (multipart `files` or JSON `images_b64`); all or nothing."""
        blobs = await read_images(request, "files", many=True)
        answers = await asyncio.gather(*(predict_logged(b) for b in blobs), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, HTTPException):
                position = answers.index(answer)
                raise HTTPException(answer.status_code, f"image {position}: {answer.detail}")
            if isinstance(answer, BaseException):
                raise answer
        return schemas.PredictionBatch(predictions=answers)

    @app.post("/v1/feedback", status_code=201, response_model=schemas.FeedbackCreated, tags=["feedback"],
              responses={**GUARDED, 404: {"model": schemas.ErrorOut, "description": "unknown prediction"},
                         503: {"model": schemas.ErrorOut, "description": "the store did not take the write"}})
    async def feedback(body: schemas.FeedbackIn, actor: str = Depends(api_key)) -> schemas.FeedbackCreated:
        """The true label of a prediction; stored durably before the answer."""
        try:
            prediction = await asyncio.to_thread(store.get_prediction, body.prediction_id)
        except UnknownPrediction:
            raise HTTPException(404, f"no prediction {body.prediction_id!r}") from None
        if body.label not in prediction.probabilities:
            raise HTTPException(422, f"label {body.label!r} is not one of the model's classes "
                                     f"{sorted(prediction.probabilities)}")
        feedback_id = await asyncio.to_thread(store.add_feedback, body.prediction_id, body.label, "api", actor)
        if metrics is not None:
            metrics.feedback.inc()
        return schemas.FeedbackCreated(feedback_id=feedback_id)

    @app.delete("/v1/feedback/{feedback_id}", status_code=204, response_class=Response, tags=["feedback"],
                responses={**GUARDED, 404: {"model": schemas.ErrorOut, "description": "unknown feedback"}})
    async def erase_feedback(feedback_id: str, actor: str = Depends(api_key)) -> Response:
        """Erase a feedback (right to erasure): the label, its prediction's image, and the label in the audit
        trail; the erasure is audited by id and actor only, and no later retrain learns from it."""
        try:
            await asyncio.to_thread(store.erase_feedback, feedback_id, actor)
        except UnknownFeedback:
            raise HTTPException(404, f"no feedback {feedback_id!r}") from None
        return Response(status_code=204)

    def record(p) -> schemas.PredictionRecord:
        return schemas.PredictionRecord(
            prediction_id=p.id, label=p.label, confidence=p.confidence, probabilities=p.probabilities,
            model_version=p.model_version, created_at=p.created_at, features=p.features, image_sha256=p.blob_key,
            feedback=[schemas.FeedbackOut(feedback_id=f.id, label=f.label, created_at=f.created_at,
                                          source=f.source) for f in p.feedback])

    @app.get("/v1/predictions", response_model=schemas.PredictionPage, tags=["history"])
    async def predictions(limit: int = Query(limits.page_size, ge=1, le=500),
                          offset: int = Query(0, ge=0, le=MAX_OFFSET),
                          cursor: str | None = None) -> schemas.PredictionPage:
        """Prediction history, newest first; page with offset or with the `next_cursor` of the last page."""
        before = decode_cursor(cursor) if cursor else None
        await asyncio.to_thread(store.flush)
        rows = await asyncio.to_thread(store.list_predictions, limit, 0 if before else offset, before)
        total = await asyncio.to_thread(store.count_predictions)
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if len(rows) == limit else None
        return schemas.PredictionPage(items=[record(p) for p in rows], limit=limit, offset=offset, total=total,
                                      next_cursor=next_cursor)

    @app.get("/v1/predictions/{prediction_id}", response_model=schemas.PredictionRecord, tags=["history"])
    async def prediction(prediction_id: str) -> schemas.PredictionRecord:
        """One prediction with the feedback it received."""
        try:
            return record(await asyncio.to_thread(store.get_prediction, prediction_id))
        except UnknownPrediction:
            raise HTTPException(404, f"no prediction {prediction_id!r}") from None

    @app.get("/v1/model", response_model=schemas.ModelInfo, tags=["model"])
    async def model() -> schemas.ModelInfo:
        """The champion in the registry and the version being served."""
        served = await backend.info()
        champion = await backend.champion()
        if champion is None:
            return schemas.ModelInfo(name=model_name, version=None, served_version=served["model_version"],
                                     classes=served["classes"], arch=served.get("arch"))
        tags = champion.get("tags", {})
        return schemas.ModelInfo(
            name=champion["name"], version=champion["version"], served_version=served["model_version"],
            metrics=champion.get("metrics", {}), trained_at=tags.get("trained_at"),
            data_version=tags.get("data_version"), arch=tags.get("arch"), classes=served["classes"],
            run_id=champion.get("run_id"))

    @app.get("/v1/drift", response_model=schemas.DriftStatus, tags=["model"])
    async def drift() -> schemas.DriftStatus:
        """The latest drift check (written by the monitor as a `drift_check` audit event)."""
        [latest] = await asyncio.to_thread(store.list_audit, 1, 0, "drift_check") or [None]
        if latest is None:
            return schemas.DriftStatus(status="no check yet")
        d = latest.details
        report = Path(d["html_path"]).name if d.get("html_path") else None
        return schemas.DriftStatus(status="checked", checked_at=latest.at, drifted=d.get("drifted"),
                                   share=d.get("share"), features=d.get("scores", {}),
                                   drifted_features=d.get("drifted_columns", []),
                                   embedding_score=d.get("embedding_score"), model_version=d.get("model_version"),
                                   window_size=d.get("window_size"),
                                   report_url=f"/v1/drift/reports/{report}" if report else None)

    @app.get("/v1/drift/reports/{name}", response_class=FileResponse, tags=["model"])
    async def drift_report(name: str) -> FileResponse:
        """An Evidently drift report (HTML or JSON) saved by the monitor."""
        folder = (settings.data_dir / "drift").resolve()
        try:
            path = (folder / name).resolve()
        except (ValueError, OSError):  # a NUL byte, a name too long for the file system
            path = folder
        # Only plain report names: nothing outside the drift folder is ever served.
        if path.parent != folder or path.suffix not in {".html", ".json"} or not path.is_file():
            raise HTTPException(404, f"no drift report named {name!r} (reports are kept for the latest checks)")
        return FileResponse(path, media_type="text/html" if path.suffix == ".html" else "application/json")

    @app.post("/v1/admin/retrain", status_code=202, response_model=schemas.JobStarted, tags=["admin"],
              responses=GUARDED)
    async def admin_retrain(actor: str = Depends(api_key)) -> schemas.JobStarted:
        """Start a retrain now: a Ray Job running Ray Tune, then the gate and, on a pass, a rolling update."""
        from tune import job

        try:
            submission = await asyncio.to_thread(job.submit, settings, "manual", actor)
        except job.RetrainBusy as busy:
            raise HTTPException(409, str(busy)) from busy
        except Exception as exc:  # noqa: BLE001 - no dashboard/job service: say so instead of crashing
            raise HTTPException(503, f"cannot submit the retrain job: {type(exc).__name__}: {str(exc)[:300]}",
                                headers={"Retry-After": "30"}) from exc
        await asyncio.to_thread(store.audit, actor, "retrain_triggered", {"trigger": "manual", "job": submission})
        return schemas.JobStarted(job_id=submission, status="submitted")

    @app.post("/v1/admin/rollback", response_model=schemas.RolledBack, tags=["admin"], responses=GUARDED)
    async def admin_rollback(actor: str = Depends(api_key)) -> schemas.RolledBack:
        """Put the previous champion back (registry alias + rolling update of the classifier)."""
        from tune import promotion
        from tune.job import roll_out

        try:
            frm, to = await asyncio.to_thread(promotion.rollback, settings)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        await asyncio.to_thread(store.audit, actor, "rollback", {"from": frm, "to": to})
        # The update runs on after the answer: the caller sees model_version change on /v1/predict.
        asyncio.get_running_loop().run_in_executor(
            None, roll_out, settings, to, lambda event, details: store.audit(actor, event, details))
        return schemas.RolledBack(previous=frm, champion=to, status="rolling out")

    @app.get("/v1/audit", response_model=schemas.AuditPage, tags=["admin"], responses=GUARDED)
    async def audit(limit: int = Query(limits.page_size, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_OFFSET),
                    event: str | None = None, actor: str = Depends(api_key)) -> schemas.AuditPage:
        """The audit trail, newest first (API key)."""
        rows = await asyncio.to_thread(store.list_audit, limit, offset, event)
        return schemas.AuditPage(items=[schemas.AuditEventOut(**vars(r)) for r in rows], limit=limit, offset=offset)

    app.include_router(v2.router(backend, store, settings))  # Open Inference Protocol v2
    return app
