"""How a training run is spread: Ray Train workers or local mode, GPUs or not.

Decided from the settings and the connected cluster, without torch: a fresh `rayloop train` decides
whether it needs workers before its Ray starts (train/launch.py).
"""

from __future__ import annotations

import ray

from cluster.settings import Settings


def resolve_use_gpu(setting: str, available: bool | None = None) -> bool:
    """`auto` means: use GPUs when the connected cluster has any (or when `available` says so, for a
    decision taken before Ray runs)."""
    value = str(setting).strip().lower()
    if value == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0 if available is None else available
    return value in {"1", "true", "yes", "on"}


def auto_or_count(setting: str | int, name: str, expected: str) -> int | None:
    """None for `auto`, else the setting as a whole number >= 0; anything else is refused by name."""
    value = str(setting).strip().lower()
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{name}={setting!r}: expected auto, {expected}")
    return count


def resolve_workers(setting: str | int, use_gpu: bool) -> int:
    """Ray Train workers for `train.num_workers`: a count, 0 for Ray Train's local mode, or `auto`.

    Local mode (`ScalingConfig(num_workers=0)`) runs the same loop in the calling process, reading the
    same Ray Data datasets: no controller and no worker process to start, each of which imports torch and
    Ray Train (7 s of CPU apiece here). `auto` picks it on one node without GPUs, where a worker process
    adds start-up and nothing else; with GPUs, one worker per GPU; on several nodes, one per node with CPUs.
    """
    count = auto_or_count(setting, "train.num_workers", "0 (local mode) or a worker count")
    if count is not None:
        return count
    if use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    return 0 if len(nodes) <= 1 else len(nodes)


def needs_workers(settings: Settings, cuda_available: bool) -> bool:
    """Whether this run will start Ray Train workers, decided before Ray runs (a Ray started for a
    local-mode run needs no dashboard, whose State API only Ray Train's controller polls).
    `cuda_available`: torch.cuda.is_available() in the process that will start Ray."""
    if str(settings.train.num_workers).strip().lower() == "auto":  # workers exactly when GPUs are used
        return resolve_use_gpu(settings.train.use_gpu, available=cuda_available)
    return resolve_workers(settings.train.num_workers, use_gpu=False) > 0
