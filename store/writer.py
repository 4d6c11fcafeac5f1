"""The prediction writer: a background thread that commits logged predictions in gathered batches."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import sys
import threading
import time

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from store.blobs import BlobStore
from store.schema import PredictionRow, StoreUnavailable

# How long the writer gathers rows into one transaction when busy: 40 rows at 800 req/s.
GATHER_S = 0.05
# Python's default GIL switch interval (5 ms) is a wait the writer thread pays each time it takes the GIL back
# from a busy event loop (after each file write, insert and commit: every call that releases it); a request
# waiting for its commit paid it many times over. 50 us once requests wait on the writer: an interval only
# forces a switch while another thread asks for the GIL, so an idle writer costs the loop nothing. Measured
# in-process (32 waiting requests, a saturated loop): 0.80x req/s at 5 ms, 0.83x at 1 ms, 0.91x at 50 us.
DURABLE_SWITCH_INTERVAL_S = 0.00005
# Ids of rows the writer gave up on, remembered this far back so a late `durable` wait still hears of it.
FAILED_IDS_KEPT = 100_000


class NotRecorded(StoreUnavailable):
    """The writer gave up on a prediction (the database refused it past the retry window): a 503, and the
    client may send the request again."""

    def __init__(self, prediction_id: str):
        super().__init__(f"prediction {prediction_id} could not be recorded: the store did not take it")


class PredictionWriter:
    """Queued (row, image) pairs written by one daemon thread; flush() waits for what is queued, wait_for()
    for one row."""

    def __init__(self, engine: Engine, blobs: BlobStore, flush_interval_s: float = 0.5, flush_max_rows: int = 256,
                 retry_s: float = 120.0):
        self.engine = engine
        self.blobs = blobs
        self.flush_interval_s = flush_interval_s
        self.flush_max_rows = flush_max_rows
        self.gather_s = min(GATHER_S, flush_interval_s)
        self.retry_s = retry_s  # how long queued predictions wait out a locked or unreachable database
        self._pending: queue.Queue[tuple[dict, bytes | None]] = queue.Queue()
        self._flushed = threading.Condition()
        # Rows queued and rows written (or given up on) so far, in queue order, and the queue position of
        # each id still queued: a wait covers what was queued before it, never rows queued during it
        # (under steady load the queue is never empty, and waiting for that took seconds).
        self._queued = 0
        self._written = 0
        self._positions: dict[str, int] = {}
        self._images: dict[str, int] = {}  # blob key -> queue position of the last row queued with that image
        self._waiters: list[tuple[int, str, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._failed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._closing = threading.Event()
        self._hurry = threading.Event()  # flush() or close() waits: write what is queued now
        self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
        self._thread.start()

    def put(self, row: dict, image: bytes | None) -> None:
        with self._flushed:  # position and queue order agree
            self._queued += 1
            self._positions[row["id"]] = self._queued
            if image:
                self._images[row["blob_key"]] = self._queued
            self._pending.put((row, image))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every prediction queued before this call is written; False on timeout."""
        with self._flushed:
            return self._wait_until(self._queued, timeout)

    def wait_for(self, prediction_id: str, timeout: float = 10.0) -> bool:
        """Wait until this prediction is written if it is still queued here (at once if not); False on timeout."""
        with self._flushed:
            position = self._positions.get(prediction_id)
            return True if position is None else self._wait_until(position, timeout)

    def wait_for_image(self, key: str, timeout: float = 10.0) -> bool:
        """Wait until every row queued here with this image is written (at once if none is); False on timeout.
        Whoever deletes an image checks its use after this, and sees those rows."""
        with self._flushed:
            position = self._images.get(key)
            return True if position is None else self._wait_until(position, timeout)

    async def durable(self, prediction_id: str) -> None:
        """Return once this prediction's row is committed (group commit: rows of requests waiting together go
        in one transaction, and no gathering delay is added while anyone waits); raises NotRecorded when
        the writer gave up on it."""
        loop = asyncio.get_running_loop()
        with self._flushed:
            position = self._positions.get(prediction_id)
            if position is None or self._written >= position:
                if prediction_id in self._failed:
                    raise NotRecorded(prediction_id)
                return
            future = loop.create_future()
            self._waiters.append((position, prediction_id, loop, future))
            self._hurry.set()
            if sys.getswitchinterval() > DURABLE_SWITCH_INTERVAL_S:
                sys.setswitchinterval(DURABLE_SWITCH_INTERVAL_S)
        await future

    def _wait_until(self, position: int, timeout: float) -> bool:
        if self._written >= position:
            return True
        self._hurry.set()
        return self._flushed.wait_for(lambda: self._written >= position, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop."""
        self._closing.set()
        self._hurry.set()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        last_write = 0.0
        while not (self._closing.is_set() and self._pending.empty()):
            try:
                first = self._pending.get(timeout=self.flush_interval_s)
            except queue.Empty:
                continue
            # Busy (the last write began moments ago): gather a few ms of rows into one transaction,
            # unless flush()/close() asks now. A transaction per request cost the serving replica a
            # third of its CPU under load (py-spy, bench/serve.py). Idle: write at once.
            busy = time.monotonic() - last_write < self.gather_s
            if busy and not self._closing.is_set() and self._pending.qsize() + 1 < self.flush_max_rows:
                self._hurry.wait(self.gather_s)
            self._hurry.clear()  # whoever set it queued its rows before, so the drain below takes them
            last_write = time.monotonic()
            batch = [first]
            while len(batch) < self.flush_max_rows:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[tuple[dict, bytes | None]]) -> None:
        rows = [row for row, _ in batch]
        try:
            for row, image in batch:
                if image:
                    self.blobs.put(image, row["blob_key"])
            deadline, delay, retry = time.monotonic() + self.retry_s, 0.05, False
            while True:
                try:
                    self._insert_new(rows, retry)
                    break
                except OperationalError as exc:
                    # Locked past the busy timeout, or the server went away: the ids are already in the
                    # clients' hands, so wait it out rather than drop the rows.
                    if time.monotonic() + delay > deadline:
                        raise
                    print(f"[rayloop store] retrying {len(rows)} predictions in {delay:.2f}s: "
                          f"{str(exc.orig)[:200]}", flush=True)
                    time.sleep(delay)
                    delay, retry = min(delay * 2, 2.0), True
        except Exception as exc:  # noqa: BLE001 - the writer must outlive a bad batch
            print(f"[rayloop store] could not write {len(batch)} predictions: {exc!r}", flush=True)
            with self._flushed:
                for row in rows:
                    self._failed[row["id"]] = None
                while len(self._failed) > FAILED_IDS_KEPT:
                    self._failed.popitem(last=False)
        finally:
            with self._flushed:
                for position, (row, image) in enumerate(batch, start=self._written + 1):
                    self._pending.task_done()
                    self._positions.pop(row["id"], None)
                    if image and self._images.get(row["blob_key"]) == position:  # no later row has it queued
                        del self._images[row["blob_key"]]
                self._written += len(batch)
                self._settle_waiters()
                self._flushed.notify_all()

    def _settle_waiters(self) -> None:
        """Wake the `durable` waits whose rows are now written (or given up on); called holding the lock.
        One wake-up per event loop, however many requests it holds: each is a write to the loop's pipe."""
        done = [w for w in self._waiters if w[0] <= self._written]
        if not done:
            return
        self._waiters = [w for w in self._waiters if w[0] > self._written]
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for _, prediction_id, loop, future in done:
            error = NotRecorded(prediction_id) if prediction_id in self._failed else None
            by_loop.setdefault(loop, []).append((future, error))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, settled)

    def _insert_new(self, rows: list[dict], retry: bool = False) -> None:
        # Core executemany: the ORM's bulk insert path cost as much again per row.
        with self.engine.begin() as connection:
            if retry:  # a commit whose answer was lost must not insert the same ids twice
                table = PredictionRow.__table__
                ids = [r["id"] for r in rows]
                present = set(connection.scalars(select(table.c.id).where(table.c.id.in_(ids))))
                rows = [r for r in rows if r["id"] not in present]
            if rows:
                connection.execute(PredictionRow.__table__.insert(), rows)


def _settle(settled: list[tuple[asyncio.Future, Exception | None]]) -> None:
    for future, error in settled:
        if not future.done():
            future.set_exception(error) if error else future.set_result(None)
