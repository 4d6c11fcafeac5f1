"""The durable store: predictions (written in the background), feedback and the audit trail, committed."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, select, text, tuple_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cluster.settings import Settings
from store.blobs import BlobStore
from store.events import Event
from store.leases import Leases
from store.schema import (
    UUID4,
    AuditEvent,
    AuditRow,
    Feedback,
    FeedbackMaskRow,
    FeedbackRow,
    Prediction,
    PredictionRow,
    StoreUnavailable,
    UnknownFeedback,
    UnknownPrediction,
    aware,
    create_schema,
    feedback_record,
    make_engine,
    new_id,
    plausible_id,
    prediction_record,
    utcnow,
)
from store.writer import PredictionWriter

EXACT_TOTAL_UP_TO = 10_000  # history totals are exact up to here: a count this size takes a few ms


def row_estimate(session: Session, table: str) -> int:
    """The database's estimate of a table's rows (planner statistics), 0 when it has none yet."""
    if session.bind.dialect.name == "postgresql":
        value = session.execute(text("SELECT reltuples FROM pg_class WHERE relname = :t"), {"t": table}).scalar()
        return max(0, int(value or 0))
    try:  # SQLite: ANALYZE's row count, the first number of the table's stat line
        stat = session.execute(text("SELECT stat FROM sqlite_stat1 WHERE tbl = :t ORDER BY idx IS NOT NULL LIMIT 1"),
                               {"t": table}).scalar()
    except OperationalError:  # never analyzed: no sqlite_stat1 table
        stat = None
    if stat:
        return int(stat.split()[0])
    return int(session.execute(text(f"SELECT max(rowid) FROM {table}")).scalar() or 0)  # an upper bound


# A prediction that feedback refers to: retention keeps it and its image.
LABELLED = select(FeedbackRow.id).where(FeedbackRow.prediction_id == PredictionRow.id).exists()


def page_query(before: tuple[datetime, str] | None = None) -> Select:
    """Predictions newest first, after a (created_at, id) cursor: a row-value comparison, which the page
    index answers (an OR of the two columns made the database scan)."""
    query = select(PredictionRow).order_by(PredictionRow.created_at.desc(), PredictionRow.id.desc())
    if before is not None:
        query = query.where(tuple_(PredictionRow.created_at, PredictionRow.id) < tuple_(*before))
    return query


def blob_use_query(key: str) -> Select:
    """One prediction that still refers to an image, if any (the blob index: no count over the table)."""
    return select(PredictionRow.id).where(PredictionRow.blob_key == key).limit(1)


def audit_query(event_name: Event | str | None = None) -> Select:
    """Audit events newest first, of one kind when named (by the event index)."""
    query = select(AuditRow).order_by(AuditRow.at.desc(), AuditRow.id.desc())
    return query.where(AuditRow.event == event_name) if event_name else query


class Store(Leases):
    """Predictions (logged in background batches), feedback and audit (committed before returning)."""

    def __init__(self, database_url: str, blob_root: str | Path, flush_interval_s: float = 0.5,
                 flush_max_rows: int = 256, busy_timeout_s: float = 30.0, retry_s: float = 120.0,
                 image_sample_rate: float = 1.0):
        if not 0.0 <= image_sample_rate <= 1.0:
            raise ValueError(f"store.image_sample_rate={image_sample_rate}: expected a share between 0 and 1")
        self.image_sample_rate = image_sample_rate
        self.engine = make_engine(database_url, busy_timeout_s)
        create_schema(self.engine)
        self.blobs = BlobStore(blob_root)
        self.writer = PredictionWriter(self.engine, self.blobs, flush_interval_s, flush_max_rows, retry_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(settings.database_url, settings.blob_root, settings.store.flush_interval_s,
                   settings.store.flush_max_rows, image_sample_rate=settings.store.image_sample_rate)

    # -- predictions ---------------------------------------------------------------------------
    def log_prediction(self, *, model_version: str, label: str, confidence: float,
                       probabilities: dict[str, float], features: dict[str, Any] | None = None,
                       image: bytes | None = None, prediction_id: str | None = None) -> str:
        """Queue a prediction (and its image) for the background writer; returns its id at once."""
        prediction_id = prediction_id or new_id()
        if image is not None and self.image_sample_rate < 1.0 and random.random() >= self.image_sample_rate:
            image = None  # not sampled: the prediction is kept, its image is not
        row = {"id": prediction_id, "created_at": utcnow(), "model_version": str(model_version),
               "label": label, "confidence": float(confidence), "probabilities": probabilities,
               "features": features or {}, "blob_key": BlobStore.key(image) if image else None}
        self.writer.put(row, image)
        return prediction_id

    async def recorded(self, prediction_ids: list[str]) -> None:
        """Return once these logged predictions are committed, in as few transactions as the requests waiting
        together allow (group commit); raises NotRecorded when one could not be written."""
        await asyncio.gather(*(self.writer.durable(i) for i in prediction_ids))

    def _committed(self, work) -> Any:
        """Run `work(session)` in one transaction; a database that does not take it raises StoreUnavailable."""
        try:
            with Session(self.engine) as session, session.begin():
                return work(session)
        except OperationalError as exc:
            raise StoreUnavailable(f"the store did not take the write: {str(exc.orig)[:200]}") from exc

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued prediction is written; False on timeout."""
        return self.writer.flush(timeout)

    def get_prediction(self, prediction_id: str, wait_s: float | None = None) -> Prediction:
        """One prediction with its feedback; raises UnknownPrediction.

        A client may ask for what it was just told about, and another replica may have answered that:
        an id of ours that is not there yet is looked for again for up to `wait_s` (default: two
        gathering windows and a write) while that replica's writer catches up.
        """
        if not plausible_id(prediction_id):
            raise UnknownPrediction(prediction_id)
        self.writer.wait_for(prediction_id)  # answered by this process: written first (only that row)
        wait_s = 2 * self.writer.gather_s + 0.5 if wait_s is None else wait_s
        deadline = time.monotonic() + (wait_s if UUID4.fullmatch(prediction_id) else 0.0)
        with Session(self.engine) as session:
            while (row := session.get(PredictionRow, prediction_id)) is None:
                if time.monotonic() >= deadline:
                    raise UnknownPrediction(prediction_id)
                session.rollback()  # a fresh snapshot for the next look
                time.sleep(0.05)
            prediction = prediction_record(row)
            feedback = session.scalars(select(FeedbackRow).where(FeedbackRow.prediction_id == prediction_id)
                                       .order_by(FeedbackRow.created_at)).all()
            prediction.feedback = [feedback_record(f) for f in feedback]
            return prediction

    def list_predictions(self, limit: int = 50, offset: int = 0,
                         before: tuple[datetime, str] | None = None) -> list[Prediction]:
        """Newest first; page with offset, or with a (created_at, id) cursor from the previous page."""
        with Session(self.engine) as session:
            rows = session.scalars(page_query(before).offset(offset).limit(limit)).all()
            page = [prediction_record(r) for r in rows]
            # The page's feedback in one query, so a history view needs no call per row.
            by_id = {p.id: p for p in page}
            if by_id:
                for f in session.scalars(select(FeedbackRow).where(FeedbackRow.prediction_id.in_(list(by_id)))
                                         .order_by(FeedbackRow.created_at)):
                    by_id[f.prediction_id].feedback.append(feedback_record(f))
            return page

    def prune(self, older_than: datetime, batch: int = 1000) -> tuple[int, int]:
        """Delete predictions made before `older_than` that no feedback refers to, and their images once no
        prediction left refers to them; returns (rows, images) deleted. Feedback, the predictions it labels,
        audit events and erasure records stay. Works through the page index in batches of `batch` rows,
        so one call never holds the table."""
        rows = images = 0
        while True:
            with Session(self.engine) as session:
                doomed = session.execute(
                    select(PredictionRow.id, PredictionRow.blob_key)
                    .where(PredictionRow.created_at < older_than, ~LABELLED)
                    .order_by(PredictionRow.created_at).limit(batch)).all()
            if not doomed:
                return rows, images
            ids = [d.id for d in doomed]
            # Labelled meanwhile? Then it stays: the condition is checked again in the delete itself.
            rows += self._committed(lambda session, ids=ids: session.execute(
                delete(PredictionRow).where(PredictionRow.id.in_(ids), ~LABELLED)).rowcount)
            for key in {d.blob_key for d in doomed if d.blob_key}:
                if not self.blob_in_use(key) and self.blobs.delete(key):
                    images += 1

    def cap_images(self, max_bytes: int, batch: int = 500) -> int:
        """Delete the images of the oldest unlabelled predictions until the blob store holds at most `max_bytes`
        (store.max_image_gb); their rows stay, without an image. Labelled predictions keep theirs (a retrain
        learns from them). Returns how many image files went."""
        sizes = self.blobs.sizes()
        total, deleted = sum(sizes.values()), 0
        while total > max_bytes:
            with Session(self.engine) as session:
                oldest = session.execute(select(PredictionRow.id, PredictionRow.blob_key)
                                         .where(PredictionRow.blob_key.is_not(None), ~LABELLED)
                                         .order_by(PredictionRow.created_at).limit(batch)).all()
            if not oldest:
                break  # only labelled predictions' images are left
            chosen, keys, freeing = [], set(), 0
            for row in oldest:  # just enough of them, oldest first
                if total - freeing <= max_bytes:
                    break
                chosen.append(row)
                if row.blob_key not in keys:
                    keys.add(row.blob_key)
                    freeing += sizes.get(row.blob_key, 0)
            oldest = chosen
            ids = [row.id for row in oldest]
            self._committed(lambda session, ids=ids: session.execute(
                update(PredictionRow).where(PredictionRow.id.in_(ids), ~LABELLED).values(blob_key=None)))
            for key in {row.blob_key for row in oldest}:
                if not self.blob_in_use(key) and self.blobs.delete(key):  # a newer one with the same bytes keeps it
                    total -= sizes.get(key, 0)
                    deleted += 1
        return deleted

    def count_predictions(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(PredictionRow)) or 0

    def history_total(self) -> tuple[int, bool]:
        """(predictions, exact) for a history page without scanning the table: counted exactly up to
        EXACT_TOTAL_UP_TO rows (a bounded index scan), beyond that the database's own row estimate."""
        with Session(self.engine) as session:
            bounded = select(PredictionRow.id).limit(EXACT_TOTAL_UP_TO + 1).subquery()
            counted = session.scalar(select(func.count()).select_from(bounded)) or 0
            if counted <= EXACT_TOTAL_UP_TO:
                return counted, True
            return max(counted, row_estimate(session, PredictionRow.__tablename__)), False

    def analyze(self) -> None:
        """Refresh the planner's statistics, the row estimate history_total reads (the monitor calls it with
        retention). SQLite samples (analysis_limit) so the write lock is held for milliseconds, not a scan."""
        with self.engine.begin() as connection:
            if self.engine.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA analysis_limit=1000")
            connection.exec_driver_sql(f"ANALYZE {PredictionRow.__tablename__}")

    # -- feedback ------------------------------------------------------------------------------
    def add_feedback(self, prediction_id: str, label: str, source: str = "api", actor: str = "anonymous",
                     mask: dict | None = None) -> str:
        """Record a label (and for a segmentation model the corrected mask: JSON, kept as given) for a
        prediction and its audit event in one committed transaction.

        Returns only once the row is committed; a write the database did not take raises (StoreUnavailable).
        """
        if not plausible_id(prediction_id):
            raise UnknownPrediction(prediction_id)
        self.writer.wait_for(prediction_id)  # not the whole queue: feedback waits on no other request's row
        feedback_id = new_id()
        now = utcnow()

        def write(session: Session) -> None:
            if session.get(PredictionRow, prediction_id) is None:
                raise UnknownPrediction(prediction_id)
            session.add(FeedbackRow(id=feedback_id, prediction_id=prediction_id, label=label,
                                    created_at=now, source=source))
            if mask is not None:
                session.flush()  # the feedback row first: the mask refers to it
                session.add(FeedbackMaskRow(feedback_id=feedback_id, mask=mask))
            session.add(AuditRow(id=new_id(), at=now, actor=actor, event=Event.FEEDBACK,
                                 details={"feedback_id": feedback_id, "prediction_id": prediction_id,
                                          "label": label, "source": source}))

        self._committed(write)
        return feedback_id

    def erase_feedback(self, feedback_id: str, actor: str = "anonymous") -> None:
        """Right to erasure: the feedback row, the image of its prediction and the label in its audit event.

        The prediction row stays (model output and drift features) without its image; the image file
        goes once no other prediction shares it (blobs are content-addressed). The erasure is audited
        by feedback id and actor only. Raises UnknownFeedback.
        """
        if not plausible_id(feedback_id):
            raise UnknownFeedback(feedback_id)

        def write(session: Session) -> str | None:
            row = session.get(FeedbackRow, feedback_id)
            if row is None:
                raise UnknownFeedback(feedback_id)
            prediction = session.get(PredictionRow, row.prediction_id)
            key = prediction.blob_key if prediction is not None else None
            if prediction is not None:
                prediction.blob_key = None
            window = (AuditRow.at >= row.created_at - timedelta(seconds=1)) & \
                     (AuditRow.at <= row.created_at + timedelta(seconds=1))
            for audited in session.scalars(select(AuditRow).where(AuditRow.event == Event.FEEDBACK, window)):
                if (audited.details or {}).get("feedback_id") == feedback_id:
                    audited.details = {k: v for k, v in audited.details.items() if k != "label"} | {"erased": True}
            session.execute(delete(FeedbackMaskRow).where(FeedbackMaskRow.feedback_id == feedback_id))
            session.execute(delete(FeedbackRow).where(FeedbackRow.id == feedback_id))
            session.add(AuditRow(id=new_id(), at=utcnow(), actor=actor, event=Event.FEEDBACK_ERASED,
                                 details={"feedback_id": feedback_id}))
            return key

        key = self._committed(write)
        if key:  # a prediction of the same bytes queued here is written first (or 10 s pass), so the check sees it
            self.writer.wait_for_image(key)
            if not self.blob_in_use(key):
                self.blobs.delete(key)

    def blob_in_use(self, key: str) -> bool:
        with Session(self.engine) as session:
            return session.scalar(blob_use_query(key)) is not None

    def list_feedback(self, since: datetime | None = None, limit: int = 10_000) -> list[Feedback]:
        """Feedback oldest first, optionally only from `since` on (what a retrain learns from)."""
        query = select(FeedbackRow).order_by(FeedbackRow.created_at)
        if since is not None:
            query = query.where(FeedbackRow.created_at >= since)
        with Session(self.engine) as session:
            return [feedback_record(r) for r in session.scalars(query.limit(limit)).all()]

    def labelled_images(self, window: int, masks: bool = False) -> list[tuple]:
        """(prediction id, label, blob key) of the newest `window` feedback rows, one query, newest first;
        with `masks`, only feedback that came with a corrected mask, and the mask's JSON fourth.

        A prediction labelled twice counts once, with its latest label; predictions whose image
        was not kept are left out. What a retrain learns from, bounded however much feedback piles up.
        """
        query = (select(FeedbackRow.prediction_id, FeedbackRow.label, PredictionRow.blob_key)
                 .join(PredictionRow, PredictionRow.id == FeedbackRow.prediction_id)
                 .order_by(FeedbackRow.created_at.desc(), FeedbackRow.id.desc()).limit(window))
        if masks:
            query = query.add_columns(FeedbackMaskRow.mask).join(
                FeedbackMaskRow, FeedbackMaskRow.feedback_id == FeedbackRow.id)
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        seen: set[str] = set()
        out = []
        for row in rows:
            if row[0] not in seen and row[2]:
                seen.add(row[0])
                out.append(tuple(row))
        return out

    def feedback_mask(self, feedback_id: str) -> dict | None:
        """The corrected mask sent with a feedback (as stored), or None when it came without one."""
        with Session(self.engine) as session:
            row = session.get(FeedbackMaskRow, feedback_id)
            return row.mask if row is not None else None

    def count_feedback(self, since: datetime | None = None) -> int:
        query = select(func.count()).select_from(FeedbackRow)
        if since is not None:
            query = query.where(FeedbackRow.created_at >= since)
        with Session(self.engine) as session:
            return session.scalar(query) or 0

    # -- audit ---------------------------------------------------------------------------------
    def audit(self, actor: str, event_name: Event | str, details: dict[str, Any] | None = None) -> str:
        """Append an audit event (committed before returning)."""
        event_id = new_id()
        row = AuditRow(id=event_id, at=utcnow(), actor=actor, event=event_name,
                       details=json.loads(json.dumps(details or {}, default=str)))
        self._committed(lambda session: session.add(row))
        return event_id

    def count_audit(self, event_name: Event | str) -> int:
        """How many events of this name the trail holds (a count in the database, not a scan here)."""
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(AuditRow).where(AuditRow.event == event_name)) or 0

    def list_audit(self, limit: int = 50, offset: int = 0, event_name: Event | str | None = None) -> list[AuditEvent]:
        """Audit events, newest first."""
        with Session(self.engine) as session:
            rows = session.scalars(audit_query(event_name).offset(offset).limit(limit)).all()
            return [AuditEvent(r.id, aware(r.at), r.actor, r.event, r.details) for r in rows]

    def close(self) -> None:
        """Write what is queued, stop the writer, release connections."""
        self.writer.close()
        self.engine.dispose()
