"""Rolling model updates with several replicas, and rollback through the API: no request fails."""

import httpx
import pytest

from tests.support.load import Load
from tests.support.registry import register_tiny_model
from tests.support.serving import replicas_and_versions, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """Serve with 2 Classifier replicas over a registry holding v1 (champion)."""
    with serving(tmp_path_factory.mktemp("rollout") / "data", replicas=2, replica_cpus=0.25) as served:
        yield served.settings, served.url, served.champion


def test_promotion_rolls_over_every_replica_in_place_without_failures(two_replicas):
    from control.rollout import roll_out
    from store import Store
    from train import registry

    settings, url, first = two_replicas
    replicas_before, versions = replicas_and_versions(url)
    assert len(replicas_before) == 2 and versions == {first}
    second = register_tiny_model(settings, accuracy="0.3")
    store = Store.from_settings(settings)
    try:
        with Load(url, linger_s=1.0) as load:
            registry.promote(settings, second)
            assert roll_out(settings, second, lambda event, details: store.audit("test", event, details))
    finally:
        store.close()

    statuses = load.statuses()
    assert len(statuses) > 20 and set(statuses) == {200}, load.failed()[:3]
    assert load.answers[-1].served == second
    replicas_after, versions = replicas_and_versions(url)
    assert versions == {second}
    assert replicas_after == replicas_before  # reconfigured in place: no replica restarted


def test_rollback_through_the_api_puts_the_previous_champion_back(two_replicas):
    from control.deployment import wait_version
    from train import registry

    settings, url, first = two_replicas
    current = registry.alias_version(settings, registry.CHAMPION)
    assert current != first
    with Load(url, linger_s=1.0) as load:
        with httpx.Client(base_url=url, timeout=120) as client:
            answer = client.post("/v1/admin/rollback")
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"previous": current, "champion": first, "status": "rolled out"}
            assert wait_version(first, 120)
            audit = client.get("/v1/audit", params={"event": "rollback"}).json()["items"]
    assert audit and audit[0]["details"] == {"from": current, "to": first}
    assert set(load.statuses()) == {200}
    assert registry.alias_version(settings, registry.PREVIOUS) == current
    _, versions = replicas_and_versions(url)
    assert versions == {first}
