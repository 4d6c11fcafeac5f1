"""Training with Ray Train (V2): DDP workers, AMP on GPU, a checkpoint reported every epoch."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from cluster import storage
from cluster.settings import Settings
from store import retention
from train import ingest
from train.data import PreparedData
from train.factory import Model, describe, rebuild
from train.model import parameter_groups
from train.scaling import resolve_use_gpu, resolve_workers
from train.steps import accumulate_gradients, budget_bytes, eval_batch_size, micro_batches
from train.tasks import Task, task_named, task_of

NORMALISATION_SAMPLE = 2000  # training images the pixel mean/std are measured on
SHUFFLE_ROWS = 2000          # each worker's local shuffle buffer: all the per-epoch mixing (manifest order is fixed)


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (a Tune trial overrides some of them)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: bool
    seed: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainConfig":
        t = settings.train
        return cls(t.epochs, t.batch_size, t.lr, t.weight_decay, t.augment, t.seed)


def build_model(settings: Settings, data: PreparedData) -> Model:
    """A fresh model for the data's task, shaped for the prepared data, normalised with its training pixels."""
    meta = data.meta
    # Seeded initial weights, without touching the caller's global RNG: the same settings and
    # data give the same starting point on every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        model = task_named(meta.task).new_model(settings.model.arch, meta.classes, meta.channels,
                                                meta.image_size, settings.model.drift_dims)
    if settings.model.weights:
        # also sets the weights' normalisation
        described = task_of(model).fill_pretrained(model, settings.model.weights)
        print(f"[rayloop] {model.arch}: {described}", flush=True)
    else:
        mean, std = pixel_statistics(ingest.batches(data, "train", limit=NORMALISATION_SAMPLE), meta.channels)
        model.set_normalisation(mean, std)
    return model


def pixel_statistics(batches, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] of streamed uint8 batches (sums, not a copy of the pixels)."""
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for batch in batches:
        pixels = batch["image"].reshape(-1, channels).astype(np.float64) / 255.0
        total += pixels.sum(0)
        squares += (pixels ** 2).sum(0)
        count += len(pixels)
    if count == 0:
        raise ValueError("no training images to measure the pixel statistics on")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero padding): cheap, label-preserving."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,))
    dy = torch.randint(0, 2 * max_shift + 1, (n,))
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)
    index = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed for one worker's epoch: augmentation and dropout differ across ranks and epochs, and a run
    resumed from a checkpoint replays the same random draws as one that never stopped."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 NxHxWxC (already on the device) -> float NxCxHxW in [0, 1]: pixels travel as uint8."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def evaluate_shard(model: torch.nn.Module, shard, batch_size: int, device: torch.device, use_amp: bool,
                   task: Task) -> tuple[float, float]:
    """(loss, score) over every worker's share of the validation set, summed across workers; the score is
    the task's (accuracy, or mean foreground IoU per image)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, score sum, count
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        for batch in shard.iter_torch_batches(batch_size=batch_size, dtypes=task.dtypes, device=device):
            logits = model(to_model_input(batch["image"])).float()
            sums += task.sums(logits, batch[task.target])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    loss, correct, count = sums.tolist()
    return (loss / count, correct / count) if count else (0.0, 0.0)


