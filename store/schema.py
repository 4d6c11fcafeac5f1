"""Tables, the records the store hands out, its errors, and the database engine."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, String, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class Base(DeclarativeBase):
    pass


# Drift feature keys of a prediction's `features`: emb_0..emb_N, its embedding along the model's drift axes
# (train/features.py writes them; the labelling queue reads them back).
EMBEDDING_KEY = "emb_{}"


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


class FeedbackMaskRow(Base):
    """A corrected mask sent as feedback for a segmentation model's prediction: JSON (size, run-length counts
    per class), in the database with its feedback row, so it is durable and erased in the same transaction."""

    __tablename__ = "feedback_masks"
    feedback_id: Mapped[str] = mapped_column(ForeignKey("feedback.id"), primary_key=True)
    mask: Mapped[dict] = mapped_column(JSON)


class AuditRow(Base):
    __tablename__ = "audit"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(128), index=True)
    details: Mapped[dict] = mapped_column(JSON)


class LeaseRow(Base):
    """Who holds a named, expiring claim (the one retrain that may run at a time)."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RolloutRow(Base):
    """A challenger's way to live traffic after its gate: shadow, then canary steps, then promoted or rolled back."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    champion: Mapped[str] = mapped_column(String(64))
    challenger: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(32))           # shadow | canary | promoted | rolled_back | abandoned
    canary_share: Mapped[float] = mapped_column(Float)       # of live requests the challenger answers now
    shadow_share: Mapped[float] = mapped_column(Float)       # of the champion's answers the challenger also scores
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    stage_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # its driver is alive while fresh
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    command: Mapped[str | None] = mapped_column(String(16), nullable=True)    # an operator's promote | abort
    command_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    figures: Mapped[dict] = mapped_column(JSON)


class RolloutScoreRow(Base):
    """Both models' answers to one live request during a rollout (one of them in the background)."""

    __tablename__ = "rollout_scores"
    prediction_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(String(36), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    answered_by: Mapped[str] = mapped_column(String(16))     # champion | challenger: whose answer the caller got
    champion_label: Mapped[str | None] = mapped_column(String(255), nullable=True)
    challenger_label: Mapped[str | None] = mapped_column(String(255), nullable=True)
    champion_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    challenger_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(String(300), nullable=True)   # the challenger's, when it failed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# Every lookup the API and the loop make has an index, so none scans a table that grows with traffic.
# Pages are ordered newest first; the id breaks ties between rows logged in the same instant.
Index("ix_predictions_page", PredictionRow.created_at.desc(), PredictionRow.id.desc())
Index("ix_predictions_blob", PredictionRow.blob_key)  # erasure: does another prediction share the image?
Index("ix_audit_event_at", AuditRow.event, AuditRow.at.desc(), AuditRow.id.desc())  # the latest event of a kind
Index("ix_feedback_newest", FeedbackRow.created_at.desc(), FeedbackRow.id.desc())  # a retrain's feedback window


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
    """Create missing tables and indexes. Several processes (Serve replicas, the monitor, a job) may start on a fresh
    database at once: the losers of that race see "already exists" and simply look again."""
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine)
            for table in Base.metadata.sorted_tables:  # an index added since the tables were made
                for index in table.indexes:
                    index.create(engine, checkfirst=True)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def prediction_record(row: PredictionRow) -> Prediction:
    return Prediction(row.id, aware(row.created_at), row.model_version, row.label, row.confidence,
                      row.probabilities, row.features or {}, row.blob_key)


def feedback_record(row: FeedbackRow) -> Feedback:
    return Feedback(row.id, row.prediction_id, row.label, aware(row.created_at), row.source)


def aware(value: datetime) -> datetime:
    # SQLite hands datetimes back naive; they were written in UTC.
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
