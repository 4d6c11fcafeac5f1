"""rayloop_pruned_total: every deletion retention makes, counted by kind, from whichever process made it
(the drift monitor's pruning, a training run's checkpoints, a retrain's discarded challenger)."""

from __future__ import annotations

from functools import lru_cache

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

