"""`rayloop up` / `status` / `down`: a real local Ray head and MLflow UI, a champion, the URLs."""

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow
RAYLOOP = str(Path(sys.executable).parent / "rayloop")



def rayloop(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([RAYLOOP, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


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


def test_up_trains_a_champion_prints_urls_and_down_stops_everything(tmp_path):
    mlflow_port, dashboard_port, serve_port = free_port(), free_port(), free_port()
    ui_port, prometheus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
    env.update(RAYLOOP_DATA_DIR=str(tmp_path / "data"), RAYLOOP_DATA_LIMIT="800", RAYLOOP_TRAIN_EPOCHS="3",
               RAYLOOP_TRAIN_NUM_WORKERS="1", RAYLOOP_SERVICES_MLFLOW_PORT=str(mlflow_port),
               RAYLOOP_SERVICES_DASHBOARD_PORT=str(dashboard_port), RAYLOOP_SERVICES_RAY_PORT=str(free_port()),
               RAYLOOP_SERVICES_SERVE_PORT=str(serve_port), RAYLOOP_SERVICES_UI_PORT=str(ui_port),
               RAYLOOP_SERVICES_PROMETHEUS_PORT=str(prometheus_port),
               RAYLOOP_SERVICES_METRICS_EXPORT_PORT=str(free_port()), RAY_USAGE_STATS_ENABLED="0")
    try:
        up = rayloop("up", env=env)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"http://127.0.0.1:{mlflow_port}" in up.stdout
        assert f"http://127.0.0.1:{dashboard_port}" in up.stdout
        assert "champion: rayloop-classifier v1" in up.stdout

        assert f"http://127.0.0.1:{serve_port}/docs" in up.stdout and "drift monitor running" in up.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/healthz", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=10) as response:
            assert response.status == 200
        assert f"http://127.0.0.1:{ui_port}" in up.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/config", timeout=10) as response:
            assert response.status == 200 and b"Predict" in response.read()
        # Ray 2.60 guards its dashboard with a token by default; `ray get-auth-token` prints it.
        token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], env=env,
                               capture_output=True, text=True, timeout=60).stdout.strip()
        request = urllib.request.Request(f"http://127.0.0.1:{dashboard_port}/api/version",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

        status = rayloop("status", env=env, timeout=120)
        assert status.returncode == 0
        assert "Ray:       running" in status.stdout and "Champion:  rayloop-classifier v1" in status.stdout
        assert "serving    rayloop-classifier v1" in status.stdout

        # Idempotent: no second training, same champion; `--monitoring` (make monitoring) adds Prometheus.
        again = rayloop("up", "--monitoring", env=env)
        assert again.returncode == 0 and "training one" not in again.stdout, again.stderr[-2000:]
        assert "champion: rayloop-classifier v1" in again.stdout
        assert f"Prometheus is up at http://127.0.0.1:{prometheus_port}" in again.stdout
        assert ray_target_up(prometheus_port), "Prometheus never scraped the head's metrics"
    finally:
        down = rayloop("down", env=env, timeout=180)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "MLflow UI stopped" in down.stdout and "Serve stopped" in down.stdout
    assert "Gradio demo stopped" in down.stdout and "Prometheus stopped" in down.stdout
    after = rayloop("status", env=env, timeout=120)
    assert "Ray:       not running" in after.stdout and "MLflow UI: not running" in after.stdout
