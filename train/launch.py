"""`rayloop train` in a fresh process: Ray starts while the training pipeline loads.

`ray.init` wants the main thread and mostly waits on the processes it starts (4-5 s here). Loading the
pipeline (Ray Train, Ray Data, MLflow and the torch modules an optimizer pulls in: ~4 s of CPU) and
setting up MLflow's store fill that wait from a second thread. torch itself is imported first, here:
whether the run needs Ray Train workers, and so Ray's dashboard, depends on whether CUDA is there.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import torch

from cluster.ray_cluster import connect
from cluster.settings import Settings
from train.scaling import needs_workers


def load_pipeline(settings: Settings, register: bool) -> ModuleType:
    """The pipeline module, the optimizer's lazy imports and (when registering) MLflow's store, ready."""
    pipeline = importlib.import_module("train.pipeline")
    importlib.import_module("torch._dynamo")  # torch.optim's first optimizer imports it: 1.4 s
    if register:
        from train import registry

        registry.configure_ahead(settings)
    return pipeline


def train(settings: Settings, *, register: bool = True) -> dict:
    """run_train, with Ray started in this thread while the pipeline loads in another."""
    with ThreadPoolExecutor(1, thread_name_prefix="pipeline-load") as pool:
        loading = pool.submit(load_pipeline, settings, register)
        where = connect(settings, dashboard=needs_workers(settings, torch.cuda.is_available()))
        pipeline = loading.result()
    return pipeline.run_train(settings, register=register, connected=where)
