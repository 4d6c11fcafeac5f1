"""The batched classifier deployment: registered model in, labels + drift features out. No HTTP here."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve as rayserve

from cluster.settings import Settings
from control import models
from serve import explain, images
from serve.canary import Canary, Split
from serve.metrics import model_metrics
from train.factory import Model
from train.features import feature_rows
from train.tasks import task_of


@dataclass(frozen=True)
class LoadedModel:
    """A registry version ready to run on this replica's device."""

    model: Model
    version: str
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.model.channels, self.model.image_size, self.model.image_size)


def load(settings: Settings, alias_or_version: str, device: torch.device) -> LoadedModel:
    """Load models:/<name>@alias (or /version) from MLflow, ready to serve on `device`."""
    model, version = models.load(settings, alias_or_version)
    return LoadedModel(for_serving(model, device), version, device)


def for_serving(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode on `device`, channels_last: on CPU too, where the CNN's forward pass took 11.4 instead of
    17.4 ms per batch of 16 on one thread (run() feeds it channels_last input; the answers are the same)."""
    return model.to(device).eval().to(memory_format=torch.channels_last)


def run(loaded: LoadedModel, pixels: np.ndarray) -> list[dict]:
    """float32 NxCxHxW in [0, 1] -> per image: label, confidence, probabilities, model_version, features, and
    what else the model's task answers (a segmentation model: "mask", uint8 HxW class ids at the model's size,
    which the HTTP layer scales to the image's: train/tasks).
    """
    x = torch.from_numpy(pixels).to(loaded.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if loaded.device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = torch.autocast("cuda", dtype=dtype)
    else:
        autocast = contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        outputs = loaded.model.infer(x)
    return task_of(loaded.model).answers(outputs, feature_rows(outputs, loaded.classes), loaded.classes,
                                         loaded.version)


# Uploads up to this size are decoded in the batch's worker thread, together with the forward pass
# (one thread hop per batch instead of one per image); larger ones are decoded on their own first,
# so one big photo does not hold up the whole batch.
DECODE_IN_BATCH_BYTES = 256 * 1024


class ModelServer:
    """Champion model on one replica; requests are grouped into batches by @rayserve.batch.

    Deployed as the `Classifier` deployment: on its own behind the Ingress (serve.topology: split), or
    with the HTTP API in the same replica (serve.topology: fused, serve/app.py).
    """

    def __init__(self, settings: Settings, model_version: str = "champion"):
        self.settings = settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Fractional CPUs per replica: more intra-op threads than cores only adds contention.
            torch.set_num_threads(max(1, int(round(settings.serve.num_cpus))))
        self._swap_lock = asyncio.Lock()
        self._explaining = asyncio.Semaphore(1)  # one explanation at a time per replica; the others wait
        self._stats_lock = threading.Lock()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.metrics = model_metrics()
        self.loaded = load(settings, model_version, self.device)
        self._on_new_model()
        self.predict_batch.set_max_batch_size(settings.serve.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(settings.serve.batch_wait_timeout_s)
        # Following the champion (serve.follow_champion_s): only while no version is pinned through user_config.
        self._following = str(model_version) == models.CHAMPION
        self._assign = threading.Lock()
        self._pinned_at = 0  # bumped by each reconfigure: a follower's load begun before it is dropped
        self._stop = threading.Event()
        # The challenger of a rollout under way, beside the champion (serve/canary.py).
        self.canary = (Canary(settings, lambda version: load(settings, version, self.device), run)
                       if settings.rollout.staged else None)
        if settings.serve.follow_champion_s > 0:
            threading.Thread(target=self._follow, args=(settings.serve.follow_champion_s,), daemon=True,
                             name="follow-champion").start()

    def _on_new_model(self) -> None:
        if self.metrics and self.loaded.version.isdigit():
            self.metrics.model_version.set(int(self.loaded.version))

    async def reconfigure(self, user_config: dict) -> None:
        """user_config {"model_version": "7" | "champion", "max_batch_size", "batch_wait_timeout_s"}.

        The new model loads in a thread while requests keep flowing to the old one, then one
        assignment swaps it in: a batch sees either the old model or the new one, never a mix.
        """
        user_config = user_config or {}
        if "max_batch_size" in user_config:
            self.predict_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.predict_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
        wanted = user_config.get("model_version")
        if not wanted:
            return
        with self._assign:
            self._pinned_at += 1
        async with self._swap_lock:
            version = await asyncio.to_thread(models.resolve, self.settings, str(wanted))
            # Rollouts and rollbacks move the champion alias first, then pin its number: still following.
            # A version pinned by hand that is not the champion stops it.
            following = str(wanted) == models.CHAMPION or (
                self.settings.serve.follow_champion_s > 0
                and version == await asyncio.to_thread(models.resolve, self.settings, models.CHAMPION))
            with self._assign:
                self._following = following
            if version == self.loaded.version:
                return
            challenger = self.canary.challenger if self.canary else None
            if challenger is not None and challenger.version == version:
                loaded = challenger  # a staged rollout's end: the challenger is loaded here already
            else:
                loaded = await asyncio.to_thread(load, self.settings, version, self.device)
            with self._assign:
                self.loaded = loaded
                self._on_new_model()

    def _follow(self, every_s: float) -> None:
        """Swap in the registry's champion whenever it moves (a retrain promoted it on another cluster).

        Each replica looks at its own moments (every_s +- 50%), so replicas change over one at a time, each
        in place: old model until the new one is loaded, no request dropped, no coordinator needed.
        """
        phase = random.Random()
        while not self._stop.wait(every_s * (0.5 + phase.random())):
            pinned_at = self._pinned_at
            if not self._following:
                continue
            try:
                version = models.resolve(self.settings, models.CHAMPION)
                if version == self.loaded.version:
                    continue
                loaded = load(self.settings, version, self.device)
            except Exception as exc:  # noqa: BLE001 - a registry hiccup: keep serving, look again later
                print(f"[rayloop] could not look up or load the champion: {exc!r}", flush=True)
                continue
            with self._assign:
                if not self._following or pinned_at != self._pinned_at:
                    continue  # reconfigure pinned a version meanwhile: that wins
                self.loaded = loaded
                self._on_new_model()
            print(f"[rayloop] this replica now serves v{version}, the registry's champion", flush=True)

    def __del__(self):  # Serve calls it when the replica goes: the follower thread stops with it
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        canary = getattr(self, "canary", None)
        if canary is not None:
            canary.stop()

    def info(self) -> dict:
        """What this replica serves."""
        loaded = self.loaded
        canary = self.canary
        rollout = canary.rollout if canary else None
        return {"name": self.settings.registry.model_name, "model_version": loaded.version,
                "rollout": None if rollout is None else {"id": rollout.id, "stage": rollout.stage,
                                                         "challenger": rollout.challenger,
                                                         "canary_share": rollout.canary_share},
                "task": task_of(loaded.model).name, "classes": loaded.classes, "input_shape": list(loaded.input_shape),
                "arch": loaded.model.arch, "device": str(loaded.device),
                "replica": rayserve.get_replica_context().replica_id.unique_id}

    def stats(self) -> dict:
        """Batch sizes this replica has run so far ({size: count})."""
        with self._stats_lock:
            return {"batch_sizes": dict(self.batch_sizes)}

    async def predict_image(self, data: bytes, route: float | None = None) -> dict:
        """Encoded image bytes -> prediction, or {"rejected": why, "too_large": bool} for bad input.

        route: a draw in [0, 1) for the request (the same for all its images): the challenger of a canary
        answers when it is below the canary's share (None: drawn here, per image).
        """
        if len(data) > DECODE_IN_BATCH_BYTES:
            channels, size, _ = self.loaded.input_shape
            serve = self.settings.serve
            try:
                data = await asyncio.to_thread(images.prepare, data, size, channels, serve.max_upload_bytes,
                                               serve.max_pixels)
            except images.ImageRejected as exc:
                return rejection(exc)
        return await self.predict_batch((data, route))

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict:
        """float32 CxHxW in [0, 1] at the model's input shape -> prediction."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if tuple(pixels.shape) != self.loaded.input_shape:
            return {"rejected": f"tensor shape {list(pixels.shape)} != model input {list(self.loaded.input_shape)}",
                    "too_large": False}
        return await self.predict_batch((pixels, route))

    async def explain(self, data: bytes, target: str | None = None) -> dict:
        """Encoded image bytes -> Grad-CAM of the served model's decision (serve/explain.py), or a refusal dict:
        {"rejected": why, "too_large": bool} for a bad image, {"unknown_target": why} for a class it lacks,
        {"unsupported": why} for a model whose task has no explanation (segmentation).

        Never on the prediction path: a forward and backward pass of its own in a worker thread, not in a
        batch, on the champion (a canary's challenger is not explained). Its cost is bounded by the upload
        limits (serve.max_upload_bytes, serve.max_pixels: checked before decoding, as for predictions), one
        image at the model's input size per call, and one explanation at a time on this replica.
        """
        loaded = self.loaded  # one model for the whole explanation, even if a swap lands meanwhile
        refusal = task_of(loaded.model).explain_refusal(loaded.version)
        if refusal is not None:
            return {"unsupported": refusal}
        if target is not None and target not in loaded.classes:
            return {"unknown_target": f"target {target!r} is not a class of model v{loaded.version}: "
                                      f"expected one of {', '.join(loaded.classes)}"}
        async with self._explaining:
            try:
                answer = await asyncio.to_thread(explained, loaded, data, target, self.settings.serve)
            except images.ImageRejected as exc:
                return rejection(exc)
        return {**answer, "model_version": loaded.version}

    @rayserve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, requests: list[tuple[np.ndarray | bytes, float | None]]) -> list[dict]:
        """(item, route) pairs: items are pixels, or small encoded images decoded here (in the batch's thread)."""
        loaded = self.loaded  # one model for the whole batch, even if a swap lands meanwhile
        items = [item for item, _ in requests]
        split = self.canary.split([route for _, route in requests]) if self.canary else None
        # The decode and forward pass run in a thread so the replica keeps queueing the next batch meanwhile.
        results = await asyncio.to_thread(decode_and_run, loaded, items, self.settings.serve, self.canary, split)
        if split is not None and split.shadow:  # after the callers' answers, unseen by them
            asyncio.get_running_loop().run_in_executor(None, self.canary.shadow, split, results, *split.work)
        for result in results:
            if "label" in result:
                result["batch_size"] = len(items)
        with self._stats_lock:
            self.batch_sizes[len(items)] += 1
        if self.metrics:
            self.metrics.observe_batch(len(items), [r for r in results if "label" in r])
        return results


