"""Retrains that go wrong: crashed trials, a killed job, a worse challenger.

Each time the champion keeps serving, no alias moves half-way, the audit trail says what happened,
and the next trigger runs. Trials crash through the fault-injection knob RAYLOOP_TUNE_FAIL_TRIALS
(tune/retrain.py); the job is killed with SIGKILL, like an OOM kill.
"""

from __future__ import annotations

import copy
import os
import signal
import time

import httpx
import mlflow
import numpy as np
import psutil
import pytest
import torch

from cluster.ray_cluster import free_port
from tests.support.figures import FAULTS, record_figures
from tests.support.load import Load
from tests.support.paths import REPO

pytestmark = pytest.mark.slow


def train_champion(settings, data) -> str:
    """A small CNN trained for a few seconds in plain torch and registered as champion: clearly better than chance."""
    from train import registry
    from train.pipeline import finalize, reference_batches
    from train.train import build_model
    from train.transforms import to_tensor

    torch.manual_seed(0)
    model = build_model(settings, data)
    x, y = data.split("train")
    images, labels = to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(6):
        for i in range(0, len(images), 32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[i:i + 32]), labels[i:i + 32]).backward()
            optimizer.step()
    model.eval()
    reference = finalize(model, reference_batches(settings, data))
    registry.configure(settings)
    with mlflow.start_run(run_name="reliability-champion"):
        return registry.log_and_register(settings, model, reference, {"data_version": data.meta.version}).version


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A local Ray head (as `rayloop up` starts it) with Serve on a trained champion, and fast, weak retrains:
    1 epoch from fresh weights at a tiny learning rate, so every challenger is worse than the champion."""
    import ray
    from ray import serve as rayserve

    from cluster import ray_cluster
    from cluster.settings import load_settings
    from control.deployment import deploy
    from train.data import prepared_or_new

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update({f"RAYLOOP_SERVICES_{name}_PORT": str(free_port()) for name in ("SERVE", "DASHBOARD", "RAY")})
    env.update(RAYLOOP_DATA_DIR=str(tmp_path_factory.mktemp("retrain-failures") / "data"),
               RAYLOOP_PARAMS=str(REPO / "params.yaml"), RAYLOOP_SERVICES_METRICS_EXPORT_PORT="0",
               RAYLOOP_DATA_LIMIT="500", RAYLOOP_TRAIN_NUM_WORKERS="1", RAYLOOP_SERVE_NUM_CPUS="0.25",
               RAYLOOP_TUNE_NUM_SAMPLES="1", RAYLOOP_TUNE_EPOCHS="1", RAYLOOP_TUNE_GRACE_EPOCHS="1",
               RAYLOOP_TUNE_FINE_TUNE="false", RAYLOOP_TUNE_LR_MIN="1e-7", RAYLOOP_TUNE_LR_MAX="2e-7",
               RAYLOOP_TUNE_BATCH_SIZES="64")
    settings = load_settings(env)
    champion = train_champion(settings, prepared_or_new(settings.data, settings.prepared_dir))
    ray_cluster.start_head(settings)
    try:
        ray_cluster.connect(settings)
        url = deploy(settings, timeout=300)
        yield settings, url, champion
    finally:
        try:
            rayserve.shutdown()
        finally:
            ray.shutdown()
            ray_cluster.stop_head(settings)


def aliases(settings) -> dict[str, str | None]:
    from train import registry

    return {a: registry.alias_version(settings, a)
            for a in (registry.CHAMPION, registry.CHALLENGER, registry.PREVIOUS)}


def versions(settings) -> set[str]:
    from mlflow.tracking import MlflowClient

    from train import registry

    registry.configure(settings)
    return {str(v.version) for v in MlflowClient().search_model_versions(f"name='{settings.registry.model_name}'")}


def audit_since(settings, started: float, event: str | None = None) -> list:
    """Audit events (oldest first) written after `started` (time.time())."""
    from store import Store

    store = Store.from_settings(settings)
    try:
        return [e for e in reversed(store.list_audit(limit=1000, event_name=event)) if e.at.timestamp() >= started]
    finally:
        store.close()


def assert_champion_served(load: Load, champion: str) -> None:
    answers = [(a.status, a.served) for a in load.answers]
    assert len(answers) > 5 and set(answers) == {(200, champion)}, [a for a in answers if a != (200, champion)][:3]


def test_a_retrain_whose_trials_all_crash_moves_nothing_and_is_audited(loop, monkeypatch):
    from tune.job import run_job

    settings, url, champion = loop
    before, known = aliases(settings), versions(settings)
    started = time.time()
    monkeypatch.setenv("RAYLOOP_TUNE_FAIL_TRIALS", "all")
    with Load(url, threads=1, linger_s=1.0) as load:
        with pytest.raises(RuntimeError, match="no trial"):
            run_job(settings, "manual", "reliability-test")

    assert aliases(settings) == before and before["champion"] == champion
    assert versions(settings) == known  # no challenger registered
    events = [e.event for e in audit_since(settings, started)]
    assert events == ["retrain_started", "retrain_failed"], events
    [failed] = audit_since(settings, started, "retrain_failed")
    assert "fault injected" in failed.details["error"]
    assert_champion_served(load, champion)


def test_a_crashed_trial_and_a_worse_challenger_leave_the_champion_in_place(loop, monkeypatch):
    from tune.job import run_job

    settings, url, champion = loop
    settings = copy.deepcopy(settings)
    settings.tune.num_samples = 2
    monkeypatch.setenv("RAYLOOP_TUNE_FAIL_TRIALS", "0")
    started = time.time()
    with Load(url, threads=1, linger_s=1.0) as load:
        result = run_job(settings, "manual", "reliability-test")

    assert [t["error"] is not None for t in result.trials].count(True) == 1, result.trials
    assert not result.promoted and result.gate.reason.startswith("worse on the base test split"), result.gate
    assert result.gate.challenger_test < result.gate.champion_test
    # The losing challenger keeps its run but not its registry version or model files (issue 15, retention).
    assert aliases(settings) == {"champion": champion, "challenger": None, "previous": None}
    assert result.challenger_version not in versions(settings)
    events = audit_since(settings, started)
    assert [e.event for e in events] == ["retrain_started", "trials_finished", "gate_decision", "retrain_finished"]
    assert events[1].details["failed"] == 1 and events[2].details["passed"] is False
    assert events[3].details["promoted"] is False
    assert_champion_served(load, champion)
    record_figures("retrain_crashed_trial_worse_challenger", {
        "trials": len(result.trials), "failed_trials": 1, "champion_test": result.gate.champion_test,
        "challenger_test": result.gate.challenger_test, "promoted": result.promoted,
        "seconds": round(result.seconds, 1)}, FAULTS)


def job_driver(settings, submission_id: str) -> psutil.Process | None:
    """The `python -m rayloop.job` process of a submission, among this test's own head's processes."""
    from cluster import services

    head = psutil.Process(services.running_pid(settings, "ray"))
    for process in head.children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "rayloop.job" in command and submission_id in command and "python" in command.split()[0]:
            return process
    return None


def training(settings) -> bool:
    """True while a Ray Train worker runs under this test's head."""
    from cluster import services

    for process in psutil.Process(services.running_pid(settings, "ray")).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def test_a_killed_retrain_job_promotes_nothing_is_audited_and_the_next_trigger_runs(loop):
    from control import retrain
    from store import Store

    settings, url, champion = loop
    before, known = aliases(settings), versions(settings)
    started = time.time()
    client = retrain.job_client(settings)
    store = Store.from_settings(settings)
    with Load(url, threads=1, linger_s=1.0) as load:
        killed = retrain.request(settings, store, "manual", "reliability-test")
        deadline = time.monotonic() + 300
        while not any(e.details.get("ray_job") == killed for e in audit_since(settings, started, "retrain_started")):
            assert time.monotonic() < deadline, client.get_job_logs(killed)[-3000:]
            time.sleep(1)
        while not training(settings):  # kill it mid-training, with a trial's worker running
            assert time.monotonic() < deadline, client.get_job_logs(killed)[-3000:]
            time.sleep(0.5)
        driver = job_driver(settings, killed)
        assert driver is not None
        driver.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert retrain.wait(settings, killed, timeout=120) == "FAILED"
        assert aliases(settings) == before and versions(settings) == known

        # The next request: the dead job's lease and audit are settled first, then it runs.
        following = retrain.request(settings, store, "manual", "reliability-test")
        status = retrain.wait(settings, following, timeout=600)
        next_s = time.monotonic() - killed_at
    store.close()
    assert status == "SUCCEEDED", client.get_job_logs(following)[-3000:]

    [interrupted] = [e for e in audit_since(settings, started, "retrain_interrupted") if e.details["ray_job"] == killed]
    assert interrupted.details["status"] == "FAILED"
    finished = [e for e in audit_since(settings, started, "retrain_finished") if e.details.get("ray_job") == following]
    assert finished and finished[0].details["promoted"] is False
    [gate] = [e for e in audit_since(settings, started, "gate_decision") if e.details.get("ray_job") == following]
    assert aliases(settings)["champion"] == champion and aliases(settings)["challenger"] is None
    assert gate.details["challenger_version"] not in versions(settings)  # the loser was discarded
    assert_champion_served(load, champion)
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/healthz").json()["model_version"] == champion
    record_figures("retrain_job_killed", {"killed_job": killed, "next_job": following,
                                          "kill_to_next_job_done_s": round(next_s, 1), "audit": interrupted.details},
                   FAULTS)
