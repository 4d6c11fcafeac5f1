"""Shared fixtures: isolated data dirs, small image folders made on the fly, a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

from cluster import environment

environment.apply()  # an entry point like any other: before anything imports ray

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing on loopback listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A fresh RAYLOOP_DATA_DIR so a test never touches the repo's data/."""
    path = tmp_path / "data"
    monkeypatch.setenv("RAYLOOP_DATA_DIR", str(path))
    monkeypatch.chdir(REPO)
    return path


def write_image_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int,
                       seed: int = 0, gray: bool = False) -> Path:
    """An ImageFolder whose classes differ by colour and shape, in odd sizes, PNG and JPEG mixed."""
    rng = np.random.default_rng(seed)
    for index, (name, colour) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(18, 40)), int(rng.integers(18, 40))
            pixels = rng.integers(0, 60, size=(h, w, 3)).astype(np.float32)
            y0, x0 = h // 4, w // 4
            if index % 2 == 0:
                pixels[y0:h - y0, x0:w - x0] += colour
            else:
                pixels[:, x0:w - x0] += np.array(colour) * 0.8
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            if gray:
                image = image.convert("L")
            suffix = ".png" if i % 2 else ".jpg"
            image.save(folder / f"img_{i:03d}{suffix}")
    return root


@pytest.fixture
def rgb_folder(tmp_path) -> Path:
    """Three RGB classes the repo has never seen, 30 images each, sizes between 18 and 40 px."""
    return write_image_folder(tmp_path / "shapes", {"apple": (200, 30, 30), "leaf": (20, 190, 40),
                                                    "sky": (30, 60, 210)}, per_class=30)


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray instance for the module (2 CPUs), shut down afterwards."""
    import ray

    if not ray.is_initialized():
        # "local": a fresh instance, whatever RAY_ADDRESS an earlier test's driver left behind.
        # 4 logical CPUs on 2 cores: a finished trainer's controller can hold its reservation a
        # while, and a Tune trial right after it would otherwise wait for a CPU that never frees.
        from cluster.ray_cluster import start_local

        start_local(num_cpus=4, logging_level="WARNING")
    yield ray
    ray.shutdown()


def pytest_configure(config):
    # Ray reads this when it starts; the test suite never phones home.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Heads started by ray.cluster_utils (test_multinode) need a token as `ray start` does; a machine
    # that never ran Ray has none (tests/test_cli_up.py starts with such a HOME on purpose).
    from cluster.ray_cluster import ensure_auth_token

    ensure_auth_token()
