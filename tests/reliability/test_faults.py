"""Replica death under load: Serve replaces a SIGKILLed Classifier or Ingress replica by itself.

Measured figures (failed share, recovery seconds) are printed and kept in bench/reliability_faults.json.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.faults import MAX_FAILED_SHARE, kill_under_load, replica_pids, running_replicas
from tests.support.figures import FAULTS, record_figures
from tests.support.serving import replicas_and_versions, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_classifiers(tmp_path_factory):
    """Serve (topology split): 2 Classifier replicas and 1 Ingress on a local Ray, over a tiny registered champion."""
    # Ingress -> Classifier through a handle: the kills below hit each side on its own. The default
    # (fused) topology's replica kill is test_restart's, behind HAProxy as `rayloop up` runs it.
    with serving(tmp_path_factory.mktemp("faults") / "data", replicas=2, replica_cpus=0.25,
                 topology="split") as served:
        yield served.settings, served.url


def scale_ingress(settings, replicas: int, timeout: float = 180) -> None:
    """Apply the app's Serve config with `replicas` Ingress replicas and wait until they all run."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from control.deployment import serve_config

    config = serve_config(settings)
    config["applications"][0]["deployments"] = [{"name": "Ingress", "num_replicas": replicas}]
    serve_start(http_options=config["http_options"]).deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_replicas("Ingress") == replicas and len(replica_pids("Ingress")) == replicas:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ingress did not reach {replicas} running replicas")


def test_a_killed_classifier_replica_is_replaced_and_almost_no_request_fails(two_classifiers):
    settings, url = two_classifiers
    served_by, _ = replicas_and_versions(url)
    assert len(served_by) == 2

    figures = kill_under_load(url, "Classifier", replicas=2)
    record_figures("classifier_replica_killed", figures, FAULTS)

    assert figures["failed_share"] <= MAX_FAILED_SHARE, figures
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
    served_after, _ = replicas_and_versions(url)
    assert len(served_after) == 2 and served_after != served_by  # a new replica took the dead one's place
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200


def test_a_killed_sole_ingress_replica_comes_back_by_itself(two_classifiers):
    settings, url = two_classifiers
    figures = kill_under_load(url, "Ingress", replicas=1)
    record_figures("ingress_replica_killed_1_of_1", figures, FAULTS)

    # One ingress replica: requests it held die with it, the rest wait for the new one (latency).
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
    assert figures["recovery_s"] < 120, figures


def test_with_two_ingress_replicas_a_killed_one_costs_almost_no_request(two_classifiers):
    settings, url = two_classifiers
    scale_ingress(settings, 2)

    figures = kill_under_load(url, "Ingress", replicas=2)
    record_figures("ingress_replica_killed_1_of_2", figures, FAULTS)

    assert figures["failed_share"] <= MAX_FAILED_SHARE, figures
    assert figures["requests_after_recovery"] > 0 and figures["failed_after_recovery"] == 0, figures
