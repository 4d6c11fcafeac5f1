"""Training with Ray Train (V2): DDP workers, AMP on GPU, a checkpoint reported every epoch."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cluster.settings import Settings
from train.data import PreparedData
from train.model import ImageClassifier
from train.transforms import to_tensor


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


def build_model(settings: Settings, data: PreparedData) -> ImageClassifier:
    """A fresh classifier shaped for the prepared data, normalised with its training pixels."""
    meta = data.meta
    # Seeded initial weights, without touching the caller's global RNG: the same settings and
    # data give the same starting point on every run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        model = ImageClassifier(settings.model.arch, meta.classes, meta.channels, meta.image_size,
                                settings.model.drift_dims)
    x_train, _ = data.split("train")
    pixels = x_train.reshape(-1, meta.channels).astype(np.float32) / 255.0
    model.set_normalisation(torch.from_numpy(pixels.mean(0)), torch.from_numpy(pixels.std(0)))
    return model


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


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker: DDP training, one report (+ checkpoint) per epoch."""
    loop_started = time.perf_counter()
    hp = TrainConfig(**config["hp"])
    torch.manual_seed(hp.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    arrays = ray.get(config["data"])
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"

    model: ImageClassifier = config["model"]
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

    x_train = to_tensor(arrays["x_train"])
    y_train = torch.from_numpy(arrays["y_train"])
    x_val = to_tensor(arrays["x_val"]).to(device)
    y_val = torch.from_numpy(arrays["y_val"]).to(device)
    dataset = TensorDataset(x_train, y_train)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed)
    per_worker_batch = max(1, hp.batch_size // world)
    loader = DataLoader(dataset, batch_size=per_worker_batch, sampler=sampler, drop_last=len(dataset) > hp.batch_size)

    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=hp.lr, epochs=hp.epochs, steps_per_epoch=max(1, len(loader)))
    if checkpoint:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    max_shift = max(1, arrays["x_train"].shape[1] // 14)

    for epoch in range(start_epoch, hp.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(hp.seed, rank, epoch))
        model.train()
        total_loss, seen = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if hp.augment:
                xb = random_shift(xb, max_shift)
            if use_amp:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss) * len(yb)
            seen += len(yb)
        elapsed = time.perf_counter() - started

        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = torch.cat([model(x_val[i:i + 512]) for i in range(0, len(x_val), 512)]).float()
        metrics = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(1, seen),
            "val_loss": float(torch.nn.functional.cross_entropy(logits, y_val)) if len(y_val) else 0.0,
            "val_accuracy": float((logits.argmax(1) == y_val).float().mean()) if len(y_val) else 0.0,
            "images_per_s": seen * world / max(elapsed, 1e-9),
            "epoch_seconds": elapsed,
            "wall_seconds": time.perf_counter() - loop_started,
        }
        history.append(metrics)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{hp.epochs} loss {metrics['train_loss']:.4f} "
                  f"val_acc {metrics['val_accuracy']:.4f} {metrics['images_per_s']:.0f} img/s", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            ckpt = None
            if rank == 0:
                bare = model.module if hasattr(model, "module") else model
                torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch},
                           Path(directory) / "state.pt")
                (Path(directory) / "history.json").write_text(json.dumps(history))
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=ckpt)


@dataclass
class TrainOutcome:
    """A trained model and how training went."""

    model: ImageClassifier
    history: list[dict]
    seconds: float
    num_workers: int
    use_gpu: bool


def resolve_use_gpu(setting: str) -> bool:
    """`auto` means: use GPUs when the connected cluster has any."""
    value = str(setting).strip().lower()
    if value == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return value in {"1", "true", "yes", "on"}


TRAIN_KEYS = ("x_train", "y_train", "x_val", "y_val")


def make_trainer(settings: Settings, data_ref: ray.ObjectRef, model: ImageClassifier, hp: TrainConfig, *,
                 name: str, num_workers: int, use_gpu: bool, callbacks: list | None = None
                 ) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer running train_loop_per_worker over arrays already in the object store."""
    storage = settings.ray_storage
    storage.mkdir(parents=True, exist_ok=True)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"hp": asdict(hp), "data": data_ref, "model": model},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=2),
            # Our own per-epoch line is the progress; Ray's per-report INFO lines are noise.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks or [],
        ),
    )


def load_checkpoint(model: ImageClassifier, directory: Path) -> list[dict]:
    """Load a reported checkpoint's weights into model; returns the epoch history."""
    state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    return json.loads((Path(directory) / "history.json").read_text())


def fit(settings: Settings, data: PreparedData, hp: TrainConfig, *, name: str,
        initial: ImageClassifier | None = None, num_workers: int | None = None) -> TrainOutcome:
    """Train on the prepared data with a Ray Train TorchTrainer; Ray must already be connected."""
    model = initial if initial is not None else build_model(settings, data)
    workers = num_workers or settings.train.num_workers
    use_gpu = resolve_use_gpu(settings.train.use_gpu)
    data_ref = ray.put({k: data.arrays[k] for k in TRAIN_KEYS})
    trainer = make_trainer(settings, data_ref, model, hp, name=name, num_workers=workers, use_gpu=use_gpu)
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        history = load_checkpoint(model, Path(directory))
    return TrainOutcome(model, history, seconds, workers, use_gpu)


def save_model(model: ImageClassifier, directory: Path) -> None:
    """Weights + constructor arguments, loadable without pickled code (weights_only)."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"arch": model.arch, "classes": model.classes, "channels": model.channels,
            "image_size": model.image_size, "drift_dims": int(model.drift_axes.shape[1])}
    (directory / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    torch.save(model.state_dict(), directory / "weights.pt")


def load_model(directory: Path) -> ImageClassifier:
    """Read a model written by save_model()."""
    spec_path = directory / "model.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{directory}: no trained model here (run `rayloop train` first)")
    spec = json.loads(spec_path.read_text())
    model = ImageClassifier(**spec)
    model.load_state_dict(torch.load(directory / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval()


def set_threads() -> None:
    """Let the driver's own inference use the cores Ray was given (OMP_NUM_THREADS may say 1)."""
    torch.set_num_threads(max(1, int(os.environ.get("RAYLOOP_TORCH_THREADS", os.cpu_count() or 1))))
