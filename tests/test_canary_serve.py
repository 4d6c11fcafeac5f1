"""Staged rollouts on real Serve (two replicas, load running): a challenger that holds up goes shadow -> canary
-> champion, one that is worse on live feedback is rolled back by itself; no request fails either way."""

from __future__ import annotations

import random
import threading

import httpx
import pytest

from tests.support.images import png
from tests.support.load import Load
from tests.support.registry import register_tiny_model
from tests.support.serving import replicas_and_versions, serving

pytestmark = pytest.mark.slow

FAST_STAGES = {"RAYLOOP_ROLLOUT_SHADOW_S": "6", "RAYLOOP_ROLLOUT_DWELL_S": "6", "RAYLOOP_ROLLOUT_SHADOW_SHARE": "1.0",
               "RAYLOOP_ROLLOUT_CANARY_STEPS": "0.5", "RAYLOOP_ROLLOUT_MIN_SCORED": "10",
               "RAYLOOP_ROLLOUT_POLL_S": "0.5"}


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("canary") / "data", replicas=2, replica_cpus=0.25, env=FAST_STAGES) as served:
        yield served


class Labelling(threading.Thread):
    """A user who labels every answer as the model that gave it said (varied images): the truth is whatever
    the model answering outside a canary says, i.e. the champion is always right."""

    def __init__(self, url: str, champion: str):
        super().__init__(daemon=True)
        self.url, self.champion, self.stop, self.statuses = url, champion, threading.Event(), []

    def run(self) -> None:
        shades = random.Random(0)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                r = client.post("/v1/predict", files={"file": ("x.png", png(shades.randrange(256)), "image/png")})
                self.statuses.append(r.status_code)
                if r.status_code == 200 and r.json()["model_version"] == self.champion:
                    f = client.post("/v1/feedback", json={"prediction_id": r.json()["prediction_id"],
                                                          "label": r.json()["label"]})
                    self.statuses.append(f.status_code)


def staged(served, champion: str, challenger: str) -> bool:
    from control.rollout import roll_out
    from store import Store
    from store.rollouts import Rollouts
    from train import registry
    from tune.canary import run_stages

    store = Store.from_settings(served.settings)

    def audit(event: str, details: dict) -> None:
        store.audit("test", event, details)

    def promote() -> None:
        registry.promote(served.settings, challenger)
        roll_out(served.settings, challenger, audit)

    try:
        return run_stages(served.settings, Rollouts(store.engine), champion, challenger, audit, promote)
    finally:
        store.close()


def test_a_challenger_that_holds_up_reaches_every_request_without_a_failure(two_replicas):
    served = two_replicas
    replicas_before, versions = replicas_and_versions(served.url)
    assert versions == {served.champion}
    twin = register_tiny_model(served.settings, accuracy="0.1")  # the champion's weights: it agrees everywhere
    with Load(served.url, linger_s=1.0) as load:
        assert staged(served, served.champion, twin)

    assert len(load.answers) > 30 and set(load.statuses()) == {200}, load.failed()[:3]
    answered = [a.served for a in load.answers]
    first_canary = answered.index(twin)
    assert served.champion in answered[first_canary:]  # a canary step: both answered for a while...
    assert load.answers[-1].served == twin  # ...then the challenger alone
    with served.client() as client:
        rollout = client.get("/v1/rollout").json()["rollout"]
    assert rollout["stage"] == "promoted" and rollout["steps"] == [0.0, 0.5] and not rollout["live"]
    assert rollout["figures"]["all"]["scored"] > 0 and rollout["figures"]["all"]["agreement"] == 1.0
    replicas_after, versions = replicas_and_versions(served.url)
    assert versions == {twin} and replicas_after == replicas_before  # in place: no replica restarted


def test_a_challenger_worse_on_live_feedback_is_rolled_back_by_itself(two_replicas):
    from train import registry

    served = two_replicas
    champion = registry.alias_version(served.settings, registry.CHAMPION)
    worse = register_tiny_model(served.settings, accuracy="0.7")  # other weights: it disagrees on many shades
    user = Labelling(served.url, champion)
    user.start()
    try:
        with Load(served.url, linger_s=1.0) as load:
            assert not staged(served, champion, worse)
    finally:
        user.stop.set()
        user.join(timeout=120)

    assert set(load.statuses()) == {200} and set(user.statuses) <= {200, 201}, load.failed()[:3]
    with served.client() as client:
        rollout = client.get("/v1/rollout").json()["rollout"]
        events = client.get("/v1/audit", params={"event": "rollout_rolled_back"}).json()["items"]
    assert rollout["stage"] == "rolled_back" and "worse than the champion on live feedback" in rollout["reason"]
    assert events[0]["details"]["version"] == worse
    assert registry.alias_version(served.settings, registry.CHAMPION) == champion
    _, versions = replicas_and_versions(served.url)
    assert versions == {champion}
