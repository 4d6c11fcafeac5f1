"""The training pipeline stages: prepare -> train (Ray Train + MLflow registry) -> evaluate."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import mlflow
import numpy as np
import pandas as pd
import torch

from cluster.ray_cluster import connect
from cluster.settings import Settings, as_dict
from train import ingest, registry
from train.data import PreparedData, prepare, prepared_or_new
from train.evaluate import Evaluation
from train.factory import Model
from train.features import CORRECT_COLUMN, feature_rows, feature_table, image_confidence
from train.scaling import needs_workers, resolve_use_gpu, resolve_workers
from train.seg_evaluate import MaskEvaluation
from train.tasks import task_of
from train.train import (
    TrainConfig,
    fit,
    load_model,
    save_model,
    set_threads,
)
from train.transforms import to_tensor


def log(message: str) -> None:
    """Progress line on stdout."""
    print(f"[rayloop] {message}", flush=True)


def run_prepare(settings: Settings) -> PreparedData:
    """Load and split the configured dataset into <data_dir>/prepared."""
    data = prepare(settings.data, settings.prepared_dir)
    meta = data.meta
    log(f"prepared {meta.source}: {len(meta.classes)} classes, {meta.image_size}px x{meta.channels}, "
        f"split {meta.counts}, version {meta.version}")
    return data


def reference_batches(settings: Settings, data: PreparedData, limit: int | None = None) -> Iterable[dict]:
    """The drift reference's images: validation, then test, capped at `monitor.reference_rows` (or `limit`).

    Images the weights never learned from, as live traffic is: the model is more confident on its own
    training images, which would make clean traffic look shifted. Both splits, because the drift thresholds
    are calibrated from the reference (monitoring/calibration.py) and need at least two windows of it; the
    reference uses no label, so the gate's test split stays as clean as before. Train only if neither exists.
    """
    cap = settings.monitor.reference_rows if limit is None else limit
    held_out = [split for split in ("val", "test") if data.meta.counts.get(split)] or ["train"]
    for split in held_out:
        taken = min(cap, data.meta.counts.get(split, 0))
        if taken > 0:
            yield from ingest.batches(data, split, limit=taken)
        cap -= taken


def evaluate(model: Model, batches: Iterable[dict]) -> Evaluation | MaskEvaluation:
    """The task's evaluation of a model on streamed batches (`.accuracy`: accuracy, or mean foreground IoU)."""
    return task_of(model).evaluate(model, batches)


@torch.no_grad()
def finalize(model: Model, batches: Iterable[dict]) -> pd.DataFrame:
    """Fit the drift axes on the reference images' embeddings; return their drift feature table.

    One streamed pass: per image only its embedding and a few numbers are kept, never its pixels (nor a
    segmentation model's per-pixel probabilities), and the caller caps how many images come
    (`monitor.reference_rows`).
    """
    model.eval()
    task = task_of(model)
    outputs, correct = [], []
    for batch in batches:
        if len(batch["label"]):
            x = to_tensor(batch["image"])
            out = model.infer(x)
            probabilities = out.pop("probabilities")
            out["confidence"], out["predicted"] = image_confidence(probabilities)
            outputs.append({**out, "raw": model.embed(x)})
            truth = torch.as_tensor(np.asarray(batch[task.target], dtype=np.int64))
            correct.append(task.score(probabilities.cpu(), truth).numpy())
    if not outputs:
        raise ValueError("no images to build the drift reference from")
    raw = torch.cat([o["raw"] for o in outputs]).float()
    model.fit_drift_axes(raw)
    rows = []
    for out in outputs:
        out["embedding"] = (out.pop("raw").float() - model.drift_center) @ model.drift_axes
        rows.extend(feature_rows(out, model.classes))
    table = feature_table(rows, model.drift_axes.shape[1])
    # Whether the model got each reference image right (segmentation: its foreground IoU): the monitor's
    # accuracy estimate before labels (monitoring/estimate.py) is fitted on it. No drift test reads this column.
    table[CORRECT_COLUMN] = np.concatenate(correct).astype(np.float64)
    return table


