"""Retraining: Ray Tune (ASHA) over Ray Train trials on base data + feedback, then the gate."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from cluster import storage
from cluster.settings import Settings, TuneSettings
from store import Event, retention
from train import ingest, registry
from train.data import PreparedData, prepared_or_new
from train.decode import Decoder
from train.pipeline import finalize, log, reference_batches
from train.scaling import resolve_use_gpu
from train.train import TrainConfig, TrainingSets, build_model, load_checkpoint, make_trainer, prune_results
from tune.gate import GateResult, GateSet, right_answers, run_gate
from tune.plan import Plan, batch_sizes, plan_search, search_space

Audit = Callable[[str, dict], None]
# (challenger, champion, promote) -> promoted: a staged rollout between the gate and the promotion
Stage = Callable[[str, str, Callable[[], None]], bool]
# Fault injection for tests and drills: "all", or 0-based trial indexes ("0,2"), whose trials crash on start.
FAIL_TRIALS_ENV = "RAYLOOP_TUNE_FAIL_TRIALS"
PLAN_ITEMS = 500  # images of each kind the search plan scores the champion on: a bound of +-0.04 at most


@dataclass
class FeedbackSamples:
    """Labelled images users sent back: their ids, image files (blob store paths) and class indices, and for a
    segmentation model the corrected masks' files (PNG, in the same blob store).

    No pixels: the images are decoded when a training run streams them.
    """

    ids: list[str]
    paths: list[str]
    labels: np.ndarray
    root: str = ""  # the blob store's folder or URI the paths are below; "" = absolute local paths
    masks: list[str] | None = None  # segmentation: each image's corrected mask, below root

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, pick: np.ndarray) -> "FeedbackSamples":
        pick = np.flatnonzero(pick)
        return FeedbackSamples([self.ids[i] for i in pick], [self.paths[i] for i in pick], self.labels[pick],
                               self.root, None if self.masks is None else [self.masks[i] for i in pick])

    def rows(self) -> pd.DataFrame:
        """As manifest rows (path, label, and mask for segmentation) for the decoder."""
        rows = pd.DataFrame({"path": self.paths, "label": self.labels.astype(np.int64)})
        return rows if self.masks is None else rows.assign(mask=self.masks)

    @classmethod
    def empty(cls) -> "FeedbackSamples":
        return cls([], [], np.zeros(0, np.int64))


def split_feedback(samples: FeedbackSamples, rule: TuneSettings) -> dict[str, FeedbackSamples]:
    """train/val/holdout by a hash of each feedback id: stable as feedback grows, never reshuffled."""
    buckets = np.array([int(hashlib.sha256(f"{rule.seed}:{i}".encode()).hexdigest()[:8], 16) / 2**32
                        for i in samples.ids]).reshape(-1)
    holdout = buckets < rule.feedback_holdout_fraction
    val = ~holdout & (buckets < rule.feedback_holdout_fraction + rule.feedback_val_fraction)
    return {"holdout": samples.take(holdout), "val": samples.take(val), "train": samples.take(~holdout & ~val)}


def feedback_repeats(base_rows: int, feedback_rows: int, share: float) -> int:
    """How many times each feedback image is streamed per epoch so feedback is about `share` of training."""
    if not feedback_rows or not 0 < share < 1:
        return 1
    return max(1, int(round(share * base_rows / ((1 - share) * feedback_rows))))


# Decoded validation feedback up to this size is kept in the object store for the whole search (every
# trial and epoch reads it) instead of being decoded again each time; larger feedback streams.
FEEDBACK_CACHE_BYTES = 256 * 2**20


def feedback_dataset(samples: FeedbackSamples, decoder: Decoder):
    """Feedback images as a dataset: decoded once when they fit FEEDBACK_CACHE_BYTES, streamed otherwise."""
    dataset = ingest.image_dataset(samples.rows(), decoder)
    if len(samples) * decoder.size ** 2 * decoder.channels <= FEEDBACK_CACHE_BYTES:
        dataset = dataset.materialize()
    return dataset


def mixed_rows(base: pd.DataFrame, feedback: pd.DataFrame, repeat: int, seed: int) -> pd.DataFrame:
    """The base split's rows (source 0) and each feedback row `repeat` times (source 1), in one seeded
    shuffled order: feedback spread through the epoch. (A union of datasets streamed all feedback first,
    then the base split, and a repeated dataset's blocks made Ray Data's prefetcher fail.)"""
    columns = ["path", "label"] + (["mask"] if "mask" in base else [])
    parts = [base[columns].assign(source=0)]
    parts += [feedback[columns].assign(source=1)] * (repeat if len(feedback) else 0)
    rows = pd.concat(parts, ignore_index=True)
    return rows.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def training_sets(base: PreparedData, parts: dict[str, FeedbackSamples], share: float, seed: int = 0,
                  limit: int | None = None) -> TrainingSets:
    """Base train split plus feedback, mixed by weight: each feedback image is listed `repeat` times in one
    shuffled stream with the base rows; nothing is copied. `limit`: the stream's first rows only (an epoch
    capped at train.max_steps), with feedback in them at its share. Validation is the base val split plus
    the feedback val part."""
    decoder = base.decoder()
    feedback = Decoder(parts["train"].root, decoder.size, decoder.channels, decoder.num_classes)
    val = ingest.split_dataset(base, "val")
    if len(parts["val"]):
        val = val.union(feedback_dataset(parts["val"], feedback))
    if not len(parts["train"]):
        rows = base.meta.counts["train"] if limit is None else min(limit, base.meta.counts["train"])
        return TrainingSets(ingest.split_dataset(base, "train", limit), val, rows)
    repeat = feedback_repeats(base.meta.counts["train"], len(parts["train"]), share)
    rows = mixed_rows(base.rows("train"), parts["train"].rows(), repeat, seed).iloc[:limit]
    train = ingest.mixed_dataset(rows, [decoder.root, feedback.root], decoder.size, decoder.channels,
                                 decoder.num_classes)
    return TrainingSets(train, val, len(rows))


@dataclass
class TrialInputs:
    """What every trial needs, shipped once through the object store."""

    settings: Settings
    sets: TrainingSets
    champion: object      # ImageClassifier to fine-tune from
    fresh: object         # ImageClassifier with fresh weights
    epochs: int
    workers: int
    use_gpu: bool
    job_name: str
    fail_trials: str = ""  # FAIL_TRIALS_ENV of the job's process


def trial_driver(config: dict, inputs: TrialInputs) -> None:
    """One Tune trial: build a TorchTrainer (Ray Train V2 pattern) and run the shared training loop."""
    trial_id = ray.tune.get_context().get_trial_id()  # "<experiment>_<5-digit index>"
    doomed = inputs.fail_trials.replace(" ", "").split(",")
    if "all" in doomed or str(int(trial_id.rsplit("_", 1)[-1])) in doomed:
        raise RuntimeError(f"fault injected by {FAIL_TRIALS_ENV}={inputs.fail_trials!r}: trial {trial_id} crashes")
    hp = TrainConfig(epochs=inputs.epochs, batch_size=int(config["batch_size"]), lr=float(config["lr"]),
                     weight_decay=float(config["weight_decay"]), augment=True, seed=int(config["seed"]))
    model = copy.deepcopy(inputs.champion if config["fine_tune"] else inputs.fresh)
    trial = ray.tune.get_context().get_trial_name()
    trainer = make_trainer(inputs.settings, inputs.sets, model, hp, name=f"{inputs.job_name}-{trial}",
                           num_workers=inputs.workers, use_gpu=inputs.use_gpu, callbacks=[TuneReportCallback()])
    trainer.fit()


@dataclass
class RetrainResult:
    """What a retrain job did and decided."""

    job_name: str
    trigger: str
    trials: list[dict]
    best_config: dict
    challenger_version: str
    gate: GateResult
    promoted: bool
    seconds: float
    feedback: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["gate"] = self.gate.as_dict()
        return out


def error_summary(error: BaseException) -> str:
    """The exception line of a trial's error (Ray's text starts with a long traceback), colours removed."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def run_tune(settings: Settings, base: PreparedData, sets: TrainingSets, champion, job_name: str, plan: Plan
             ) -> tuple[list[dict], dict, object]:
    """Run the Tune search the plan asks for; returns (trial summaries, best config, best model)."""
    rule = settings.tune
    use_gpu = resolve_use_gpu(settings.train.use_gpu)
    inputs = TrialInputs(settings, sets, champion, build_model(settings, base), rule.epochs,
                         rule.workers_per_trial, use_gpu, job_name, os.environ.get(FAIL_TRIALS_ENV, ""))
    # The trial driver only waits on its TorchTrainer, whose workers hold the CPUs/GPUs
    # (Ray refuses an empty request, hence a token share of a CPU).
    trainable = ray.tune.with_resources(ray.tune.with_parameters(trial_driver, inputs=inputs), {"CPU": 0.01})
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=rule.epochs,
                              grace_period=min(rule.grace_epochs, rule.epochs), reduction_factor=2)
    # Seeded, so the same settings draw the same trials. The generator takes the concurrency cap
    # itself: TuneConfig's max_concurrent_trials is ignored beside a search_alg of this type.
    search = BasicVariantGenerator(max_concurrent=rule.max_concurrent_trials, random_state=rule.seed)
    tuner = ray.tune.Tuner(
        trainable,
        param_space=plan.space,
        tune_config=ray.tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=scheduler,
                                        num_samples=plan.trials, search_alg=search),
        run_config=ray.tune.RunConfig(name=job_name, verbose=1,
                                      **storage.ray_storage(settings.ray_storage)),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        trials.append({
            "trial": Path(result.path).name, "config": {k: result.config[k] for k in search_space(rule)},
            "epochs": int(result.metrics.get("training_iteration", 0)) if result.metrics else 0,
            "val_accuracy": float(result.metrics.get("val_accuracy", float("nan"))) if result.metrics else None,
            "error": error_summary(result.error) if result.error else None,
            "history": frame[["training_iteration", "val_accuracy", "train_loss"]].to_dict("records")
            if frame is not None and "val_accuracy" in frame else [],
        })
    best = grid.get_best_result(metric="val_accuracy", mode="max", scope="last")
    if best.metrics is None or "checkpoint_path" not in best.metrics:
        errors = [t["error"] for t in trials if t["error"]]
        raise RuntimeError(f"no trial of {job_name} finished with a checkpoint: {errors[:2]}")
    model = copy.deepcopy(champion)
    # In the run's storage, which on a cluster is shared (the trial may have run on another node).
    where = ray.train.Checkpoint(best.metrics["checkpoint_path"],
                                 storage.ray_storage(settings.ray_storage)["storage_filesystem"])
    with where.as_directory() as directory:
        load_checkpoint(model, Path(directory))
    return trials, {k: best.config[k] for k in search_space(rule)}, model


