"""Rollouts in the database: the one a challenger is in now, and both models' answers to live requests.

Shared state, so every Serve replica on every node sees the same stage and share (each polls `current`),
the driver that moves the stages keeps its heartbeat here, and an operator's promote or abort is a
`command` the driver carries out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.schema import FeedbackRow, RolloutRow, RolloutScoreRow, aware, create_schema, make_engine, new_id, utcnow

LIVE_STAGES = ("shadow", "canary")
ENDED_STAGES = ("promoted", "rolled_back", "abandoned")
COMMANDS = ("promote", "abort")
HEARTBEAT_TTL_S = 30.0   # a rollout whose driver has been silent this long is ignored by the replicas
LATENCY_ROWS = 2000      # the newest answers the latency percentiles are taken over
KEEP_SCORES_OF = 5       # rollouts whose scores are kept (older ones' are deleted when one starts)


class RolloutBusy(RuntimeError):
    """Another rollout is under way."""


@dataclass
class Rollout:
    id: str
    champion: str
    challenger: str
    stage: str
    canary_share: float
    shadow_share: float
    started_at: datetime
    stage_started_at: datetime
    heartbeat_at: datetime
    ended_at: datetime | None = None
    command: str | None = None
    command_by: str | None = None
    reason: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.ended_at is None

    def stale(self, ttl_s: float = HEARTBEAT_TTL_S) -> bool:
        """Live, but its driver has not been heard from for ttl_s (its job died): serve the champion alone."""
        return self.live and (utcnow() - self.heartbeat_at).total_seconds() > ttl_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("started_at", "stage_started_at", "heartbeat_at", "ended_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


@dataclass(frozen=True)
class ScoreFigures:
    """What the scored live requests of one rollout say about the challenger (all of them, or since a moment)."""

    scored: int = 0               # requests both models answered (or the challenger tried to)
    canaried: int = 0             # of them, answered by the challenger
    challenger_runs: int = 0      # the challenger ran on these...
    errors: int = 0               # ...and failed on these (the caller got the champion's answer)
    agreed: int = 0               # both models answered and agreed
    compared: int = 0             # both models answered
    champion_p99_ms: float | None = None     # over forward passes (a batch's rows share one), newest first
    challenger_p99_ms: float | None = None
    latency_runs: int = 0                    # the forward passes behind the two p99s
    labelled: int = 0             # of the compared, with feedback
    champion_right: int = 0
    challenger_right: int = 0
    challenger_only_right: int = 0  # b of the paired test
    champion_only_right: int = 0    # c

    @property
    def error_rate(self) -> float:
        return self.errors / self.challenger_runs if self.challenger_runs else 0.0

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": round(self.error_rate, 6),
                "agreement": None if self.agreement is None else round(self.agreement, 6)}


def record(row: RolloutRow) -> Rollout:
    return Rollout(row.id, row.champion, row.challenger, row.stage, row.canary_share, row.shadow_share,
                   aware(row.started_at), aware(row.stage_started_at), aware(row.heartbeat_at),
                   aware(row.ended_at) if row.ended_at else None, row.command, row.command_by, row.reason,
                   row.figures or {})


def p99(values: list[float]) -> float | None:
    return round(float(np.percentile(values, 99)), 3) if values else None


class Rollouts:
    """The rollouts table and the scores of live requests, over one database engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def from_url(cls, database_url: str) -> Rollouts:
        engine = make_engine(database_url)
        create_schema(engine)
        return cls(engine)

    def _newest(self, session: Session, live_only: bool) -> RolloutRow | None:
        query = select(RolloutRow).order_by(RolloutRow.started_at.desc()).limit(1)
        return session.scalars(query.where(RolloutRow.ended_at.is_(None)) if live_only else query).first()

    def current(self) -> Rollout | None:
        """The rollout under way (stale or not), or None."""
        with Session(self.engine) as session:
            row = self._newest(session, live_only=True)
            return record(row) if row else None

    def latest(self) -> Rollout | None:
        """The newest rollout, under way or ended."""
        with Session(self.engine) as session:
            row = self._newest(session, live_only=False)
            return record(row) if row else None

    def start(self, champion: str, challenger: str, shadow_share: float, figures: dict) -> Rollout:
        """Open a rollout in its shadow stage; RolloutBusy while another one's driver is alive (a stale one
        is ended as abandoned first). Scores of all but the last few rollouts are deleted: the table stays small."""
        current = self.current()
        if current is not None:
            if not current.stale():
                raise RolloutBusy(f"rollout {current.id} of v{current.challenger} is {current.stage}")
            self.end(current.id, "abandoned", "its driver stopped answering (the retrain job ended)")
        now, rollout_id = utcnow(), new_id()
        row = RolloutRow(id=rollout_id, champion=str(champion), challenger=str(challenger), stage="shadow",
                         canary_share=0.0, shadow_share=float(shadow_share), started_at=now, stage_started_at=now,
                         heartbeat_at=now, figures=figures)
        with Session(self.engine) as session, session.begin():
            session.add(row)
            kept = select(RolloutRow.id).order_by(RolloutRow.started_at.desc()).limit(KEEP_SCORES_OF)
            session.execute(delete(RolloutScoreRow).where(RolloutScoreRow.rollout_id.not_in(kept.scalar_subquery())))
        return self.get(rollout_id)

    def get(self, rollout_id: str) -> Rollout | None:
        with Session(self.engine) as session:
            row = session.get(RolloutRow, rollout_id)
            return record(row) if row else None

    def update(self, rollout_id: str, **values) -> bool:
        """Change a rollout under way (stage, shares, figures) and renew its heartbeat; False once it ended."""
        values = {**values, "heartbeat_at": utcnow()}
        if "stage" in values:
            values["stage_started_at"] = values["heartbeat_at"]
        return self._while_live(rollout_id, values)

    def command(self, rollout_id: str, command: str, actor: str) -> bool:
        """Leave an operator's promote or abort for the driver; False when the rollout already ended."""
        if command not in COMMANDS:
            raise ValueError(f"command {command!r}: expected one of {', '.join(COMMANDS)}")
        return self._while_live(rollout_id, {"command": command, "command_by": actor[:128]})

    def end(self, rollout_id: str, stage: str, reason: str, figures: dict | None = None) -> bool:
        """Close a rollout under way as promoted, rolled_back or abandoned; False when it had ended already
        (exactly one of two racing enders wins)."""
        if stage not in ENDED_STAGES:
            raise ValueError(f"stage {stage!r}: a rollout ends as one of {', '.join(ENDED_STAGES)}")
        values: dict[str, Any] = {"stage": stage, "canary_share": 0.0, "ended_at": utcnow(), "reason": reason[:1000]}
        if figures is not None:
            values["figures"] = figures
        return self._while_live(rollout_id, values)

    def _while_live(self, rollout_id: str, values: dict) -> bool:
        """Set `values` on the rollout if it has not ended, in one statement (a racing end wins or loses whole)."""
        with Session(self.engine) as session, session.begin():
            done = session.execute(update(RolloutRow).where(RolloutRow.id == rollout_id, RolloutRow.ended_at.is_(None))
                                   .values(**values))
            return done.rowcount == 1

    # -- scores ------------------------------------------------------------------------------------
    def record_scores(self, rows: list[dict]) -> None:
        """Both models' answers to live requests (a replica's background batch)."""
        if rows:
            with Session(self.engine) as session, session.begin():
                session.execute(RolloutScoreRow.__table__.insert(), rows)

    def figures(self, rollout_id: str, since: datetime | None = None) -> ScoreFigures:
        """Counts, agreement, error rate, p99 latencies and the paired right/wrong counts on feedback."""
        s = RolloutScoreRow
        where = [s.rollout_id == rollout_id] + ([s.created_at >= since] if since is not None else [])
        both = s.champion_label.is_not(None) & s.challenger_label.is_not(None)
        counts = select(func.count(), func.count().filter(s.answered_by == "challenger"),
                        func.count().filter(s.challenger_label.is_not(None) | s.error.is_not(None)),
                        func.count().filter(s.error.is_not(None)), func.count().filter(both),
                        func.count().filter(both & (s.champion_label == s.challenger_label))).where(*where)
        newest = select(s.champion_ms, s.challenger_ms).where(*where).order_by(s.created_at.desc()).limit(LATENCY_ROWS)
        labelled = (select(s.prediction_id, s.champion_label, s.challenger_label, FeedbackRow.label)
                    .join(FeedbackRow, FeedbackRow.prediction_id == s.prediction_id).where(*where, both)
                    .order_by(FeedbackRow.created_at))
        with Session(self.engine) as session:
            scored, canaried, runs, errors, compared, agreed = session.execute(counts).one()
            times = set(session.execute(newest).all())  # one per forward pass: a batch's rows share its times
            # A prediction labelled twice: its latest label wins (ordered by feedback time).
            truth = {pid: (champ, chall, label) for pid, champ, chall, label in session.execute(labelled)}
        champion_right = [champ == label for champ, _, label in truth.values()]
        challenger_right = [chall == label for _, chall, label in truth.values()]
        return ScoreFigures(
            scored, canaried, runs, errors, agreed, compared,
            p99([t[0] for t in times if t[0] is not None]), p99([t[1] for t in times if t[1] is not None]),
            sum(1 for t in times if None not in t), len(truth), sum(champion_right), sum(challenger_right),
            sum(b and not a for a, b in zip(champion_right, challenger_right)),
            sum(a and not b for a, b in zip(champion_right, challenger_right)))


def score_row(rollout: Rollout, prediction_id: str, answered_by: str, champion: dict | None, challenger: dict | None,
              error: str | None = None) -> dict:
    """A rollout_scores row from each model's answer ({"label", "ms"}, or None when it did not run)."""
    return {"prediction_id": prediction_id, "rollout_id": rollout.id, "stage": rollout.stage,
            "answered_by": answered_by, "champion_label": (champion or {}).get("label"),
            "challenger_label": (challenger or {}).get("label"), "champion_ms": (champion or {}).get("ms"),
            "challenger_ms": (challenger or {}).get("ms"), "error": error[:300] if error else None,
            "created_at": utcnow()}

