"""Background services `rayloop up` starts (MLflow UI, ...) and `rayloop down` stops, tracked by pid files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from cluster.settings import Settings


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.pid_dir / f"{name}.pid"


def running_pid(settings: Settings, name: str) -> int | None:
    """Pid of a service we started that is still alive, else None."""
    path = _pid_file(settings, name)
    if not path.is_file():
        return None
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (ValueError, ProcessLookupError, PermissionError):
        path.unlink(missing_ok=True)
        return None


def wait_http(url: str, timeout: float) -> bool:
    """Poll url until it answers 2xx/3xx or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 400:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def wait_until(ready: Callable[[], bool], timeout: float) -> bool:
    """Poll ready() until it is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return True
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    return False


def start(settings: Settings, name: str, command: list[str], health_url: str = "",
          ready: Callable[[], bool] | None = None, timeout: float = 60, env: dict | None = None) -> int:
    """Start a detached service (logs under <data_dir>/logs) unless already running; wait until healthy."""
    pid = running_pid(settings, name)
    if pid is None:
        settings.pid_dir.mkdir(parents=True, exist_ok=True)
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(settings.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)
        _pid_file(settings, name).write_text(str(process.pid))
        pid = process.pid
    healthy = wait_until(ready, timeout) if ready else wait_http(health_url, timeout)
    if not healthy:
        raise RuntimeError(f"{name} did not become ready within {timeout:.0f}s; "
                           f"see {settings.log_dir / (name + '.log')}")
    return pid


def stop(settings: Settings, name: str, timeout: float = 15) -> bool:
    """Stop a service we started (its whole process group); True if one was running."""
    pid = running_pid(settings, name)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _pid_file(settings, name).unlink(missing_ok=True)
    return True


def mlflow_ui_command(settings: Settings, port: int) -> list[str]:
    """MLflow tracking server + UI over the same backend store the code writes to."""
    artifacts = (settings.data_dir / "mlartifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.mlflow_uri,
            "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
