"""The retrain job: feedback in, Ray Tune search, gate, promotion (rayloop/job.py runs it as a Ray Job)."""

from __future__ import annotations

import argparse
import contextlib
import signal
from typing import Callable, ContextManager

import numpy as np

from cluster.ray_cluster import connect
from cluster.settings import Settings
from store import Event, Store
from store.rollouts import Rollouts
from train import registry
from train.masks import encode_mask_png, mask_from_json
from train.tasks import task_of
from tune import canary
from tune.retrain import FeedbackSamples, RetrainResult, retrain

# on_promote(settings, version, audit): what happens once a challenger is champion (a Serve rollout).
OnPromote = Callable[[Settings, str, Callable[[str, dict], None]], object]


def feedback_samples(store: Store, classes: list[str], window: int, masks: bool = False) -> FeedbackSamples:
    """The newest `window` labels users sent back (latest label per prediction), as image files.

    One query; the images stay in the blob store until a training run streams them. With `masks` (a task that
    learns from corrected masks: train/tasks) only feedback with a corrected mask counts, and each mask is
    written to the blob store as a PNG for the decode tasks to read (remove_masks deletes them after the run).
    """
    index = {name: i for i, name in enumerate(classes)}
    ids, paths, labels, mask_paths = [], [], [], []
    for prediction_id, label, blob_key, *mask in store.labelled_images(window, masks=masks):
        if label not in index:
            continue  # a label the model cannot learn (class list changed): skipped, not guessed
        if not store.blobs.exists(blob_key):
            continue  # erased: nothing to learn from
        ids.append(prediction_id)
        paths.append(store.blobs.relative(blob_key))
        labels.append(index[label])
        if masks:
            mask_paths.append(store.blobs.relative(store.blobs.put(encode_mask_png(mask_from_json(mask[0])))))
    return FeedbackSamples(ids, paths, np.asarray(labels, dtype=np.int64), root=store.blobs.root,
                           masks=mask_paths if masks else None)


def remove_masks(store: Store, samples: FeedbackSamples) -> None:
    """Delete the mask files feedback_samples wrote (one no prediction's image shares: blobs are by content)."""
    for path in samples.masks or []:
        key = path.replace("/", "")
        if not store.blob_in_use(key):
            store.blobs.delete(key)


def release_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating job is dead; returns how many.

    A retrain job whose driver was SIGKILLed leaves its Tune/Train placement group CREATED (seen on
    Ray 2.60): its CPU stays reserved and the next retrain's workers wait for it forever. (rayloop's
    Serve deployments use no placement groups, so a detached Serve app started by a finished CLI
    process is not touched.)
    """
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_placement_groups

    try:
        dead = {j["JobID"] for j in ray._private.state.jobs() if j.get("IsDead")}
        groups = list_placement_groups(filters=[("state", "=", "CREATED")], limit=10_000,
                                       raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - best effort: never stop a retrain over housekeeping
        print(f"[rayloop] could not list placement groups: {exc!r}", flush=True)
        return 0
    released = 0
    for group in groups:
        if group.creator_job_id in dead:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
            released += 1
    return released


def run_job(settings: Settings, trigger: str, actor: str, on_promote: OnPromote | None = None,
            ray_job: str | None = None, hold: Callable[[Store], ContextManager] | None = None,
            serving: Callable[[Settings], bool] | None = None) -> RetrainResult:
    """Retrain from the store's feedback; on promotion, call on_promote (rayloop/job.py: a Serve rollout).

    With rollout.staged and Serve running (`serving`), a challenger that passed its gate goes through shadow
    and canary steps on live traffic first (tune/canary.py) and is promoted only if it holds up there.

    `hold(store)` guards the run (the one-retrain-at-a-time lease). Every audit event carries `ray_job`
    (the submission id) when run as a Ray Job, so a job that died without a word can be told apart later.
    """
    connect(settings)
    released = release_orphaned_placement_groups()
    if released:
        print(f"[rayloop] released {released} placement group(s) left by dead jobs", flush=True)
    store = Store.from_settings(settings)
    tag = {"ray_job": ray_job} if ray_job else {}

    def audit(event: str, details: dict) -> None:
        store.audit(actor, event, {**details, **tag})

    try:
        with hold(store) if hold else contextlib.nullcontext():
            champion, _ = registry.load_registered(settings)
            samples = feedback_samples(store, champion.classes, settings.tune.feedback_window,
                                       task_of(champion).learns_from_masks)
            promoted = (lambda version: on_promote(settings, version, audit)) if on_promote else None
            try:
                return retrain(settings, samples, trigger=trigger, audit=audit, on_promote=promoted,
                               stage=staged(settings, store, audit) if serving is not None and serving(settings)
                               else None)
            finally:
                remove_masks(store, samples)
    except Exception as exc:
        audit(Event.RETRAIN_FAILED, {"trigger": trigger, "error": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    finally:
        store.close()


def staged(settings: Settings, store: Store, audit: Callable[[str, dict], None]):
    """The staged rollout (tune/canary.py) over the store's database, or None when rollout.staged is off."""
    if not settings.rollout.staged:
        return None
    rollouts = Rollouts(store.engine)
    return lambda challenger, champion, promote: canary.run_stages(settings, rollouts, champion, challenger, audit,
                                                                   promote)


class RetrainStopped(Exception):
    """The job was asked to stop (SIGTERM, e.g. `ray job stop`)."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rayloop.job",
                                     description="Run one retrain (Ray Tune + gate + rollout).")
    parser.add_argument("--trigger", default="manual")
    parser.add_argument("--actor", default="retrain-job")
    parser.add_argument("--no-rollout", action="store_true")
    parser.add_argument("--ray-job", default=None, help="the Ray Job submission id (set by whoever submits it)")
    return parser.parse_args(argv)


def stop_on_sigterm() -> None:
    """`ray job stop` sends SIGTERM first: end through run_job's failure path, which audits it."""
    def stopped(signum, _frame):
        raise RetrainStopped(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stopped)


def report(result: RetrainResult) -> str:
    return (f"[rayloop] {result.job_name}: challenger v{result.challenger_version} "
            f"{'promoted' if result.promoted else 'not promoted'}: {result.gate.reason}")
