"""Shared fixtures: isolated data dirs, small image folders made on the fly, a local Ray, a real Serve.

Helpers the tests import live in tests/support/; fixtures live here (and in tests/reliability/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster import environment

environment.apply()  # an entry point like any other: before anything imports ray

import pytest  # noqa: E402

from cluster.settings import ENV_ALIASES, Settings, to_env  # noqa: E402
from tests.support.images import write_image_folder  # noqa: E402
from tests.support.paths import REPO  # noqa: E402
from tests.support.serving import SMALL_UPLOADS, serving  # noqa: E402

# Settings a developer's shell exports (RAYLOOP_MLFLOW_URI, RAYLOOP_DATA_DIR, ports) must not reach the
# tests: with them, monitor and control tests read another registry than their own data dir's, and a test
# could write to that user's registry or store. Every test starts from params.yaml and sets what it needs.
for _name in [*to_env(Settings()), *ENV_ALIASES, "RAYLOOP_PARAMS"]:
    os.environ.pop(_name, None)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A fresh RAYLOOP_DATA_DIR so a test never touches the repo's data/."""
    path = tmp_path / "data"
    monkeypatch.setenv("RAYLOOP_DATA_DIR", str(path))
    monkeypatch.chdir(REPO)
    return path


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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Ray + Serve started once for the module on a free port, with a tiny registered champion."""
    # A longer batch wait than production so concurrent test requests reliably share a batch.
    env = {**SMALL_UPLOADS, "RAYLOOP_SERVE_BATCH_WAIT_TIMEOUT_S": "0.05"}
    with serving(tmp_path_factory.mktemp("serve") / "data", env=env) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    """An HTTP client of the module's Serve (the `served` above, or the module's own)."""
    with served.client() as c:
        yield c


def pytest_configure(config):
    # Ray reads this when it starts; the test suite never phones home.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Heads started by ray.cluster_utils (test_multinode) need a token as `ray start` does; a machine
    # that never ran Ray has none (tests/test_cli_up.py starts with such a HOME on purpose).
    from cluster.ray_cluster import ensure_auth_token

    ensure_auth_token()
