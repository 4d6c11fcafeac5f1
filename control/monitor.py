"""Reaching the running drift monitor (a detached Ray actor) from the API: its name, and a report on request.

The monitor itself lives in monitoring/ (which the serving replicas never import): callers talk to the
actor by name, so asking for Evidently's report costs the API no import of Evidently.
"""

from __future__ import annotations

import asyncio

ACTOR_NAME = "rayloop-drift-monitor"
NAMESPACE = "rayloop"
REPORT_TIMEOUT_S = 120.0  # Evidently's report of a 200-row window takes 1-2 s of CPU; a busy box, longer


class MonitorUnavailable(Exception):
    """No drift monitor answers (not started, restarting, or too slow)."""


def actor():
    """The monitor actor's handle; MonitorUnavailable when none runs (or Ray is not connected)."""
    import ray

    if not ray.is_initialized():
        raise MonitorUnavailable("the drift monitor runs in Ray, and this process is not connected to Ray")
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        raise MonitorUnavailable("the drift monitor is not running (`rayloop up` starts it)") from None


async def report(timeout: float = REPORT_TIMEOUT_S) -> dict:
    """Ask the monitor to check the latest window now and save Evidently's report (HTML + JSON).

    The answer: {"status": ..., "report": DriftReport as a dict or None, "model_version": ...}. A window
    the monitor already reported on is not computed again.
    """
    import ray

    handle = actor()
    try:
        return await asyncio.wait_for(handle.report.remote(), timeout)
    except asyncio.TimeoutError:
        raise MonitorUnavailable(f"the drift monitor did not build the report within {timeout:g} s") from None
    except ray.exceptions.RayActorError as exc:
        raise MonitorUnavailable(f"the drift monitor is restarting ({type(exc).__name__}); try again") from None
