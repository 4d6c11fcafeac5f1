"""The closed loop on a real local cluster: drift -> Ray Job (Tune) -> gate -> rolling update, no request lost."""

import pytest

from simulation.scenario import run_scenario
from store import Store
from tests.support.system import system_up
from train.data import load_prepared

pytestmark = pytest.mark.slow
# The staged rollout at test speed, as tests/test_canary_serve.py drives it: 6 s of shadow, one canary step of
# 0.5 for 6 s (the defaults dwell 20 + 20 + 20 s). Its audit events are the same.
FAST_STAGES = {"RAYLOOP_ROLLOUT_SHADOW_S": "6", "RAYLOOP_ROLLOUT_DWELL_S": "6", "RAYLOOP_ROLLOUT_SHADOW_SHARE": "1.0",
               "RAYLOOP_ROLLOUT_CANARY_STEPS": "0.5", "RAYLOOP_ROLLOUT_MIN_SCORED": "10"}


def test_shifted_traffic_is_detected_retrained_gated_and_rolled_out(tmp_path, monkeypatch):
    # The embedded defaults but shorter: the first champion gets 5 epochs, not 12 (0.97+ val accuracy by epoch
    # 5-7, bench/RESULTS.md), Tune 2 trials instead of 4, the monitor looks every 5 s, and the rollout's stages
    # are short (FAST_STAGES). bench/loop.py measures the loop at the defaults.
    with system_up(tmp_path / "data", monkeypatch, RAYLOOP_TRAIN_EPOCHS="5", RAYLOOP_TUNE_NUM_SAMPLES="2",
                   RAYLOOP_MONITOR_INTERVAL_S="5", **FAST_STAGES) as system:
        store = Store.from_settings(system.settings)
        try:
            result = run_scenario(system.url, store, load_prepared(system.settings.prepared_dir), shift="rotate",
                                  severity=90)
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