def log_trials(trials: list[dict]) -> None:
    """One MLflow child run per trial under the active parent run."""
    for trial in trials:
        with mlflow.start_run(run_name=trial["trial"], nested=True):
            mlflow.log_params(trial["config"])
            for row in trial["history"]:
                mlflow.log_metrics({"val_accuracy": row["val_accuracy"], "train_loss": row["train_loss"]},
                                   step=int(row["training_iteration"]))
            mlflow.set_tag("stopped_early", str(trial["epochs"] < max(1, len(trial["history"]))))
            if trial["error"]:
                mlflow.set_tag("error", trial["error"])


def feedback_batches(base: PreparedData, samples: FeedbackSamples, limit: int | None = None):
    """Feedback images decoded at the model's format, batch by batch."""
    decoder = base.decoder()
    return ingest.stream(samples.rows().iloc[:limit],
                         Decoder(samples.root, decoder.size, decoder.channels, decoder.num_classes))


def reference_with_feedback(settings: Settings, base: PreparedData, feedback_val: FeedbackSamples):
    """The challenger's drift reference: feedback val first (the traffic it was retrained for), then
    base val and test (train.pipeline.reference_batches), capped at `monitor.reference_rows` images in all."""
    cap = settings.monitor.reference_rows
    taken = min(len(feedback_val), cap // 2)
    yield from feedback_batches(base, feedback_val, taken)
    yield from reference_batches(settings, base, limit=cap - taken)


def champion_on_feedback(champion, base: PreparedData, parts: dict[str, FeedbackSamples],
                         cap: int = PLAN_ITEMS) -> tuple[np.ndarray, float]:
    """For the search plan (tune/plan.py): whether the champion gets each feedback label it will learn from
    right (training and validation parts, at most `cap` of each; never the gate's holdout), and its accuracy
    on the base validation split (test without one; at most `cap` images)."""
    feedback = [right_answers(champion, feedback_batches(base, parts[k], cap)) for k in ("train", "val")]
    split = "val" if base.meta.counts.get("val") else "test"
    own = right_answers(champion, ingest.batches(base, split, limit=cap))
    return np.concatenate(feedback), float(own.mean()) if len(own) else 1.0


def retrain(settings: Settings, feedback: FeedbackSamples, *, trigger: str, audit: Audit,
            on_promote: Callable[[str], None] | None = None, stage: Stage | None = None) -> RetrainResult:
    """The retrain job: Tune search, register the best as challenger, gate it, promote on a pass.

    stage(challenger, champion, promote): a staged rollout on live traffic between the gate and the promotion
    (tune/canary.py); it calls promote() itself, and returns whether it did. Without it, a pass promotes at once.
    """
    started = time.perf_counter()
    job_name = f"retrain-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    base = prepared_or_new(settings.data, settings.prepared_dir)
    client = registry.configure(settings)
    champion, champion_version = registry.load_registered(settings, registry.CHAMPION)
    parts = split_feedback(feedback, settings.tune)
    counts = {k: len(v) for k, v in parts.items()}
    ingest.limit_buffer(settings.data.stream_buffer_mb)  # before the datasets: each keeps the context it was made in
    # An epoch capped at train.max_steps reads only what the largest batch of the search trains on.
    capped = settings.train.max_steps * max(batch_sizes(settings.tune)) if settings.train.max_steps else None
    sets = training_sets(base, parts, settings.tune.feedback_share, settings.tune.seed, capped)
    plan = plan_search(settings.tune, *champion_on_feedback(champion, base, parts))
    audit(Event.RETRAIN_STARTED, {"job": job_name, "trigger": trigger, "champion": champion_version,
                                  "feedback": counts, "search": plan.as_dict()})
    log(f"{job_name}: trigger={trigger}, champion v{champion_version}, feedback {counts}, "
        f"{plan.trials} trials x up to {settings.tune.epochs} epochs (ASHA); {plan.reason}")

    with mlflow.start_run(run_name=job_name) as parent:
        mlflow.set_tags({"kind": "retrain", "trigger": trigger, "champion_version": champion_version,
                         "search_plan": plan.reason[:500]})
        mlflow.log_params({"feedback_" + k: v for k, v in counts.items()})
        mlflow.log_params({f"tune.{k}": v for k, v in asdict(settings.tune).items()})
        try:
            trials, best_config, model = run_tune(settings, base, sets, champion, job_name, plan)
        finally:  # the best model is loaded (or the search failed): trial checkpoints are not needed again
            prune_results(settings, job_name)
        log_trials(trials)
        audit(Event.TRIALS_FINISHED, {"job": job_name, "trials": len(trials), "best": best_config,
                                  "val_accuracy": [t["val_accuracy"] for t in trials],
                                  "failed": sum(1 for t in trials if t["error"])})
        reference = finalize(model, reference_with_feedback(settings, base, parts["val"]))
        registered = registry.log_and_register(settings, model, reference, {
            "data_version": base.meta.version, "trigger": trigger, "job": job_name,
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "arch": model.arch,
            "classes": json.dumps(model.classes), "feedback_items": str(len(feedback)),
        }, alias=registry.CHALLENGER)
        gate_set = GateSet(lambda: ingest.batches(base, "test"), lambda: feedback_batches(base, parts["holdout"]),
                           len(parts["holdout"]))
        result = run_gate(champion, champion_version, model, registered.version, gate_set, settings.gate)
        mlflow.log_metrics(result.metrics())
        mlflow.set_tags({"gate_passed": str(result.passed), "gate_outcome": result.outcome,
                         "gate_reason": result.reason, "challenger_version": registered.version})
        client.set_model_version_tag(settings.registry.model_name, registered.version, "test_accuracy",
                                     f"{result.challenger_test:.4f}")
        audit(Event.GATE_DECISION, result.as_dict())
        log(f"gate: {result.outcome.upper().replace('_', ' ')} - {result.reason}")

        def promote() -> None:
            registry.promote(settings, registered.version)
            audit(Event.PROMOTED, {"version": registered.version, "previous": champion_version,
                                   "run": parent.info.run_id})
            if on_promote is not None:
                on_promote(registered.version)

        promoted = result.passed
        if result.passed and stage is not None:
            promoted = stage(registered.version, champion_version, promote)
            mlflow.set_tag("rollout", "promoted" if promoted else "rolled_back")
        elif result.passed:
            promote()
        if not promoted:  # kept as a run (metrics, gate tags); its model files would only take space
            registry.discard(settings, registered.version)
            retention.count_pruned(retention.CHALLENGER_MODELS, 1)
            mlflow.set_tag("challenger_discarded", "true")
    seconds = time.perf_counter() - started
    audit(Event.RETRAIN_FINISHED, {"job": job_name, "promoted": promoted, "seconds": round(seconds, 1)})
    return RetrainResult(job_name, trigger, trials, best_config, registered.version, result, promoted,
                         seconds, counts)