def run_train(settings: Settings, *, register: bool = True, run_name: str | None = None,
              connected: str | None = None, mlflow_ready: Future | None = None) -> dict:
    """Train on the prepared split with Ray Train, evaluate on test, log + register in MLflow.

    `connected`: where the caller already connected Ray (train/launch.py, while this module imports);
    `mlflow_ready`: the caller's MLflow set-up, still running. Without it, MLflow's store (its tables, on a
    first run) is set up on a thread here while Ray starts and the model trains: only the registration at
    the end needs it.
    """
    set_threads()
    started = time.perf_counter()
    if register and mlflow_ready is None:
        mlflow_setup = ThreadPoolExecutor(1, thread_name_prefix="mlflow-setup")
        mlflow_ready = mlflow_setup.submit(registry.configure_ahead, settings)
        mlflow_setup.shutdown(wait=False)
    data = prepared_or_new(settings.data, settings.prepared_dir)
    meta = data.meta
    log(f"dataset {meta.source}: {len(meta.classes)} classes {meta.classes[:10]}"
        f"{'...' if len(meta.classes) > 10 else ''}, split {meta.counts}, version {meta.version}")
    where = connected or connect(settings, dashboard=needs_workers(settings, torch.cuda.is_available()))
    use_gpu = resolve_use_gpu(settings.train.use_gpu)
    workers = resolve_workers(settings.train.num_workers, use_gpu)
    on = f"on {workers} Ray Train worker{'s' * (workers > 1)}" if workers else "in this process (Ray Train local mode)"
    log(f"ray: {where}; training {settings.train.epochs} epochs {on}")
    hp = TrainConfig.from_settings(settings)
    name = run_name or f"train-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    outcome = fit(settings, data, hp, name=name, num_workers=workers, use_gpu=use_gpu)
    model = outcome.model
    reference = finalize(model, reference_batches(settings, data))
    evaluation = evaluate(model, ingest.batches(data, "test"))
    log(f"trained {model.arch} in {outcome.seconds:.1f}s; test {meta.kind.score_name} {evaluation.accuracy:.4f} "
        f"on {evaluation.count} images")
    save_model(model, settings.model_dir)

    summary = {"task": meta.task, "test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss,
               "arch": model.arch, "classes": model.classes, "data_version": meta.version,
               "train_seconds": outcome.seconds, "num_workers": outcome.num_workers, "use_gpu": outcome.use_gpu}
    if not register:
        return summary
    if mlflow_ready is not None:
        mlflow_ready.result()
    params = {**{f"train.{k}": v for k, v in asdict(hp).items()},
              "data.task": meta.task, "model.arch": model.arch, "model.weights": settings.model.weights or "none",
              "data.source": meta.source, "data.version": meta.version,
              "data.image_size": meta.image_size, "data.channels": meta.channels,
              "data.classes": ",".join(meta.classes), "num_workers": outcome.num_workers,
              "use_gpu": outcome.use_gpu, "settings": json.dumps(as_dict(settings), default=str)}
    with mlflow.start_run(run_name=name):
        registry.log_training(outcome.history, params, evaluation,
                              {"train_seconds": outcome.seconds, "total_seconds": time.perf_counter() - started})
        for artifact in ("manifest.csv", "meta.json"):  # exactly which files, labels and splits this model saw
            mlflow.log_artifact(str(settings.prepared_dir / artifact), artifact_path="data")
        trained_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        registered = registry.log_and_register(settings, model, reference, {
            "test_accuracy": f"{evaluation.accuracy:.4f}", "data_version": meta.version,
            "trained_at": trained_at, "arch": model.arch, "classes": json.dumps(model.classes), "task": meta.task,
        })
    log(f"registered {registered.name} version {registered.version}"
        f"{' as champion' if registered.is_champion else ' (champion unchanged)'}")
    summary.update({"model_name": registered.name, "model_version": registered.version,
                    "run_id": registered.run_id, "champion": registered.is_champion})
    return summary


def run_evaluate(settings: Settings, metrics_path: Path, plot_path: Path) -> dict:
    """Score the last trained model on the test split: DVC metrics and a confusion plot table."""
    set_threads()
    data = prepared_or_new(settings.data, settings.prepared_dir)
    model = load_model(settings.model_dir)
    if model.classes != data.meta.classes:
        raise ValueError("the trained model's classes differ from the prepared data's: re-run training")
    evaluation = evaluate(model, ingest.batches(data, "test"))
    metrics = {"test_accuracy": round(evaluation.accuracy, 4), "test_loss": round(evaluation.loss, 4),
               "test_count": evaluation.count, "data_version": data.meta.version}
    more, pairs = evaluation.report(model.classes)
    metrics.update(more)
    registry.write_json(metrics_path, metrics)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["actual,predicted"] + [f"{actual},{predicted}" for actual, predicted in pairs]
    plot_path.write_text("\n".join(lines) + "\n")
    log(f"test {data.meta.kind.score_name} {evaluation.accuracy:.4f} on {evaluation.count} images -> {metrics_path}")
    return metrics
