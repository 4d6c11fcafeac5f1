"""The labelling queue: of the newest predictions, the ones most worth a person's label, best first.

A bounded read (the newest `window` predictions by the page index, however large the table) and a pure
ranking over plain values: predictions of the latest drift episode first, then the closest calls (least
margin between the two likeliest classes, then most entropy), one predicted class after another, and each
image once. A prediction qualifies while it has an image and no label: erasure removes the image, feedback
the need.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from store.events import Event
from store.schema import FeedbackRow, PredictionRow, aware
from store.store import LABELLED, Store

DEFAULT_WINDOW = 2000
MAX_WINDOW = 10_000
# Drift checks read to find the latest drift episode, newest first (the audit event index answers it).
DRIFT_CHECKS = 100


@dataclass(frozen=True)
class Candidate:
    """A prediction that may be queued: it has an image and no label yet."""

    prediction_id: str
    created_at: datetime
    model_version: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    blob_key: str

    @cached_property
    def margin(self) -> float:
        """Top-1 minus top-2 probability: near 0 when the model could not tell the two apart."""
        top = sorted(self.probabilities.values(), reverse=True) + [0.0, 0.0]
        return top[0] - top[1]

    @cached_property
    def entropy(self) -> float:
        """Entropy of the probabilities over its maximum: 0 for a certain answer, 1 when every class is as likely."""
        if len(self.probabilities) < 2:
            return 0.0
        nats = -sum(p * math.log(p) for p in self.probabilities.values() if p > 0)
        return min(1.0, max(0.0, nats / math.log(len(self.probabilities))))

    @cached_property
    def runner_up(self) -> str | None:
        """The class the model found next most likely."""
        others = sorted((p, c) for c, p in self.probabilities.items() if c != self.label)
        return others[-1][1] if others else None


@dataclass(frozen=True)
class DriftEpisode:
    """When the latest drift lasted: after the last calm check before it (the first drifted window's predictions
    came after that check; None: no calm check was read, so from the first prediction read) until its last
    drifted check (None while it lasts)."""

    start: datetime | None
    end: datetime | None

    def covers(self, at: datetime) -> bool:
        return (self.start is None or at > self.start) and (self.end is None or at <= self.end)


def drift_episode(checks: Sequence[tuple[datetime, bool]]) -> DriftEpisode | None:
    """The latest drift episode from drift checks (when, drifted), newest first; None when none drifted."""
    drifted = [i for i, (_, was) in enumerate(checks) if was]
    if not drifted:
        return None
    newest = oldest = drifted[0]
    while oldest + 1 < len(checks) and checks[oldest + 1][1]:
        oldest += 1
    start = checks[oldest + 1][0] if oldest + 1 < len(checks) else None
    return DriftEpisode(start, checks[newest][0] if newest > 0 else None)


def rank(candidates: Iterable[Candidate], limit: int, episode: DriftEpisode | None = None) -> list[Candidate]:
    """The `limit` candidates most worth a label: those of the drift episode before the others; within each
    group one per predicted class in turn (so a page is not N of the model's favourite mistake), each turn
    least margin first, then most entropy, then newest. An image predicted more than once is queued once."""
    chosen: list[Candidate] = []
    for group in closest_first(candidates, episode):
        chosen += class_by_class(group)
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def closest_first(candidates: Iterable[Candidate], episode: DriftEpisode | None = None) -> list[list[Candidate]]:
    """The candidates in two groups, those of the drift episode and the others (either may be empty), each least
    margin first, then most entropy, then newest; an image predicted more than once only at its closest call."""
    def in_episode(c: Candidate) -> bool:
        return episode is not None and episode.covers(c.created_at)

    by_image: dict[str, Candidate] = {}
    for c in sorted(candidates, key=lambda c: (not in_episode(c), c.margin, -c.entropy, -c.created_at.timestamp(),
                                               c.prediction_id)):
        by_image.setdefault(c.blob_key, c)
    return [[c for c in by_image.values() if in_episode(c)], [c for c in by_image.values() if not in_episode(c)]]


def class_by_class(ranked: list[Candidate]) -> list[Candidate]:
    """Ranked candidates interleaved by predicted class: every class's best, then every class's second, ..."""
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(ranked):
        by_class.setdefault(c.label, []).append(i)
    turns = itertools.zip_longest(*by_class.values())
    return [ranked[i] for turn in turns for i in sorted(i for i in turn if i is not None)]


def classes_of(candidates: Iterable[Candidate]) -> list[str]:
    """Every class these predictions could be labelled with, in the model's order (the largest set's first)."""
    by_size = sorted(candidates, key=lambda c: len(c.probabilities), reverse=True)
    return list(dict.fromkeys(c for candidate in by_size for c in candidate.probabilities))


def unlabelled_query(window: int) -> Select:
    """Of the newest `window` predictions (a walk down the page index), those with an image and no feedback."""
    newest = (select(PredictionRow.id).order_by(PredictionRow.created_at.desc(), PredictionRow.id.desc())
              .limit(window).subquery())
    return (select(PredictionRow.id, PredictionRow.created_at, PredictionRow.model_version, PredictionRow.label,
                   PredictionRow.confidence, PredictionRow.probabilities, PredictionRow.blob_key)
            .join(newest, newest.c.id == PredictionRow.id)
            .where(PredictionRow.blob_key.is_not(None), ~LABELLED))


def labelled_images_query(window: int) -> Select:
    """The images of the newest `window` labels (by the feedback index)."""
    newest = (select(FeedbackRow.prediction_id).order_by(FeedbackRow.created_at.desc(), FeedbackRow.id.desc())
              .limit(window).subquery())
    return (select(PredictionRow.blob_key).join(newest, newest.c.prediction_id == PredictionRow.id)
            .where(PredictionRow.blob_key.is_not(None)))


def unlabelled(store: Store, window: int = DEFAULT_WINDOW) -> list[Candidate]:
    """The candidates among the newest `window` predictions; an image labelled through another prediction (the
    same bytes sent again) among the newest `window` labels is not asked for twice."""
    with Session(store.engine) as session:
        rows = session.execute(unlabelled_query(window)).all()
        labelled = set(session.scalars(labelled_images_query(window)))
    return [Candidate(r.id, aware(r.created_at), r.model_version, r.label, r.confidence, r.probabilities or {},
                      r.blob_key) for r in rows if r.blob_key not in labelled]


def latest_drift_episode(store: Store) -> DriftEpisode | None:
    """The latest drift episode among the newest DRIFT_CHECKS drift checks the monitor recorded."""
    checks = store.list_audit(DRIFT_CHECKS, 0, Event.DRIFT_CHECK)
    return drift_episode([(c.at, (c.details or {}).get("drifted") is True) for c in checks])