def rejection(exc: images.ImageRejected) -> dict:
    # Answered, not raised: bad uploads are routine and should not fill the logs with tracebacks.
    return {"rejected": exc.detail, "too_large": exc.too_large}


def explained(loaded: LoadedModel, data: bytes, target: str | None, limits) -> dict:
    """Decode one upload (ImageRejected when it is bad) and explain the model's decision on it."""
    channels, size, _ = loaded.input_shape
    pixels = images.prepare(data, size, channels, limits.max_upload_bytes, limits.max_pixels)
    return explain.explanation(loaded.model, loaded.classes, pixels, target, loaded.device)


def decode_and_run(loaded: LoadedModel, items: list[np.ndarray | bytes], limits, canary: Canary | None = None,
                   split: Split | None = None) -> list[dict]:
    """Decode the encoded items, run the model on every item that fits its input; a result per item.
    With a rollout's split, the challenger answers the canary's items (canary.answer)."""
    channels, size, _ = loaded.input_shape
    results: list[dict] = [{} for _ in items]
    ok, pixels = [], []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = images.prepare(item, size, channels, limits.max_upload_bytes, limits.max_pixels)
            except images.ImageRejected as exc:
                results[i] = rejection(exc)
                continue
        if item.shape != loaded.input_shape:
            results[i] = {"error": f"image shape {list(item.shape)} does not fit model v{loaded.version} "
                                   f"input {list(loaded.input_shape)}; retry"}
            continue
        ok.append(i)
        pixels.append(item)
    if ok:
        stacked = np.stack(pixels)
        started = time.perf_counter()
        for i, result in zip(ok, run(loaded, stacked)):
            results[i] = result
        if split is not None:
            ms = (time.perf_counter() - started) * 1000
            canary.answer(split, results, ok, stacked, ms)
            split.work = (ok, stacked, ms)
    elif split is not None:
        split.shadow = False
    return results


Classifier = rayserve.deployment(name="Classifier")(ModelServer)
