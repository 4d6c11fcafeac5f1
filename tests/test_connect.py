"""cluster.ray_cluster.connect: which Ray a rayloop command joins when no head of its own runs."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from cluster.ray_cluster import free_port
from tests.support.paths import REPO

pytestmark = pytest.mark.slow

PROBE = ("from cluster import environment; environment.apply(); import ray; "
         "from cluster.settings import load_settings; from cluster.ray_cluster import connect; "
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


OWN_STATE = """
import sys
from cluster import environment

environment.apply()
import ray
from cluster.settings import load_settings
from cluster.ray_cluster import connect

connect(load_settings())

@ray.remote
class Marker:
    def ping(self):
        return 1

marker = Marker.options(name="ours").remote()
ray.get(marker.ping.remote())
print("ready", flush=True)
sys.stdin.readline()  # the test starts another Ray meanwhile: now the machine's "latest cluster"

@ray.remote
def named_actors():  # what Ray Train's placement-group cleaner does from its actor: ask the State API
    from ray.util.state import list_actors
    return sorted(a.name for a in list_actors() if a.name)

print("named", ray.get(named_actors.remote()), flush=True)
ray.shutdown()
"""


def test_workers_of_a_commands_own_ray_ask_that_ray_for_state_while_a_newer_ray_runs(tmp_path):
    # Before: a worker's State API call went to "the latest cluster" on the machine; Ray Train's cleaner
    # then judged its controller by another cluster's actors and leaked the trial's placement group.
    import ray

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAYLOOP_") and k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}}
    env.update(RAYLOOP_DATA_DIR=str(tmp_path / "data"), RAYLOOP_SERVICES_RAY_PORT=str(free_port()),
               RAY_USAGE_STATS_ENABLED="0")
    probe = subprocess.Popen([sys.executable, "-c", OWN_STATE], cwd=REPO, env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert probe.stdout.readline().strip() == "ready", probe.stderr.read()[-2000:]
        assert not ray.is_initialized()
        ray.init(address="local", num_cpus=1, include_dashboard=True, logging_level="WARNING")  # the newer Ray

        @ray.remote
        class Other:
            def ping(self):
                return 1

        other = Other.options(name="theirs").remote()
        ray.get(other.ping.remote())
        out, err = probe.communicate("go\n", timeout=180)
    finally:
        if probe.poll() is None:
            probe.kill()
        ray.shutdown()
    assert probe.returncode == 0, err[-2000:]
    assert "named ['ours']" in out, out + err[-2000:]
