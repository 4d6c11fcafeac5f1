"""`rayloop train` in a fresh process: Ray starts first, while torch and the pipeline load beside it.

`ray.init` wants the main thread and mostly waits on the processes it starts (4-5 s here), which use the
other core. Importing torch (2.4 s), the pipeline (Ray Train, Ray Data, MLflow) and the optimizer's lazy
`torch._dynamo` import, and setting up MLflow's store, fill that wait from a second thread. Whether the
run needs Ray Train workers, and so Ray's dashboard, depends on whether CUDA is there: a machine without a
GPU device node has none, which is known without importing torch.
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

from cluster.ray_cluster import connect
from cluster.settings import Settings
from train.scaling import needs_workers

# Device nodes without which torch.cuda.is_available() is False: NVIDIA, ROCm (CUDA's API in torch), WSL.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def cuda_possible() -> bool:
    """False when no GPU device node exists, so CUDA cannot be there; else ask torch (importing it)."""
    if not any(os.path.exists(node) for node in GPU_DEVICE_NODES):
        return False
    import torch

    return torch.cuda.is_available()


def load_pipeline() -> ModuleType:
    return importlib.import_module("train.pipeline")


def import_optimizer_internals() -> None:
    """torch.optim's first optimizer step imports torch._dynamo: 1.4-1.8 s of one core. Imported here
    while the data is prepared and Ray Data starts in other processes; a step that comes first waits
    for this import to finish (Python's import lock), and no longer."""
    importlib.import_module("torch._dynamo")


def set_up_mlflow(settings: Settings) -> None:
    from train import registry

    registry.configure_ahead(settings)


def warm_ray_data() -> None:
    """Start the two actors Ray Data makes on a driver's first dataset (its stats, its autoscaling
    coordinator): each is a process importing Ray Data, ~1.5 s of CPU that the first epoch paid on the
    cores it trains on. Both are named and detached, and Ray Data gets them by name (`get_if_exists`), so
    starting them early changes nothing else. Private functions of Ray Data: when they move, the first
    epoch pays again, nothing breaks.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def train(settings: Settings, *, register: bool = True) -> dict:
    """run_train, with Ray started in this thread while torch and the pipeline load in another.

    MLflow's store (2-3 s of one core on a first run: its tables) is set up on that thread next, while
    the data is prepared and the model trains: only the registration at the end waits for it.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="pipeline-load")
    loading = pool.submit(load_pipeline)
    pool.submit(import_optimizer_internals)
    mlflow_ready = pool.submit(set_up_mlflow, settings) if register else None
    pool.shutdown(wait=False)
    where = connect(settings, dashboard=needs_workers(settings, cuda_possible()))
    pipeline = loading.result()
    warm_ray_data()  # after the pipeline's imports: importing Ray Data on two threads at once could deadlock
    return pipeline.run_train(settings, register=register, connected=where, mlflow_ready=mlflow_ready)