@contextlib.contextmanager
def checkpoint_directory(local_root: str | None, epoch: int):
    """Where an epoch's checkpoint is written before ray.train.report.

    With workers, Ray Train copies the reported directory to run storage, so a temporary one will do.
    In local mode (no workers) the reported checkpoint is the directory itself: it must outlive the report;
    the previous epoch's is removed once the new one is complete (num_to_keep=1).
    """
    if not local_root:
        with tempfile.TemporaryDirectory() as directory:
            yield directory
        return
    root = Path(local_root)
    directory = root / f"checkpoint_{epoch:04d}"
    directory.mkdir(parents=True, exist_ok=True)
    yield str(directory)
    for old in root.glob("checkpoint_*"):
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: DDP training on its streamed shard, one report (+ checkpoint) per epoch."""
    loop_started = time.perf_counter()
    hp = TrainConfig(**config["hp"])
    torch.set_num_threads(config["threads"])
    torch.manual_seed(hp.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"

    model: Model = config["model"]
    task = task_of(model)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resumed after a worker failure: continue where the last report left off
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            start_epoch = state["epoch"] + 1
            history = json.loads((Path(directory) / "history.json").read_text())
    if use_amp:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker_batch = max(1, hp.batch_size // world)
    rows = config["train_rows"] // world
    drop_last = rows > per_worker_batch
    steps_per_epoch = max(1, rows // per_worker_batch if drop_last else -(-rows // per_worker_batch))
    if config["max_steps"]:
        steps_per_epoch = min(steps_per_epoch, config["max_steps"])
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=use_amp)
    micro = micro_batches(model.module if hasattr(model, "module") else model, per_worker_batch, device,
                          config["step_memory_mb"], autocast, rank)

    optimizer = torch.optim.AdamW(parameter_groups(model, hp.lr, config["backbone_lr_scale"]),
                                  lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], epochs=hp.epochs,
        steps_per_epoch=steps_per_epoch)
    if checkpoint:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    max_shift = max(1, config["image_size"] // 14)

    for epoch in range(start_epoch, hp.epochs):
        started = time.perf_counter()
        torch.manual_seed(epoch_seed(hp.seed, rank, epoch))
        model.train()
        total_loss, seen, steps = 0.0, 0, 0
        batches = train_shard.iter_torch_batches(
            batch_size=per_worker_batch, dtypes=task.dtypes, device=device, drop_last=drop_last,
            local_shuffle_buffer_size=SHUFFLE_ROWS, local_shuffle_seed=epoch_seed(hp.seed, rank, epoch) % 2**31,
            prefetch_batches=2, pin_memory=device.type == "cuda")
        for batch in batches:
            if config["max_steps"] and steps >= config["max_steps"]:
                break  # every worker stops at the same count: DDP's collectives stay matched
            xb, yb = to_model_input(batch["image"]), batch[task.target]
            if hp.augment:
                xb, yb = task.augment(xb, yb, lambda x: random_shift(x, max_shift))
            if use_amp:
                xb = xb.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, task.loss, xb, yb, micro, autocast)
            optimizer.step()
            if steps < steps_per_epoch:  # a shard a few rows longer than counted must not overrun the schedule
                scheduler.step()
            steps += 1
            total_loss += loss * len(yb)
            seen += len(yb)
        elapsed = time.perf_counter() - started
        val_loss, val_accuracy = evaluate_shard(model, val_shard, eval_batch_size(config["image_size"],
                                                                                 task.eval_batch), device,
                                                use_amp, task)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            f"val_{task.score_metric}": val_accuracy,
            "train_images": seen * world,
            "images_per_s": seen * world / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
            "wall_seconds": time.perf_counter() - loop_started,
        }
        history.append(metrics)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{hp.epochs} loss {metrics['train_loss']:.4f} "
                  f"val_acc {metrics['val_accuracy']:.4f} {metrics['images_per_s']:.0f} img/s", flush=True)
        with checkpoint_directory(config.get("local_checkpoints"), epoch) as directory:
            ckpt = None
            if rank == 0:
                bare = model.module if hasattr(model, "module") else model
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch},
                           Path(directory) / "state.pt")
                (Path(directory) / "history.json").write_text(json.dumps(history))
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=ckpt)
        target = config["target_val_accuracy"]
        if target and val_accuracy >= target and epoch + 1 < hp.epochs:  # the same figure on every worker
            if rank == 0:
                print(f"[train] validation accuracy {val_accuracy:.4f} reached train.target_val_accuracy "
                      f"{target}: stopping after epoch {epoch + 1} of {hp.epochs}", flush=True)
            break


@dataclass
class TrainOutcome:
    """A trained model and how training went."""

    model: Model
    history: list[dict]
    seconds: float
    num_workers: int
    use_gpu: bool


@dataclass
class TrainingSets:
    """What a run trains and validates on: Ray Data datasets, streamed to the workers."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    train_rows: int  # manifest rows behind `train` (sets the learning-rate schedule's length)

    @classmethod
    def of(cls, data: PreparedData, train_limit: int | None = None) -> "TrainingSets":
        """The prepared splits; `train_limit` rows of the training split when each epoch stops short of it."""
        rows = data.meta.counts["train"] if train_limit is None else min(train_limit, data.meta.counts["train"])
        return cls(ingest.split_dataset(data, "train", train_limit), ingest.split_dataset(data, "val"), rows)


