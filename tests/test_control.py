"""The loop's actions, written once in control/, behave the same from the CLI, the admin routes and the monitor.

In-process: a real store and a real MLflow registry (SQLite); Ray's job service and Serve's deploy call are the
only stand-ins (tests/support/jobs.py, and a deploy that fails or records), as real Ray shows nothing more here:
tests/reliability/test_retrain_failures.py and tests/test_rollout.py run these actions on real Ray and Serve.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from cluster.settings import load_settings
from control import deployment, retrain, rollout
from rayloop import cli
from serve.http import create_app
from store import Event, Store
from tests.support.fake_backend import BrightnessBackend
from tests.support.jobs import FakeJobs, Job
from train import registry


@pytest.fixture
def jobs(monkeypatch) -> FakeJobs:
    """Ray's job service, as control.retrain sees it."""
    fake = FakeJobs()
    monkeypatch.setattr(retrain, "job_client", lambda _settings: fake)
    return fake


@pytest.fixture
def store(data_dir):
    store = Store.from_settings(load_settings())
    yield store
    store.close()


def events(store: Store, name: Event) -> list:
    return store.list_audit(limit=100, event_name=name)


def test_a_cli_retrain_is_recorded_so_the_monitor_counts_labels_and_cooldown_from_it(store, jobs, capsys):
    assert cli.main(["retrain", "--trigger", "manual", "--actor", "ops"]) == 0

    [submitted] = jobs.list_jobs()
    assert submitted.metadata == {"kind": retrain.JOB_KIND, "trigger": "manual", "actor": "ops"}
    assert "-m rayloop.job" in submitted.entrypoint
    [triggered] = events(store, Event.RETRAIN_TRIGGERED)
    assert triggered.actor == "ops" and triggered.details == {"trigger": "manual", "job": submitted.submission_id}
    assert f"submitted Ray Job {submitted.submission_id}" in capsys.readouterr().out


def test_an_inline_retrain_is_refused_while_a_retrain_job_runs(store, jobs, monkeypatch, capsys):
    jobs.jobs["retrain-drift-1"] = Job("retrain-drift-1", "RUNNING", {"kind": retrain.JOB_KIND})
    ran = []
    monkeypatch.setattr("tune.job.run_job", lambda *args, **kwargs: ran.append(args))

    assert cli.main(["retrain", "--inline"]) == 3

    assert ran == [] and not events(store, Event.RETRAIN_TRIGGERED)
    assert "retrain job retrain-drift-1 is still running; not starting another" in capsys.readouterr().err


def test_no_retrain_job_starts_while_an_inline_retrain_holds_the_lease(store, jobs):
    with retrain.holding(store, "cli (pid 1 on laptop)"):
        with pytest.raises(retrain.RetrainBusy, match=r"a retrain is running \(cli \(pid 1 on laptop\)\)"):
            retrain.request(load_settings(), store, "drift", "drift-monitor")
        assert cli.main(["retrain"]) == 3
    assert jobs.list_jobs() == []
    assert store.lease_holder(retrain.LEASE) is None  # released when the inline run ended

    retrain.request(load_settings(), store, "drift", "drift-monitor")
    assert len(jobs.list_jobs()) == 1


def test_a_job_that_died_holding_the_lease_is_audited_and_frees_it(store, jobs):
    dead = "retrain-drift-7"
    assert store.acquire_lease(retrain.LEASE, retrain.job_holder(dead), ttl_s=600) is None
    jobs.jobs[dead] = Job(dead, "FAILED", {"kind": retrain.JOB_KIND, "trigger": "drift"}, "Job entrypoint failed")

    submission = retrain.request(load_settings(), store, "feedback", "drift-monitor")

    [interrupted] = events(store, Event.RETRAIN_INTERRUPTED)
    assert interrupted.details["ray_job"] == dead and interrupted.details["status"] == "FAILED"
    assert submission in jobs.jobs and store.lease_holder(retrain.LEASE) is None


