"""What every router works with: the model backend, the store, the settings, metrics, the API-key check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from cluster.settings import Settings
from serve.metrics import HttpMetrics
from store import Store
from train.tasks import Task, task_named


class Backend(Protocol):
    """What the HTTP layer needs from the model side (a Serve handle in production, a fake in tests)."""

    # route: one draw in [0, 1) per request, so all of its images go to the same model during a canary
    async def predict_image(self, data: bytes, route: float | None = None) -> dict: ...

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict: ...

    # Grad-CAM of the served model for one image (serve.classifier.ModelServer.explain): label, confidence,
    # model_version, target, method, layer, saliency, overlay_png; {"unknown_target": why} for a class it lacks
    async def explain(self, data: bytes, target: str | None = None) -> dict: ...

    async def info(self) -> dict: ...

    async def champion(self) -> dict | None: ...

    async def drift_report(self) -> dict: ...


@dataclass(frozen=True)
class Context:
    """Shared by the routers of one app."""

    backend: Backend
    store: Store
    settings: Settings
    metrics: HttpMetrics | None
    api_key: Callable[..., str]  # a FastAPI dependency: the caller's actor name, or 401/403/429
    memo: dict = field(default_factory=dict, compare=False)

    async def task(self) -> Task:
        """The served model's task (train/tasks), asked of the backend once: every version of one registered
        model has the champion's task (train/registry.check_same_task), so it does not change under this app."""
        if "task" not in self.memo:
            self.memo["task"] = task_named((await self.backend.info()).get("task"))
        return self.memo["task"]
