"""The closed loop on a real local cluster: drift -> Ray Job (Tune) -> gate -> rolling update, no request lost."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.ray_cluster import free_port
from cluster.settings import load_settings
from simulation.scenario import run_scenario
from store import Store
from tests.support.paths import REPO
from train.data import load_prepared

pytestmark = pytest.mark.slow
RAYLOOP = str(Path(sys.executable).parent / "rayloop")



def test_shifted_traffic_is_detected_retrained_gated_and_rolled_out(tmp_path, monkeypatch):
    ports = {"RAYLOOP_SERVICES_SERVE_PORT": free_port(), "RAYLOOP_SERVICES_MLFLOW_PORT": free_port(),
             "RAYLOOP_SERVICES_DASHBOARD_PORT": free_port(), "RAYLOOP_SERVICES_RAY_PORT": free_port(),
             "RAYLOOP_SERVICES_UI_PORT": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
    env.update({k: str(v) for k, v in ports.items()}, RAYLOOP_DATA_DIR=str(tmp_path / "data"),
               RAY_USAGE_STATS_ENABLED="0",
               # The embedded defaults but shorter: the first champion gets 5 epochs, not 12 (0.97+ val
               # accuracy by epoch 5-7, bench/RESULTS.md), Tune 2 trials instead of 4, and the monitor looks
               # every 5 s. bench/loop.py measures the loop at the defaults.
               RAYLOOP_TRAIN_EPOCHS="5", RAYLOOP_TUNE_NUM_SAMPLES="2", RAYLOOP_MONITOR_INTERVAL_S="5")
    for key, value in env.items():
        if key.startswith("RAYLOOP_"):
            monkeypatch.setenv(key, value)
    settings = load_settings()
    url = f"http://127.0.0.1:{ports['RAYLOOP_SERVICES_SERVE_PORT']}"
    up = subprocess.run([RAYLOOP, "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    store = Store.from_settings(settings)
    try:
        result = run_scenario(url, store, load_prepared(settings.prepared_dir), shift="rotate", severity=90)
        print(result.as_dict())

        assert result.to_drift is not None, "drift was never reported"
        assert result.to_retrain_start is not None and result.to_retrain_start < result.to_promotion
        assert result.champion_after != result.champion_before
        assert result.gate["passed"] is True
        # Rotated digits are a plain failure of the champion: one focused trial, not the search (tune/plan.py).
        [started] = store.list_audit(limit=1, event_name="retrain_started")
        assert started.details["search"]["clear"] is True and started.details["search"]["trials"] == 1
        assert result.accuracy_after - result.accuracy_before >= 0.3
        assert result.clean_accuracy_after >= 0.9
        assert result.background_sent > 100 and result.background_failed == 0, result.errors[:5]
        for event in ("drift_check", "retrain_triggered", "retrain_started", "trials_finished", "gate_decision",
                      "promoted", "rollout_started", "rollout_finished", "retrain_finished"):
            assert store.list_audit(limit=1, event_name=event), f"no {event} in the audit trail"
    finally:
        store.close()
        subprocess.run([RAYLOOP, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
