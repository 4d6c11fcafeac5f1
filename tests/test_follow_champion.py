"""Replicas that follow the registry's champion (serve.follow_champion_s): the retrain ran on another cluster.

In-process: a real MLflow registry (SQLite) and the real ModelServer; no Serve is needed to show which model
a replica holds. Its swap is the same in-place assignment reconfigure makes (tests/test_rollout.py on Serve).
"""

from __future__ import annotations

import asyncio
import threading
import time

from cluster.settings import load_settings
from serve.classifier import ModelServer
from tests.support.registry import register_tiny_model
from train import registry


def until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_replicas_follow_the_champion_unless_pinned_to_another_version(data_dir, monkeypatch):
    monkeypatch.setenv("RAYLOOP_SERVE_FOLLOW_CHAMPION_S", "0.2")
    settings = load_settings()
    first = register_tiny_model(settings, accuracy="0.4")  # the champion
    follower, pinned = ModelServer(settings), ModelServer(settings)
    try:
        second = register_tiny_model(settings, accuracy="0.5")  # registered, not promoted
        asyncio.run(pinned.reconfigure({"model_version": second}))  # pinned by hand to a non-champion
        asyncio.run(follower.reconfigure({"model_version": first}))  # as a rollout pins the champion's number
        assert (follower.loaded.version, pinned.loaded.version) == (first, second)

        third = register_tiny_model(settings, accuracy="0.6")
        registry.promote(settings, third)  # by a retrain on another cluster

        assert until(lambda: follower.loaded.version == third), "the follower never loaded the new champion"
        time.sleep(1.0)  # five of the follower's intervals: the pinned replica had as many chances to move
        assert pinned.loaded.version == second
    finally:
        follower.__del__()
        pinned.__del__()


def test_following_is_off_by_default(data_dir):
    settings = load_settings()
    assert settings.serve.follow_champion_s == 0  # a retrain's rollout moves the replicas `rayloop up` starts
    register_tiny_model(settings, accuracy="0.4")
    before = set(threading.enumerate())
    server = ModelServer(settings)
    try:
        assert not [t for t in set(threading.enumerate()) - before if t.name == "follow-champion"]
    finally:
        server.__del__()
