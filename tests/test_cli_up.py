"""`rayloop up` / `status` / `down`: a real local Ray head and MLflow UI, a champion, the URLs."""

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.ray_cluster import free_port
from tests.support.images import png
from tests.support.paths import REPO
from tests.support.v2_tensors import b64

pytestmark = pytest.mark.slow
RAYLOOP = str(Path(sys.executable).parent / "rayloop")



def rayloop(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([RAYLOOP, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def first_start_env(tmp_path: Path, **ports: int) -> dict:
    """A user who never ran Ray: an empty HOME (no ~/.ray/auth_token), no RAY_AUTH_TOKEN* variables. A small
    first champion (300 digits, one epoch): no test here asserts its accuracy, only that `up` trains one."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAYLOOP_", "RAY_AUTH_TOKEN")) and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), RAYLOOP_DATA_DIR=str(tmp_path / "data"), RAY_USAGE_STATS_ENABLED="0",
               RAYLOOP_DATA_LIMIT="300", RAYLOOP_TRAIN_EPOCHS="1", RAYLOOP_TRAIN_NUM_WORKERS="1",
               RAYLOOP_SERVICES_RAY_PORT=str(free_port()), RAYLOOP_SERVICES_METRICS_EXPORT_PORT=str(free_port()))
    for name in ("mlflow", "dashboard", "serve", "ui", "prometheus"):
        env[f"RAYLOOP_SERVICES_{name.upper()}_PORT"] = str(ports.get(name) or free_port())
    return env


def assert_the_monitor_builds_a_report_on_request(serve: str) -> None:
    """Calm traffic gets no Evidently report from the monitor's own checks; /v1/drift?report=true asks the
    monitor actor `up` started for one now, and the API links it."""
    import time

    for value in range(60):
        request = urllib.request.Request(f"{serve}/v1/predict", data=json.dumps({"image_b64": b64(png(value * 4))})
                                         .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the replicas write their prediction logs in batches, off the path
        with urllib.request.urlopen(f"{serve}/v1/predictions?limit=1", timeout=10) as response:
            if json.load(response)["total"] >= 60:
                break
        time.sleep(0.5)
    with urllib.request.urlopen(f"{serve}/v1/drift?report=true", timeout=180) as response:
        drift = json.load(response)
    assert drift["status"] == "checked" and drift["window_size"] == 60 and drift["model_version"] == "1", drift
    with urllib.request.urlopen(f"{serve}{drift['report_url']}", timeout=30) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/html")
        page = response.read()
        assert b"Drifted Columns" in page and b"brightness" in page  # Evidently's drift table of our features


def rows(status_output: str) -> dict[str, str]:
    """`rayloop status` lines as {label: text} (labels are left-aligned in one column)."""
    table = {}
    for line in status_output.splitlines():
        label, _, text = line.strip().partition("  ")
        table[label] = text.strip()
    return table


def ray_target_up(port: int, timeout: float = 90) -> bool:
    """Prometheus found Ray's metrics endpoint through the service-discovery file and scraped it."""
    import json
    import time

    query = f"http://127.0.0.1:{port}/api/v1/query?query=up%7Bjob%3D%22ray%22%7D"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(query, timeout=10) as response:
            results = json.load(response)["data"]["result"]
        if any(r["value"][1] == "1" for r in results):
            return True
        time.sleep(2)
    return False


def test_a_first_start_makes_a_ray_token_trains_a_champion_prints_urls_and_down_stops_everything(tmp_path):
    env = first_start_env(tmp_path)
    port = {name: env[f"RAYLOOP_SERVICES_{name.upper()}_PORT"] for name in ("mlflow", "dashboard", "serve", "ui",
                                                                            "prometheus")}
    token = tmp_path / "home" / ".ray" / "auth_token"
    try:
        up = rayloop("up", env=env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"created Ray's auth token in {token}" in up.stdout and token.is_file()
        assert f"http://127.0.0.1:{port['mlflow']}" in up.stdout
        assert f"http://127.0.0.1:{port['dashboard']}" in up.stdout
        assert "champion: rayloop-classifier v1" in up.stdout
        summary = next(line for line in up.stdout.splitlines() if line.startswith("[rayloop] up in "))
        for step in ("started Ray", "started the MLflow UI", "trained a champion", "deployed v1", "started the demo"):
            assert step in summary, summary

        assert f"http://127.0.0.1:{port['serve']}/docs" in up.stdout and "drift monitor running" in up.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port['serve']}/healthz", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port['mlflow']}/health", timeout=10) as response:
            assert response.status == 200
        # The monitor alone, as a KubeRay head's start-up hook runs it: stopped, missed, started again.
        stopped = rayloop("monitor", "stop", env=env, timeout=120)
        assert stopped.returncode == 0 and "drift monitor stopped" in stopped.stdout, stopped.stderr[-2000:]
        missing = rayloop("monitor", "status", env=env, timeout=120)
        assert missing.returncode == 1 and "drift monitor not running" in missing.stdout
        restarted = rayloop("monitor", "start", env=env, timeout=120)
        assert restarted.returncode == 0 and "drift monitor running" in restarted.stdout
        assert_the_monitor_builds_a_report_on_request(f"http://127.0.0.1:{port['serve']}")
        mlflow = psutil.Process(int((tmp_path / "data" / "run" / "mlflow.pid").read_text().split()[0]))
        runners = [" ".join(p.cmdline()) for p in mlflow.children(recursive=True) if "job" in " ".join(p.cmdline())]
        assert runners == [], f"MLflow started job runners nobody uses: {runners}"
        controllers = [p.environ() for p in psutil.process_iter(["cmdline"])
                       if "ray::ServeController" in " ".join(p.info["cmdline"] or [])]
        ours = [e for e in controllers if e.get("RAYLOOP_DATA_DIR") == env["RAYLOOP_DATA_DIR"]]
        # A quiet controller, and no per-request syslog line from HAProxy to Serve's HAProxyManager.
        assert [(e.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S"), e.get("RAY_SERVE_HAPROXY_METRICS_ENABLED"))
                for e in ours] == [("0.5", "0")]
        assert f"http://127.0.0.1:{port['ui']}" in up.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port['ui']}/config", timeout=10) as response:
            assert response.status == 200 and b"Predict" in response.read()
        # Ray 2.60 guards its dashboard with the token; `ray get-auth-token` prints it.
        printed = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], env=env,
                                 capture_output=True, text=True, timeout=60).stdout.strip()
        assert printed == token.read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{port['dashboard']}/api/version",
                                         headers={"Authorization": f"Bearer {printed}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

        status = rayloop("status", env=env, timeout=120)
        assert status.returncode == 0
        table = rows(status.stdout)
        assert table["Ray"].startswith("running") and f"http://127.0.0.1:{port['dashboard']}" in table["Ray"]
        assert table["Serve"] == f"running  http://127.0.0.1:{port['serve']}/docs"
        assert table["serving"].startswith("rayloop-classifier v1 on cpu")
        assert table["MLflow UI"].startswith(f"running  http://127.0.0.1:{port['mlflow']}")
        assert table["Gradio demo"].startswith(f"running  http://127.0.0.1:{port['ui']}")
        assert table["Prometheus"] == "not running"  # no URL for what does not run
        assert table["Champion"].startswith("rayloop-classifier v1 ")
        labels = [line[:line.index(text)] for line, text in zip(status.stdout.splitlines(), table.values())
                  if not line.startswith(" ")]
        assert len({len(label) for label in labels}) == 1, f"texts do not start in one column: {status.stdout}"

        # Idempotent: no second training, same champion; `--monitoring` (make monitoring) adds Prometheus.
        again = rayloop("up", "--monitoring", env=env)
        assert again.returncode == 0 and "training one" not in again.stdout, again.stderr[-2000:]
        assert "champion: rayloop-classifier v1" in again.stdout and "created Ray's auth token" not in again.stdout
        assert f"Prometheus is up at http://127.0.0.1:{port['prometheus']}" in again.stdout
        assert ray_target_up(int(port["prometheus"])), "Prometheus never scraped the head's metrics"
    finally:
        down = rayloop("down", env=env, timeout=180)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "MLflow UI stopped" in down.stdout and "Serve stopped" in down.stdout
    assert "Gradio demo stopped" in down.stdout and "Prometheus stopped" in down.stdout
    after = rows(rayloop("status", env=env, timeout=120).stdout)
    assert after["Ray"] == "not running" and after["MLflow UI"] == "not running"
    nowhere = rayloop("monitor", "start", env=env, timeout=120)  # never a throwaway local Ray for it
    assert nowhere.returncode == 2 and "no Ray cluster runs here" in nowhere.stderr


def test_up_stops_at_once_when_a_service_exits_and_leaves_nothing_running(tmp_path):
    env = first_start_env(tmp_path)
    # MLflow's server exits at start: its database cannot be created there.
    up = rayloop("up", env={**env, "RAYLOOP_MLFLOW_URI": "sqlite:////proc/rayloop-nowhere/mlflow.db"}, timeout=300)
    assert up.returncode == 1, up.stdout[-2000:]
    assert "rayloop up: error: mlflow exited before it was ready (exit code 1)" in up.stderr
    assert "No such file or directory: '/proc/rayloop-nowhere'" in up.stderr  # the last lines of its log
    assert "stopped what this start had started (ray, mlflow)" in up.stderr
    assert "training" not in up.stdout
    assert not list((tmp_path / "data" / "run").glob("*.pid")), "a service of the failed start is still tracked"
    with socket.socket() as probe:  # the head's GCS is gone
        assert probe.connect_ex(("127.0.0.1", int(env["RAYLOOP_SERVICES_RAY_PORT"]))) != 0
    after = rows(rayloop("status", env=env, timeout=120).stdout)
    assert after["Ray"] == "not running" and after["MLflow UI"] == "not running"


def test_up_refuses_ports_another_program_holds_before_starting_anything(tmp_path):
    with socket.socket() as holder:  # e.g. a notebook's ray.init() on the dashboard's port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = first_start_env(tmp_path, dashboard=taken)
        up = rayloop("up", env=env, timeout=120)
    assert up.returncode == 2
    assert f"another program listens on port {taken} (the Ray dashboard: " \
           "RAYLOOP_SERVICES_DASHBOARD_PORT)" in up.stderr and "Nothing was started" in up.stderr
    assert not (tmp_path / "data" / "logs").exists() and not (tmp_path / "home" / ".ray").exists()


def test_train_starts_its_own_ray_on_a_first_start(tmp_path):
    env = first_start_env(tmp_path)
    done = rayloop("train", "--epochs", "1", "--json", env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "created Ray's auth token" in done.stdout
    assert json.loads(done.stdout[done.stdout.rindex("\n{"):])["model_version"] == "1"
