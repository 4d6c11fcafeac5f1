"""cluster.ray_cluster.connect: which Ray a rayloop command joins when no head of its own runs."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

PROBE = ("import cluster, ray; from cluster.settings import load_settings; from cluster.ray_cluster import connect; "
         "print('joined', connect(load_settings())); ray.shutdown()")


def test_a_stale_current_cluster_file_does_not_hang_a_command_that_starts_its_own_ray(tmp_path):
    # A stopped head leaves <ray tmp>/ray_current_cluster behind; a bare ray.init() would wait on its GCS.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(ray_tmp, "ray"))
        with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write(f"127.0.0.1:{free_port()}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, RAYLOOP_DATA_DIR=str(tmp_path / "data"),
                   RAYLOOP_SERVICES_RAY_PORT=str(free_port()), RAY_USAGE_STATS_ENABLED="0")
        done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "joined in-process" in done.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
