"""One optimiser step over a batch in micro-batches whose saved activations fit a memory budget.

Most of a training step's memory is what autograd keeps for the backward pass. The small CNN keeps about
16 MB per 128-px RGB image, so one batch of 64 held 1.1 GB at once, more than the rest of the training
process together; at 224 px, or with ResNet-50, a batch of 64 needs several GB. The gradients of a batch's
micro-batches, each loss weighted by its share of the batch, add up to the batch's gradient, so the step
keeps its batch size, learning rate and schedule while its peak memory is bounded by `train.step_memory_mb`.
One difference: BatchNorm normalises over each micro-batch rather than the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from train.scaling import auto_or_count

CPU_BUDGET_MB = 512      # `auto` on CPU: what a laptop can give one step besides Ray and the libraries
GPU_BUDGET_SHARE = 0.25  # `auto` on a GPU: a quarter of its memory (the rest: weights, optimizer, workspace)
PROBE_IMAGES = (2, 4)    # two probe batch sizes: their difference is per-image, whatever the weights add
EVAL_PIXELS = 256 * 64 * 64  # pixels per evaluation batch: 256 images up to 64 px


def budget_bytes(setting: str | int, device: torch.device) -> int:
    """`train.step_memory_mb` in bytes: 0 is no limit; `auto` is CPU_BUDGET_MB on CPU, a share of a GPU's memory."""
    megabytes = auto_or_count(setting, "train.step_memory_mb", "0 (no limit) or megabytes")
    if megabytes is not None:
        return megabytes * 1024 ** 2
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_BUDGET_SHARE)
    return CPU_BUDGET_MB * 1024 ** 2


def saved_bytes(model: torch.nn.Module, images: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager]
                ) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass of `images`."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        model(images)
    return sum(storages.values())


def activation_bytes_per_image(model: torch.nn.Module, device: torch.device,
                               autocast: Callable[[], contextlib.AbstractContextManager]) -> int:
    """What one more image adds to a training step's saved activations, from two tiny forward passes of random
    pixels. The model's state (BatchNorm's running statistics) and the random generators are left as they were."""
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    was_training = model.training
    model.train()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        small, large = (saved_bytes(model, torch.rand(n, model.channels, model.image_size, model.image_size,
                                                      device=device), autocast) for n in PROBE_IMAGES)
    model.train(was_training)
    with torch.no_grad():
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return max(1, (large - small) // (PROBE_IMAGES[1] - PROBE_IMAGES[0]))


def eval_batch_size(image_size: int, cap: int = 256) -> int:
    """Images per batch of a forward pass without gradients (evaluation, the gate, the drift reference): `cap`
    up to 64 px, fewer above, so the feature maps alive at once stay a few hundred MB whatever the image size.
    The small CNN's first maps are 2 MB an image at 128 px: batches of 256 held over 1 GB there, 64 hold 0.27 GB."""
    return max(8, min(cap, EVAL_PIXELS // (image_size * image_size)))


def micro_batch_size(batch: int, per_image: int, budget: int) -> int:
    """The largest micro-batch within the budget, evened out over the batch: 64 images at a budget of 40 run as
    32 + 32, not 40 + 24. At least 2 images (BatchNorm cannot train on one image's 1x1 maps), even when the
    budget holds fewer. No budget (0): the whole batch."""
    if not budget or per_image * batch <= budget:
        return batch
    parts = math.ceil(batch / max(2, budget // per_image))
    return math.ceil(batch / parts)


def micro_batches(model: torch.nn.Module, batch: int, device: torch.device, setting: str,
                  autocast: Callable[[], contextlib.AbstractContextManager], rank: int) -> int:
    """The micro-batch size keeping a step's saved activations within train.step_memory_mb (rank 0 says so)."""
    budget = budget_bytes(setting, device)
    if not budget:
        return batch
    per_image = activation_bytes_per_image(model, device, autocast)
    micro = micro_batch_size(batch, per_image, budget)
    if rank == 0 and micro < batch:
        print(f"[train] a step saves ~{per_image / 1024 ** 2:.1f} MB of activations per image: batches of {batch} "
              f"run as micro-batches of {micro} (train.step_memory_mb={setting}: "
              f"{budget / 1024 ** 2:.0f} MB)", flush=True)
    return micro


def accumulate_gradients(model: torch.nn.Module, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         images: torch.Tensor, targets: torch.Tensor, micro: int,
                         autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Accumulate the batch's mean-loss gradient over micro-batches of at most `micro` items; returns the batch's
    mean loss. DDP all-reduces once, with the last micro-batch's backward (`no_sync` before it)."""
    count = len(targets)
    total = 0.0
    starts = range(0, count, micro)
    for start in starts:
        last = start == starts[-1]
        part = slice(start, start + micro)
        share = len(targets[part]) / count
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = loss_of(model(images[part]), targets[part])
            (loss * share).backward()
        total += float(loss.detach()) * share
    return total
