"""Orders a labelling queue could ask for labels in, measured by bench/label_queue.py against a random sample.

Each is pure over the queue's Candidates (store.label_queue) with their embedding, the drift features a replica
logs per prediction (emb_0..emb_N: the image along the model's drift axes), and each is nested: a larger budget
labels what a smaller one did and more. `least margin` is the queue's own order (store.label_queue.rank); the
others are the candidates for replacing it that the benchmark measured (bench/RESULTS.md): none needed fewer
labels than a random sample over the shifts, so the queue does not read the embedding (its read of the features
column would cost more than its ranking). The benchmark's pool is all shifted traffic: one drift episode group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256

import numpy as np

from store.label_queue import Candidate, closest_first, rank
from store.schema import EMBEDDING_KEY


@dataclass(frozen=True)
class Embedded(Candidate):
    """A queue candidate with where the model placed its image: the drift features' emb_0..emb_N as logged."""

    embedding: tuple[float, ...] = ()


def embedding_of(features: dict | None) -> tuple[float, ...]:
    """A prediction's embedding from its drift features (emb_0, emb_1, ... while they last); () when it has none
    or one that is not all finite numbers."""
    values = []
    for i in itertools.count():
        value = (features or {}).get(EMBEDDING_KEY.format(i))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            break
        if not math.isfinite(value):
            return ()
        values.append(float(value))
    return tuple(values)


def least_margin(pool: list[Embedded], budget: int) -> list[Embedded]:
    """The queue's order (store.label_queue.rank): least margin first, one predicted class after another."""
    return rank(pool, budget)


def k_center(pool: list[Embedded], budget: int) -> list[Embedded]:
    """The closest call, then each next the farthest in embedding space from every one picked before it."""
    return farthest_first(closest_first(pool)[1], budget)


def uncertain_k_center(pool: list[Embedded], budget: int) -> list[Embedded]:
    """k-center over the less sure half (by margin) first, then over the rest, away from those picked."""
    ranked = closest_first(pool)[1]
    half = farthest_first(ranked[:(len(ranked) + 1) // 2], budget)
    return half + farthest_first(ranked[(len(ranked) + 1) // 2:], budget - len(half), half)


def margin_or_chance(pool: list[Embedded], budget: int) -> list[Embedded]:
    """Every other pick the next least-margin one, the others by chance (by_chance)."""
    return alternate(least_margin(pool, budget), by_chance(pool), budget)


def k_center_or_chance(pool: list[Embedded], budget: int) -> list[Embedded]:
    """Every other pick the next k-center one, the others by chance (by_chance)."""
    return alternate(k_center(pool, budget), by_chance(pool), budget)


# Each strategy's picks, nested: a larger budget labels what a smaller one did and more. "random" is drawn apart.
ORDERS = {"least margin": least_margin, "k-center": k_center, "uncertain k-center": uncertain_k_center,
          "margin or chance": margin_or_chance, "k-center or chance": k_center_or_chance}
QUEUE_ORDER = "least margin"  # the one store.label_queue.rank implements


def farthest_first(ranked: list[Embedded], limit: int, placed: Sequence[Embedded] = ()) -> list[Embedded]:
    """Up to `limit` of `ranked`, each the farthest (Euclidean, in embedding space) from its nearest among the
    ones picked before it and `placed` (greedy k-center); ties go to the one ranked first. Embeddings of two
    model versions (or sizes) are not comparable: each is its own space, where the first pick is infinitely far
    from the others' picks. Candidates without an embedding share a space of size 0: after its first pick,
    they follow in `ranked` order once every other candidate has a copy picked."""
    spaces: dict[tuple[str, int], list[int]] = {}
    for i, c in enumerate(ranked):
        spaces.setdefault(space_of(c), []).append(i)
    points = {key: np.array([ranked[i].embedding for i in rows], dtype=np.float64).reshape(len(rows), key[1])
              for key, rows in spaces.items()}
    nearest = {key: np.full(len(rows), np.inf) for key, rows in spaces.items()}  # squared distance to the picks

    def pick(key: tuple[str, int], point: np.ndarray) -> None:
        np.minimum(nearest[key], ((points[key] - point) ** 2).sum(1), out=nearest[key])

    for c in placed:
        if space_of(c) in spaces:
            pick(space_of(c), np.array(c.embedding, dtype=np.float64))
    chosen: list[Embedded] = []
    for _ in range(min(limit, len(ranked))):
        best = {key: int(far.argmax()) for key, far in nearest.items()}  # argmax: the first of equals
        key = max(best, key=lambda k: (nearest[k][best[k]], -spaces[k][best[k]]))
        chosen.append(ranked[spaces[key][best[key]]])
        pick(key, points[key][best[key]])
        nearest[key][best[key]] = -1.0  # taken
    return chosen


def space_of(c: Embedded) -> tuple[str, int]:
    return c.model_version, len(c.embedding)


def by_chance(pool: list[Embedded]) -> list[Embedded]:
    """A fixed random order: by a hash of the prediction id, the same page on every refresh."""
    return sorted(pool, key=lambda c: sha256(c.prediction_id.encode()).digest())


def alternate(first: list[Embedded], second: list[Embedded], budget: int) -> list[Embedded]:
    """Picks from the two orders in turn, first's first, each prediction once, until `budget` (or both end)."""
    taken: dict[str, Embedded] = {}
    orders = [iter(first), iter(second)]
    while len(taken) < budget and orders:
        order = orders[len(taken) % len(orders)]
        c = next(order, None)
        if c is None:
            orders.remove(order)
        else:
            taken.setdefault(c.prediction_id, c)
    return list(taken.values())
