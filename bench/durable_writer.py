"""In-process model of a serving replica's event loop: what waiting for the prediction's commit costs.

32 coroutines each burn 0.9 ms of CPU (parsing, the response), wait 20 ms (the model on its thread), log a
prediction with a 28-px PNG and, when durable, await `Store.recorded` (the group commit). The event loop is
saturated, as the replica's is under wrk, so added latency shows up as fewer req/s. No Ray, no HTTP:

    .venv/bin/python bench/durable_writer.py --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path = [str(REPO)] + [entry for entry in sys.path if Path(entry or ".").resolve() != REPO / "bench"]

from store.store import Store  # noqa: E402


def pngs(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray((np.random.default_rng(i).random((28, 28)) * 255).astype("uint8")).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def burn(ms: float) -> None:
    """Hold the GIL for `ms` of pure-Python CPU, as parsing a request and building its response do."""
    until = time.perf_counter() + ms / 1000
    while time.perf_counter() < until:
        continue  # spinning is the point: a busy event loop the writer thread must take the GIL from


async def run(images: list[bytes] | None, durable: bool, connections: int, seconds: float) -> tuple[float, float]:
    """(req/s, p50 ms) of one run against a fresh SQLite store."""
    folder = tempfile.mkdtemp(prefix="rayloop-durable-")
    store = Store(f"sqlite:///{folder}/rayloop.db", f"{folder}/blobs")
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(first: int) -> None:
        i = first
        while time.perf_counter() < stop:
            started = time.perf_counter()
            burn(0.9)
            await asyncio.sleep(0.02)
            prediction_id = store.log_prediction(model_version="1", label="3", confidence=0.9,
                                                 probabilities={"3": 0.9},
                                                 image=images[i % len(images)] if images else None)
            if durable:
                await store.recorded([prediction_id])
            latencies.append(time.perf_counter() - started)
            i += connections

    await asyncio.gather(*(client(c) for c in range(connections)))
    store.close()
    latencies.sort()
    return len(latencies) / seconds, latencies[len(latencies) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    images = pngs(5000)
    for round_ in range(1, args.rounds + 1):
        for with_images in (True, False):
            rates = {}
            for durable in (False, True):
                sys.setswitchinterval(0.005)  # Python's default; the writer lowers it once requests wait
                rates[durable], p50 = asyncio.run(run(images if with_images else None, durable,
                                                      args.connections, args.seconds))
                print(f"round {round_} images={with_images} durable={durable}: {rates[durable]:.0f} req/s, "
                      f"p50 {p50:.1f} ms", flush=True)
            print(f"round {round_} images={with_images}: durable / unconfirmed {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
