"""rayloop_pruned_total: every deletion retention makes, counted by kind, from whichever process made it
(the drift monitor's pruning, a training run's checkpoints, a retrain's discarded challenger)."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from store.schema import FeedbackRow, PredictionRow
from store.store import Store

PREDICTIONS, IMAGES, RUN_RESULTS, CHALLENGER_MODELS = "predictions", "images", "run_results", "challenger_models"


@lru_cache(maxsize=1)
def _counter():
    from ray.util.metrics import Counter

    return Counter("rayloop_pruned_total", "Rows and files deleted by retention, by kind", tag_keys=("kind",))


def count_pruned(kind: str, deleted: int) -> None:
    """Add `deleted` to the metric; nothing outside a Ray process (no exporter to take it) or when zero."""
    if deleted <= 0:
        return
    import ray

    if ray.is_initialized():
        _counter().inc(deleted, tags={"kind": kind})


def cap_images(store: Store, max_bytes: int, batch: int = 500) -> int:
    """Delete the images of the oldest unlabelled predictions until the blob store holds at most `max_bytes`
    (store.max_image_gb); their rows stay, without an image. Labelled predictions keep theirs (a retrain
    learns from them). Returns how many image files went."""
    sizes = store.blobs.sizes()
    total, deleted = sum(sizes.values()), 0
    labelled = select(FeedbackRow.id).where(FeedbackRow.prediction_id == PredictionRow.id).exists()
    while total > max_bytes:
        with Session(store.engine) as session:
            oldest = session.execute(select(PredictionRow.id, PredictionRow.blob_key)
                                     .where(PredictionRow.blob_key.is_not(None), ~labelled)
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
        store._committed(lambda session, ids=ids: session.execute(
            update(PredictionRow).where(PredictionRow.id.in_(ids), ~labelled).values(blob_key=None)))
        for key in {row.blob_key for row in oldest}:
            if not store._blob_in_use(key) and store.blobs.delete(key):  # a newer one with the same bytes keeps it
                total -= sizes.get(key, 0)
                deleted += 1
    return deleted
