"""Orders a labelling queue could ask for labels in, measured by bench/label_queue.py against a random sample.

Each is pure over the queue's Candidates (store.label_queue) with their embedding, the drift features a replica
logs per prediction (emb_0..emb_N: the image along the model's drift axes), and the champion's drift reference
(where its reference images lie along those axes: Reference, for the orders by distance from it); each is nested:
a larger budget labels what a smaller one did and more. `least margin` is the queue's own order
(store.label_queue.rank); the others are the candidates for replacing it that the benchmark measured
(bench/RESULTS.md): diversity (k-center), a random share, and distance from the reference. None needed fewer
labels than a random sample over the shifts, so the queue reads neither the embedding (its read of the features
column would cost more than its ranking) nor the reference. The benchmark's pool is all shifted traffic: one
drift episode group.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256

import numpy as np

from store.label_queue import Candidate, class_by_class, closest_first, rank
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


def least_margin(pool: list[Embedded], budget: int, reference: Reference | None = None) -> list[Embedded]:
    """The queue's order (store.label_queue.rank): least margin first, one predicted class after another."""
    return rank(pool, budget)


def k_center(pool: list[Embedded], budget: int, reference: Reference | None = None) -> list[Embedded]:
    """The closest call, then each next the farthest in embedding space from every one picked before it."""
    return farthest_first(closest_first(pool)[1], budget)


def uncertain_k_center(pool: list[Embedded], budget: int, reference: Reference | None = None) -> list[Embedded]:
    """k-center over the less sure half (by margin) first, then over the rest, away from those picked."""
    ranked = closest_first(pool)[1]
    half = farthest_first(ranked[:(len(ranked) + 1) // 2], budget)
    return half + farthest_first(ranked[(len(ranked) + 1) // 2:], budget - len(half), half)


def margin_or_chance(pool: list[Embedded], budget: int, reference: Reference | None = None) -> list[Embedded]:
    """Every other pick the next least-margin one, the others by chance (by_chance)."""
    return alternate(least_margin(pool, budget), by_chance(pool), budget)


def k_center_or_chance(pool: list[Embedded], budget: int, reference: Reference | None = None) -> list[Embedded]:
    """Every other pick the next k-center one, the others by chance (by_chance)."""
    return alternate(k_center(pool, budget), by_chance(pool), budget)


def farthest_from_reference(pool: list[Embedded], budget: int, reference: Reference) -> list[Embedded]:
    """Farthest from the champion's reference images first (Mahalanobis distance along its drift axes)."""
    ranked = closest_first(pool)[1]
    return farthest(ranked, from_reference(ranked, reference))[:budget]


def far_by_class(pool: list[Embedded], budget: int, reference: Reference) -> list[Embedded]:
    """Farthest from the champion's reference images first, one predicted class after another."""
    ranked = closest_first(pool)[1]
    return class_by_class(farthest(ranked, from_reference(ranked, reference)))[:budget]


def far_from_its_class(pool: list[Embedded], budget: int, reference: Reference) -> list[Embedded]:
    """Farthest from the reference images of the class the champion predicted first, one class after another."""
    ranked = closest_first(pool)[1]
    return class_by_class(farthest(ranked, from_its_class(ranked, reference)))[:budget]


def far_and_unsure(pool: list[Embedded], budget: int, reference: Reference) -> list[Embedded]:
    """The least product of the rank by distance from the reference (farthest first) and the rank by margin
    (least first), one predicted class after another."""
    ranked = closest_first(pool)[1]
    by_distance = np.empty(len(ranked))
    by_distance[np.argsort(-from_reference(ranked, reference), kind="stable")] = np.arange(1, len(ranked) + 1)
    order = sorted(range(len(ranked)), key=lambda i: (i + 1) * by_distance[i])
    return class_by_class([ranked[i] for i in order])[:budget]


# Each strategy's picks, nested: a larger budget labels what a smaller one did and more. "random" is drawn apart.
ORDERS = {"least margin": least_margin, "k-center": k_center, "uncertain k-center": uncertain_k_center,
          "margin or chance": margin_or_chance, "k-center or chance": k_center_or_chance,
          "farthest from reference": farthest_from_reference, "far by class": far_by_class,
          "far from its class": far_from_its_class, "far and unsure": far_and_unsure}
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


# -- orders by distance from the champion's drift reference ------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """Where the champion's reference images lie along its drift axes (the emb_ features of the drift reference
    train.pipeline.finalize logs with the model): their mean and inverse covariance, for a Mahalanobis distance;
    and each predicted class's mean with the inverse of the covariance pooled within the classes."""

    mean: np.ndarray
    inverse_covariance: np.ndarray
    class_means: dict[str, np.ndarray]
    within_inverse_covariance: np.ndarray


def reference_of(embeddings: np.ndarray, classes: Sequence[str]) -> Reference:
    """The reference's statistics from its embeddings (a row per image) and predicted classes. Pseudo-inverses:
    an axis the reference does not vary along (a reference smaller than the drift axes) counts for nothing."""
    points = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(classes)
    means = {str(c): points[labels == c].mean(0) for c in dict.fromkeys(labels.tolist())}
    within = points - np.array([means[str(c)] for c in labels]).reshape(points.shape)
    return Reference(points.mean(0), inverse(points - points.mean(0)), means, inverse(within, len(means)))


def inverse(centred: np.ndarray, groups: int = 1) -> np.ndarray:
    covariance = centred.T @ centred / max(1, len(centred) - groups)
    return np.linalg.pinv(covariance, hermitian=True)


def mahalanobis(pool: Sequence[Embedded], centres: np.ndarray, inverse_covariance: np.ndarray) -> np.ndarray:
    """Each candidate's Mahalanobis distance from its centre (a row per candidate); -inf for one whose embedding
    has not the reference's size (none logged, or another model's), so it comes after every other."""
    size = len(inverse_covariance)
    found = np.full(len(pool), -np.inf)
    rows = [i for i, c in enumerate(pool) if len(c.embedding) == size]
    if rows:
        diff = np.array([pool[i].embedding for i in rows], dtype=np.float64) - centres[rows]
        found[rows] = np.sqrt(np.maximum(0.0, np.einsum("ij,jk,ik->i", diff, inverse_covariance, diff)))
    return found


def from_reference(pool: Sequence[Embedded], reference: Reference) -> np.ndarray:
    return mahalanobis(pool, np.tile(reference.mean, (len(pool), 1)), reference.inverse_covariance)


def from_its_class(pool: Sequence[Embedded], reference: Reference) -> np.ndarray:
    """The distance from the reference images the champion gave the same class (from the reference's mean when
    it gave that class to none)."""
    centres = np.array([reference.class_means.get(c.label, reference.mean) for c in pool]).reshape(
        len(pool), len(reference.mean))
    return mahalanobis(pool, centres, reference.within_inverse_covariance)


def farthest(ranked: list[Embedded], distance: np.ndarray) -> list[Embedded]:
    """`ranked` farthest first; among equals (and after every measured one, those not measured) in its order."""
    return [ranked[i] for i in sorted(range(len(ranked)), key=lambda i: -distance[i])]