@pytest.fixture
def two_champions(data_dir):
    """A registry with a champion (v2) and the one it replaced (v1, alias `previous`)."""
    from tests.support.registry import register_tiny_model

    settings = load_settings()
    first = register_tiny_model(settings, accuracy="0.4")
    second = register_tiny_model(settings, accuracy="0.5")
    registry.promote(settings, second)
    return settings, first, second


def admin_app(settings):
    store = Store.from_settings(settings)
    return TestClient(create_app(BrightnessBackend(settings.serve), store, settings)), store


def test_an_admin_rollback_answers_after_the_rollout_and_audits_its_failure(two_champions, monkeypatch):
    settings, first, second = two_champions
    monkeypatch.setattr(rollout, "connect", lambda _settings: "existing")
    monkeypatch.setattr(deployment, "is_deployed", lambda: True)

    def replicas_never_come_up(_settings, model_version=None, timeout=300.0):
        raise RuntimeError(f"Serve did not move every replica to v{model_version} within 300s")

    monkeypatch.setattr(deployment, "deploy", replicas_never_come_up)
    client, store = admin_app(settings)
    try:
        answer = client.post("/v1/admin/rollback")
        assert answer.status_code == 503, answer.text
        assert f"rolling Serve over to v{first} failed" in answer.json()["detail"]
        [failed] = events(store, Event.ROLLOUT_FAILED)
        assert failed.details["version"] == first and "did not move every replica" in failed.details["error"]
        assert [e.details for e in events(store, Event.ROLLBACK)] == [{"from": second, "to": first}]
    finally:
        store.close()


def test_an_admin_rollback_is_rolled_out_before_it_answers(two_champions, monkeypatch):
    settings, first, second = two_champions
    deployed = []
    monkeypatch.setattr(rollout, "connect", lambda _settings: "existing")
    monkeypatch.setattr(deployment, "is_deployed", lambda: True)
    monkeypatch.setattr(deployment, "deploy", lambda _settings, model_version=None, timeout=300.0:
                        deployed.append(model_version))
    client, store = admin_app(settings)
    try:
        answer = client.post("/v1/admin/rollback")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"previous": second, "champion": first, "status": "rolled out"}
        assert deployed == [first]
        assert [e.event for e in store.list_audit(limit=3)] == ["rollout_finished", "rollout_started", "rollback"]
        assert registry.alias_version(settings, registry.PREVIOUS) == second

        again = client.post("/v1/admin/rollback")  # back to v2: a rollback is its own undo
        assert again.json()["champion"] == second and deployed == [first, second]
    finally:
        store.close()


def test_an_admin_retrain_goes_through_the_same_guard_and_record(data_dir, jobs):
    settings = load_settings()
    client, store = admin_app(settings)
    try:
        started = client.post("/v1/admin/retrain")
        assert started.status_code == 202, started.text
        busy = client.post("/v1/admin/retrain")
        assert busy.status_code == 409 and "is still running" in busy.json()["detail"]
        [triggered] = events(store, Event.RETRAIN_TRIGGERED)
        assert triggered.details["job"] == started.json()["job_id"] and triggered.actor == "anonymous"
    finally:
        store.close()


def test_a_discarded_challenger_loses_its_version_and_model_files_and_keeps_its_run(data_dir):
    from pathlib import Path
    from urllib.parse import urlparse

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tests.support.registry import register_tiny_model

    settings = load_settings()
    champion = register_tiny_model(settings, accuracy="0.4")
    challenger = register_tiny_model(settings, accuracy="0.5")
    client, name = MlflowClient(), settings.registry.model_name
    run_id = client.get_model_version(name, challenger).run_id

    location = registry.discard(settings, challenger)

    files = Path(urlparse(location).path)
    assert files.is_relative_to(data_dir) and not files.exists()  # the model's files are gone
    with pytest.raises(MlflowException):
        client.get_model_version(name, challenger)
    assert client.get_run(run_id).info.lifecycle_stage == "active"  # its run, metrics and tags stay
    assert registry.alias_version(settings, registry.CHAMPION) == champion
    kept = client.get_logged_model(client.get_model_version(name, champion).source.removeprefix("models:/"))
    assert (Path(urlparse(kept.artifact_location).path) / "MLmodel").is_file()