def worker_threads(num_workers: int, use_gpu: bool) -> int:
    """Torch threads per worker: the cluster's CPUs shared by the workers (Ray would give each one)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return 1 if use_gpu else max(1, cpus // max(1, num_workers))


def local_results(settings: Settings, name: str) -> Path:
    """Local mode's per-epoch checkpoints: this process's own scratch, under the node-local data dir."""
    return settings.data_dir / "ray_results" / name / "local"


def prune_results(settings: Settings, name: str) -> None:
    """Delete a finished run's Ray results (its folder, and its trials' `<name>-<trial>` folders, checkpoints
    included): the winner lives in MLflow."""
    shutil.rmtree(local_results(settings, name).parent, ignore_errors=True)
    try:
        retention.count_pruned(retention.RUN_RESULTS, storage.delete_below(settings.ray_storage, name))
    except OSError as exc:  # housekeeping never fails a run; the next prune or an operator can finish it
        print(f"[train] could not delete the Ray results of {name}: {exc}", flush=True)


def make_trainer(settings: Settings, sets: TrainingSets, model: Model, hp: TrainConfig, *,
                 name: str, num_workers: int, use_gpu: bool, callbacks: list | None = None
                 ) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer running train_loop_per_worker over the streamed training sets."""
    target = settings.train.target_val_accuracy
    if not 0 <= target <= 1:
        raise ValueError(f"train.target_val_accuracy={target}: expected 0 (off) or an accuracy in (0, 1]")
    budget_bytes(settings.train.step_memory_mb, torch.device("cpu"))  # a bad value fails here, not in a worker
    config = {"hp": asdict(hp), "model": model, "train_rows": sets.train_rows, "image_size": model.image_size,
              "target_val_accuracy": target, "step_memory_mb": settings.train.step_memory_mb,
              "threads": worker_threads(num_workers, use_gpu), "max_steps": settings.train.max_steps,
              "backbone_lr_scale": settings.model.backbone_lr_scale if settings.model.weights else 1.0,
              "local_checkpoints": str(local_results(settings, name)) if num_workers == 0 else None}
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        datasets={"train": sets.train, "val": sets.val},
        dataset_config=ray.train.DataConfig(execution_options=ingest.limit_buffer(settings.data.stream_buffer_mb)),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, **storage.ray_storage(settings.ray_storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=2),
            # Our own per-epoch line is the progress; Ray's per-report INFO lines are noise.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
    )


def load_checkpoint(model: Model, directory: Path) -> list[dict]:
    """Load a reported checkpoint's weights into model; returns the epoch history."""
    state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    return json.loads((Path(directory) / "history.json").read_text())


def fit(settings: Settings, data: PreparedData, hp: TrainConfig, *, name: str,
        initial: Model | None = None, num_workers: int | None = None, use_gpu: bool | None = None
        ) -> TrainOutcome:
    """Train on the prepared data with a Ray Train TorchTrainer; Ray must already be connected. Workers and
    GPU use come from the settings unless the caller resolved them already."""
    model = initial if initial is not None else build_model(settings, data)
    use_gpu = resolve_use_gpu(settings.train.use_gpu) if use_gpu is None else use_gpu
    workers = resolve_workers(settings.train.num_workers, use_gpu) if num_workers is None else num_workers
    ingest.limit_buffer(settings.data.stream_buffer_mb)  # before the datasets: each keeps the context it was made in
    # An epoch capped at train.max_steps reads only the rows it trains on: Ray Data decodes ahead as far as
    # its buffer allows, and a 30-step run on a 40k-photo folder spent most of its CPU decoding images no
    # step would use, on the cores the training needed (bench/RESULTS.md, ingest).
    capped = settings.train.max_steps * hp.batch_size if settings.train.max_steps else None
    trainer = make_trainer(settings, TrainingSets.of(data, capped), model, hp, name=name, num_workers=workers,
                           use_gpu=use_gpu)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        history = load_checkpoint(model, Path(directory))
    prune_results(settings, name)  # the model goes to MLflow next; its checkpoints are not needed again
    return TrainOutcome(model, history, seconds, workers, use_gpu)


def save_model(model: Model, directory: Path) -> None:
    """Weights + constructor arguments, loadable without pickled code (weights_only)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.json").write_text(json.dumps(describe(model), indent=2) + "\n")
    torch.save(model.state_dict(), directory / "weights.pt")


def load_model(directory: Path) -> Model:
    """Read a model written by save_model()."""
    spec_path = directory / "model.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{directory}: no trained model here (run `rayloop train` first)")
    spec = json.loads(spec_path.read_text())
    model = rebuild(spec)
    model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()


def set_threads() -> None:
    """Let the driver's own inference use the cores Ray was given (OMP_NUM_THREADS may say 1)."""
    torch.set_num_threads(max(1, int(os.environ.get("RAYLOOP_TORCH_THREADS", os.cpu_count() or 1))))
