"""Connecting to Ray: an existing cluster, the local head `rayloop up` started, or a fresh local one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import ray

from cluster.settings import Settings

def connect(settings: Settings, *, quiet: bool = True) -> str:
    """ray.init against RAYLOOP_RAY_ADDRESS, else a running local head, else a new local instance."""
    if ray.is_initialized():
        return "existing"
    common = {"logging_level": "WARNING", "log_to_driver": True, "configure_logging": quiet}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **common)
        return settings.ray_address
    try:
        ray.init(address="auto", **common)
        return "local head"
    except (ConnectionError, RuntimeError):
        pass
    # The dashboard also serves Ray's State API, which Ray Train's controller polls.
    ray.init(**common)
    return "in-process"


def start_head(settings: Settings) -> None:
    """Start a local Ray head (dashboard on 8265) that outlives this process."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    command = [ray_bin, "start", "--head", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={settings.services.dashboard_port}", "--disable-usage-stats"]
    subprocess.run(command, check=True)


def head_running() -> bool:
    """True when `ray status` reaches a cluster on this machine."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    return subprocess.run([ray_bin, "status"], capture_output=True).returncode == 0


def stop_head() -> None:
    """Stop every Ray process this machine's user started (`ray stop`)."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    subprocess.run([ray_bin, "stop"], check=False)
