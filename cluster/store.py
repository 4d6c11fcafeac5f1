"""The durable store: predictions, feedback and the audit trail (SQLAlchemy), images as content-addressed blobs."""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Index, String, create_engine, delete, event, func,
                        insert, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cluster.settings import Settings


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class Base(DeclarativeBase):
    pass


class PredictionRow(Base):
    __tablename__ = "predictions"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(255))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict] = mapped_column(JSON)
    features: Mapped[dict] = mapped_column(JSON)
    blob_key: Mapped[str | None] = mapped_column(String(64), nullable=True)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    label: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    source: Mapped[str] = mapped_column(String(64))


class AuditRow(Base):
    __tablename__ = "audit"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(128), index=True)
    details: Mapped[dict] = mapped_column(JSON)


# Pages are ordered newest first; the id breaks ties between rows logged in the same instant.
Index("ix_predictions_page", PredictionRow.created_at.desc(), PredictionRow.id.desc())


@dataclass
class Prediction:
    """One logged prediction (the image itself lives in the blob store under blob_key)."""

    id: str
    created_at: datetime
    model_version: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    features: dict[str, Any] = field(default_factory=dict)
    blob_key: str | None = None
    feedback: list[Feedback] = field(default_factory=list)


@dataclass
class Feedback:
    """A user's label for a prediction."""

    id: str
    prediction_id: str
    label: str
    created_at: datetime
    source: str


@dataclass
class AuditEvent:
    """Something an actor did that changes the system (feedback, promotion, rollback, ...)."""

    id: str
    at: datetime
    actor: str
    event: str
    details: dict[str, Any]


class UnknownPrediction(KeyError):
    """No prediction has that id."""


class UnknownFeedback(KeyError):
    """No feedback has that id."""


class StoreUnavailable(RuntimeError):
    """The database did not take a write (locked past the busy timeout, unreachable): nothing was acknowledged."""


def plausible_id(value: str) -> bool:
    # Ids are uuid4 strings; anything longer, or with a NUL byte (PostgreSQL refuses those in text), is unknown.
    return isinstance(value, str) and 0 < len(value) <= 36 and "\x00" not in value


class BlobStore:
    """Images under <root>/ab/cdef..., named by the sha256 of their bytes, never by a client's filename."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:]

    def put(self, data: bytes, key: str | None = None) -> str:
        """Store bytes (idempotent); returns their key."""
        key = key or self.key(data)
        path = self.path(key)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            partial.write_bytes(data)
            partial.replace(path)  # atomic: readers never see half a file
        return key

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str) -> bool:
        """Remove a blob; False when it was not there."""
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False


def make_engine(url: str, busy_timeout_s: float = 30.0) -> Engine:
    """Engine for a database URL; SQLite gets WAL, a busy timeout and its parent directory."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": busy_timeout_s, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Serve answers feedback from a thread pool: let that many writers hold a connection at once.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=busy_timeout_s)


def create_schema(engine: Engine, attempts: int = 10) -> None:
    """Create missing tables. Several processes (Serve replicas, the monitor, a job) may start on a fresh
    database at once: the losers of that race see "already exists" and simply look again."""
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _prediction(row: PredictionRow) -> Prediction:
    return Prediction(row.id, _aware(row.created_at), row.model_version, row.label, row.confidence,
                      row.probabilities, row.features or {}, row.blob_key)


def _feedback(row: FeedbackRow) -> Feedback:
    return Feedback(row.id, row.prediction_id, row.label, _aware(row.created_at), row.source)


def _aware(value: datetime) -> datetime:
    # SQLite hands datetimes back naive; they were written in UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# How long the prediction writer gathers rows into one transaction: 40 rows at 800 req/s.
GATHER_S = 0.05


