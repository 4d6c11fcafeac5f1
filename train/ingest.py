"""Ray Data ingest: manifest rows -> decoded uint8 pixel batches, streamed with backpressure.

The datasets built here feed `TorchTrainer(datasets=...)` (each worker reads its shard with
`iter_torch_batches`) and the driver's own passes over a split (evaluation, the gate, the drift
reference) through `iter_batches`. Decoding runs in Ray Data tasks on any node's CPUs; no process
holds a whole split.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.data
import ray.train
from ray.data.extensions import ArrowTensorArray

from train.data import PreparedData
from train.decode import (
    MNIST,
    Decoder,
    decode_batch,
    load_mnist,
    local_batches,
    resize_batch,
)
from train.steps import eval_batch_size

ROWS_PER_BLOCK = 256     # manifest rows per read task: about 12 MB of 128-px RGB output
DECODE_BATCH = 64
# Decode tasks ask for a small CPU share: Ray Train holds whole CPUs for its workers and Serve's
# replicas hold fractions, so on a 2-core head (2 x 0.4 for Serve + 1 for a retrain's worker) a task
# asking for 0.25 would wait forever for the training it feeds. How many run at once is capped by
# decode_tasks() instead: each is a process of its own (~120 MB), and more than the cores do no good.
DECODE_CPUS = 0.1


def quiet() -> None:
    """Ray Data's progress bars and per-dataset INFO lines drown the per-epoch progress line."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def limit_buffer(megabytes: int) -> ray.data.ExecutionOptions:
    """Cap the object store Ray Data fills with decoded batches in flight, for the datasets this process
    makes from now on (each keeps the context it was made in); returns the ingest options to hand Ray
    Train, whose controller, in another process, would otherwise apply its own defaults to the shards.

    Ray's default lets a streaming pass fill half the object store (30% of RAM): on a 24 GiB machine a
    2,000-photo run buffered over a GiB of decoded 128-px batches ahead of a training that could not
    use them faster. A budget of a few hundred MB keeps the decode tasks busy all the same.
    """
    if megabytes <= 0:
        raise ValueError(f"data.stream_buffer_mb={megabytes}: expected a positive number of megabytes")
    options = ray.data.DataContext.get_current().execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=megabytes * 1024 ** 2)
    return ray.train.DataConfig.default_ingest_options()


def decode_tasks() -> int:
    """Decode tasks at a time: one per CPU of the cluster, at least 2."""
    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def decode_pool() -> ray.data.TaskPoolStrategy:
    """Decode tasks as a task pool of decode_tasks() at a time (`concurrency=` is deprecated since Ray 2.51)."""
    return ray.data.TaskPoolStrategy(size=decode_tasks())


def rows_dataset(rows: pd.DataFrame, columns: tuple[str, ...] = ("path", "label")) -> ray.data.Dataset:
    """Manifest rows as a dataset of many small blocks, so decoding runs in parallel."""
    rows = rows[list(columns)].reset_index(drop=True)
    chunks = [rows.iloc[i:i + ROWS_PER_BLOCK] for i in range(0, len(rows), ROWS_PER_BLOCK)] or [rows]
    return ray.data.from_pandas(chunks)


def decoded(rows: ray.data.Dataset, roots: list[str], size: int, channels: int, num_classes: int = 0
            ) -> ray.data.Dataset:
    """Rows decoded to pixels (and masks, for rows with a `mask` column) by Ray Data tasks (decode_batch)."""
    return rows.map_batches(decode_batch, fn_args=(roots, size, channels, num_classes), batch_size=DECODE_BATCH,
                            batch_format="numpy", num_cpus=DECODE_CPUS, compute=decode_pool())


def image_dataset(rows: pd.DataFrame, decoder: Decoder) -> ray.data.Dataset:
    """Decoded images {"image": uint8 NxHxWxC, "label": int64} for manifest rows (+ "mask": uint8 NxHxW when
    the rows have a `mask` column: a segmentation set).

    The embedded digits travel as pixels (4 MB, `from_numpy`-style blocks): no file to read and no
    copy of the digit set loaded in every decode task.
    """
    quiet()
    if decoder.root == MNIST:
        digits = load_mnist()[0]
        index = rows["path"].str.slice(len(MNIST) + 1).astype(int).to_numpy()
        labels = rows["label"].to_numpy(dtype=np.int64)
        table = pa.table({"image": ArrowTensorArray.from_numpy(digits[index]), "label": labels})
        # from_blocks, not from_arrow: from_arrow asks a Ray task per block for its metadata, and those
        # tasks started worker processes importing Ray Data (~2 s of CPU each) in the first epoch.
        dataset = ray.data.from_blocks([table.slice(i, ROWS_PER_BLOCK)
                                        for i in range(0, max(1, len(rows)), ROWS_PER_BLOCK)])
        if (decoder.size, decoder.channels) == (28, 1):
            return dataset
        return dataset.map_batches(resize_batch, fn_args=(decoder.size, decoder.channels),
                                   batch_size=DECODE_BATCH, batch_format="numpy", num_cpus=DECODE_CPUS,
                                   compute=decode_pool())
    columns = ("path", "label", "mask") if "mask" in rows else ("path", "label")
    return decoded(rows_dataset(rows, columns), [decoder.root], decoder.size, decoder.channels, decoder.num_classes)


def mixed_dataset(rows: pd.DataFrame, roots: list[str], size: int, channels: int, num_classes: int = 0
                  ) -> ray.data.Dataset:
    """Rows (path, label, source; and mask for segmentation) from several roots in one stream, in the rows'
    order: each row is decoded from `roots[source]`. A retrain mixes its base split and its feedback this
    way, so feedback is spread through every epoch (and through an epoch capped at train.max_steps). Rows of
    the embedded digits ("mnist/<index>") come from the digit set each decode process loads once
    (`load_mnist`, 4 MB)."""
    quiet()
    columns = ("path", "label", "mask", "source") if "mask" in rows else ("path", "label", "source")
    return decoded(rows_dataset(rows, columns), roots, size, channels, num_classes)


def split_dataset(data: PreparedData, split: str, limit: int | None = None) -> ray.data.Dataset:
    """One split of a prepared dataset, in its fixed shuffled order (a prefix is a class-mixed sample)."""
    rows = data.rows(split)
    return image_dataset(rows.iloc[:limit] if limit is not None else rows, data.decoder())


def iter_images(dataset: ray.data.Dataset, batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Stream a dataset into this process batch by batch (the driver's evaluation passes)."""
    yield from dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


def stream(rows: pd.DataFrame, decoder: Decoder, batch_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Manifest rows batch by batch (`eval_batch_size` images by default): through Ray Data when Ray is
    connected, else decoded in this process.

    The embedded digits are already pixels in this process: a Ray Data pass would only add its start-up.
    """
    batch_size = batch_size or eval_batch_size(decoder.size)
    if ray.is_initialized() and decoder.root != MNIST:
        yield from iter_images(image_dataset(rows, decoder), batch_size)
    else:
        masks = rows["mask"].to_numpy() if "mask" in rows else None
        yield from local_batches(decoder, rows["path"].to_numpy(), rows["label"].to_numpy(), batch_size, masks)


def batches(data: PreparedData, split: str, batch_size: int | None = None, limit: int | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
    """A split (its first `limit` rows: a class-mixed sample) batch by batch, streamed."""
    yield from stream(data.rows(split).iloc[:limit], data.decoder(), batch_size)