class Store:
    """Predictions (logged in background batches), feedback and audit (committed before returning)."""

    def __init__(self, database_url: str, blob_dir: Path, flush_interval_s: float = 0.5,
                 flush_max_rows: int = 256, busy_timeout_s: float = 30.0, retry_s: float = 120.0):
        self.engine = make_engine(database_url, busy_timeout_s)
        create_schema(self.engine)
        self.blobs = BlobStore(blob_dir)
        self.flush_interval_s = flush_interval_s
        self.flush_max_rows = flush_max_rows
        self.gather_s = min(GATHER_S, flush_interval_s)
        self.retry_s = retry_s  # how long queued predictions wait out a locked or unreachable database
        self._pending: queue.Queue[tuple[dict, bytes | None]] = queue.Queue()
        self._flushed = threading.Condition()
        self._closing = threading.Event()
        self._hurry = threading.Event()  # flush() or close() waits: write what is queued now
        self._writer = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._writer.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(settings.database_url, settings.blob_dir, settings.store.flush_interval_s,
                   settings.store.flush_max_rows)

    # -- predictions ---------------------------------------------------------------------------
    def log_prediction(self, *, model_version: str, label: str, confidence: float,
                       probabilities: dict[str, float], features: dict[str, Any] | None = None,
                       image: bytes | None = None, prediction_id: str | None = None) -> str:
        """Queue a prediction (and its image) for the background writer; returns its id at once."""
        prediction_id = prediction_id or new_id()
        row = {"id": prediction_id, "created_at": utcnow(), "model_version": str(model_version),
               "label": label, "confidence": float(confidence), "probabilities": probabilities,
               "features": features or {}, "blob_key": BlobStore.key(image) if image else None}
        self._pending.put((row, image))
        return prediction_id

    def _write_loop(self) -> None:
        last_write = 0.0
        while not (self._closing.is_set() and self._pending.empty()):
            try:
                first = self._pending.get(timeout=self.flush_interval_s)
            except queue.Empty:
                continue
            # Busy (the last write began moments ago): gather a few ms of rows into one transaction,
            # unless flush()/close() asks now. A transaction per request cost the serving replica a
            # third of its CPU under load (py-spy, bench/serve.py). Idle: write at once.
            busy = time.monotonic() - last_write < self.gather_s
            if busy and not self._closing.is_set() and self._pending.qsize() + 1 < self.flush_max_rows:
                self._hurry.wait(self.gather_s)
            self._hurry.clear()  # whoever set it queued its rows before, so the drain below takes them
            last_write = time.monotonic()
            batch = [first]
            while len(batch) < self.flush_max_rows:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[dict, bytes | None]]) -> None:
        rows = [row for row, _ in batch]
        try:
            for row, image in batch:
                if image:
                    self.blobs.put(image, row["blob_key"])
            deadline, delay, retry = time.monotonic() + self.retry_s, 0.05, False
            while True:
                try:
                    self._insert_new(rows, retry)
                    break
                except OperationalError as exc:
                    # Locked past the busy timeout, or the server went away: the ids are already in the
                    # clients' hands, so wait it out rather than drop the rows.
                    if time.monotonic() + delay > deadline:
                        raise
                    print(f"[rayloop store] retrying {len(rows)} predictions in {delay:.2f}s: "
                          f"{str(exc.orig)[:200]}", flush=True)
                    time.sleep(delay)
                    delay, retry = min(delay * 2, 2.0), True
        except Exception as exc:  # noqa: BLE001 - the writer must outlive a bad batch
            print(f"[rayloop store] could not write {len(batch)} predictions: {exc!r}", flush=True)
        finally:
            with self._flushed:
                for _ in batch:
                    self._pending.task_done()
                self._flushed.notify_all()

    def _insert_new(self, rows: list[dict], retry: bool = False) -> None:
        # Core executemany: the ORM's bulk insert path cost as much again per row.
        with self.engine.begin() as connection:
            if retry:  # a commit whose answer was lost must not insert the same ids twice
                table = PredictionRow.__table__
                ids = [r["id"] for r in rows]
                present = set(connection.scalars(select(table.c.id).where(table.c.id.in_(ids))))
                rows = [r for r in rows if r["id"] not in present]
            if rows:
                connection.execute(PredictionRow.__table__.insert(), rows)

    def _committed(self, work) -> Any:
        """Run `work(session)` in one transaction; a database that does not take it raises StoreUnavailable."""
        try:
            with Session(self.engine) as session, session.begin():
                return work(session)
        except OperationalError as exc:
            raise StoreUnavailable(f"the store did not take the write: {str(exc.orig)[:200]}") from exc

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued prediction is written; False on timeout."""
        self._hurry.set()
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending.unfinished_tasks == 0, timeout)

    def get_prediction(self, prediction_id: str, wait_s: float | None = None) -> Prediction:
        """One prediction with its feedback; raises UnknownPrediction.

        A client may ask for what it was just told about, and another replica may have answered that:
        an id of ours that is not there yet is looked for again for up to `wait_s` (default: two
        gathering windows and a write) while that replica's writer catches up.
        """
        if not plausible_id(prediction_id):
            raise UnknownPrediction(prediction_id)
        self.flush()  # what this process answered is written first
        if wait_s is None:
            wait_s = 2 * self.gather_s + 0.5
        deadline = time.monotonic() + (wait_s if UUID4.fullmatch(prediction_id) else 0.0)
        with Session(self.engine) as session:
            while (row := session.get(PredictionRow, prediction_id)) is None:
                if time.monotonic() >= deadline:
                    raise UnknownPrediction(prediction_id)
                session.rollback()  # a fresh snapshot for the next look
                time.sleep(0.05)
            prediction = _prediction(row)
            feedback = session.scalars(select(FeedbackRow).where(FeedbackRow.prediction_id == prediction_id)
                                       .order_by(FeedbackRow.created_at)).all()
            prediction.feedback = [_feedback(f) for f in feedback]
            return prediction

    def list_predictions(self, limit: int = 50, offset: int = 0,
                         before: tuple[datetime, str] | None = None) -> list[Prediction]:
        """Newest first; page with offset, or with a (created_at, id) cursor from the previous page."""
        query = select(PredictionRow).order_by(PredictionRow.created_at.desc(), PredictionRow.id.desc())
        if before is not None:
            at, last_id = before
            query = query.where((PredictionRow.created_at < at)
                                | ((PredictionRow.created_at == at) & (PredictionRow.id < last_id)))
        with Session(self.engine) as session:
            rows = session.scalars(query.offset(offset).limit(limit)).all()
            page = [_prediction(r) for r in rows]
            # The page's feedback in one query, so a history view needs no call per row.
            by_id = {p.id: p for p in page}
            if by_id:
                for f in session.scalars(select(FeedbackRow).where(FeedbackRow.prediction_id.in_(list(by_id)))
                                         .order_by(FeedbackRow.created_at)):
                    by_id[f.prediction_id].feedback.append(_feedback(f))
            return page

    def count_predictions(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(PredictionRow)) or 0

    def predictions_since(self, since: datetime, limit: int = 10_000) -> list[Prediction]:
        """Predictions logged at or after `since`, oldest first (the drift monitor's window)."""
        with Session(self.engine) as session:
            rows = session.scalars(select(PredictionRow).where(PredictionRow.created_at >= since)
                                   .order_by(PredictionRow.created_at).limit(limit)).all()
            return [_prediction(r) for r in rows]

    # -- feedback ------------------------------------------------------------------------------
    def add_feedback(self, prediction_id: str, label: str, source: str = "api", actor: str = "anonymous") -> str:
        """Record a label for a prediction and its audit event in one committed transaction.

        Returns only once the row is committed; a write the database did not take raises (StoreUnavailable).
        """
        if not plausible_id(prediction_id):
            raise UnknownPrediction(prediction_id)
        self.flush()
        feedback_id = new_id()
        now = utcnow()

        def write(session: Session) -> None:
            if session.get(PredictionRow, prediction_id) is None:
                raise UnknownPrediction(prediction_id)
            session.add(FeedbackRow(id=feedback_id, prediction_id=prediction_id, label=label,
                                    created_at=now, source=source))
            session.add(AuditRow(id=new_id(), at=now, actor=actor, event="feedback",
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
        self.flush()

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
            for audited in session.scalars(select(AuditRow).where(AuditRow.event == "feedback", window)):
                if (audited.details or {}).get("feedback_id") == feedback_id:
                    audited.details = {k: v for k, v in audited.details.items() if k != "label"} | {"erased": True}
            session.execute(delete(FeedbackRow).where(FeedbackRow.id == feedback_id))
            session.add(AuditRow(id=new_id(), at=utcnow(), actor=actor, event="feedback_erased",
                                 details={"feedback_id": feedback_id}))
            return key

        key = self._committed(write)
        if key and not self._blob_in_use(key):
            self.blobs.delete(key)

    def _blob_in_use(self, key: str) -> bool:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(PredictionRow)
                                  .where(PredictionRow.blob_key == key)) > 0

    def list_feedback(self, since: datetime | None = None, limit: int = 10_000) -> list[Feedback]:
        """Feedback oldest first, optionally only from `since` on (what a retrain learns from)."""
        query = select(FeedbackRow).order_by(FeedbackRow.created_at)
        if since is not None:
            query = query.where(FeedbackRow.created_at >= since)
        with Session(self.engine) as session:
            return [_feedback(r) for r in session.scalars(query.limit(limit)).all()]

    def count_feedback(self, since: datetime | None = None) -> int:
        query = select(func.count()).select_from(FeedbackRow)
        if since is not None:
            query = query.where(FeedbackRow.created_at >= since)
        with Session(self.engine) as session:
            return session.scalar(query) or 0

    # -- audit ---------------------------------------------------------------------------------
    def audit(self, actor: str, event_name: str, details: dict[str, Any] | None = None) -> str:
        """Append an audit event (committed before returning)."""
        event_id = new_id()
        row = AuditRow(id=event_id, at=utcnow(), actor=actor, event=event_name,
                       details=json.loads(json.dumps(details or {}, default=str)))
        self._committed(lambda session: session.add(row))
        return event_id

    def list_audit(self, limit: int = 50, offset: int = 0, event_name: str | None = None) -> list[AuditEvent]:
        """Audit events, newest first."""
        query = select(AuditRow).order_by(AuditRow.at.desc(), AuditRow.id.desc())
        if event_name:
            query = query.where(AuditRow.event == event_name)
        with Session(self.engine) as session:
            rows = session.scalars(query.offset(offset).limit(limit)).all()
            return [AuditEvent(r.id, _aware(r.at), r.actor, r.event, r.details) for r in rows]

    def close(self) -> None:
        """Write what is queued, stop the writer, release connections."""
        self._closing.set()
        self._hurry.set()
        self._writer.join(timeout=30)
        self.engine.dispose()
