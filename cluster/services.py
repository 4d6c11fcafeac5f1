"""Background services `rayloop up` starts (MLflow UI, ...) and `rayloop down` stops, tracked by pid files."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def http_ok(url: str) -> bool:
    """url answers 2xx/3xx now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 400
    except (urllib.error.URLError, OSError):
        return False


def port_taken(port: int) -> bool:
    """Something listens on `port`, on any interface (as a server that sets SO_REUSEADDR would find)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
            return False
        except OSError:
            return True


def wait_until(ready: Callable[[], bool], timeout: float) -> bool:
    """Poll ready() until it is true or the timeout passes."""
    return wait_ready(ready, lambda: False, timeout) == "ready"


class ServiceFailed(RuntimeError):
    """A service exited, or never became ready, while `rayloop up` waited for it."""

    def __init__(self, name: str, reason: str, log: Path, tail: str):
        self.name, self.log, self.tail = name, log, tail
        lines = f"\nlast lines of {log}:\n{tail}" if tail else f"\n{log} is empty"
        super().__init__(f"{name} {reason}{lines}")


def log_tail(path: Path, since: int = 0, lines: int = 20) -> str:
    """The last `lines` lines written to a log after byte offset `since` (logs are appended to)."""
    try:
        with open(path, "rb") as log:
            log.seek(since)
            text = log.read()[-64_000:].decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rstrip() for line in text.splitlines()[-lines:])


def start(settings: Settings, name: str, command: list[str], health_url: str = "",
          ready: Callable[[], bool] | None = None, timeout: float = 60, env: dict | None = None,
          started_line: str = "") -> int:
    """Start a detached service (logs under <data_dir>/logs) unless already running; wait until healthy.

    Raises ServiceFailed as soon as the process exits (a head without an auth token dies in 3 s: waiting
    out the whole timeout told the user nothing), or when it is not ready in time; it is stopped then.
    `started_line`: the service is ready only once its log says so too (a health URL can be answered by
    another program holding the port).
    """
    pid = running_pid(settings, name)
    log_path = settings.log_dir / f"{name}.log"
    offset = 0
    process = None
    if pid is None:
        settings.pid_dir.mkdir(parents=True, exist_ok=True)
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env=env)
        _pid_file(settings, name).write_text(str(process.pid))
        pid = process.pid
    healthy = ready or (lambda: http_ok(health_url))
    probe = (lambda: started_line in log_tail(log_path, offset, lines=10_000) and healthy()) if started_line \
        else healthy
    exited = (lambda: process.poll() is not None) if process else (lambda: running_pid(settings, name) is None)
    outcome = wait_ready(probe, exited, timeout)
    if outcome != "ready":
        end_group(pid, (lambda: process.poll() is None) if process else (lambda: _alive(pid)), timeout=5)
        _pid_file(settings, name).unlink(missing_ok=True)
        reason = (f"exited before it was ready (exit code {process.returncode if process else '?'})"
                  if outcome == "exited" else f"did not become ready within {timeout:.0f}s")
        raise ServiceFailed(name, reason, log_path, log_tail(log_path, offset))
    return pid


def wait_ready(ready: Callable[[], bool], exited: Callable[[], bool], timeout: float) -> str:
    """"ready", "exited" (checked before each probe) or "timeout"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited():
            return "exited"
        try:
            if ready():
                return "ready"
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.5)
    return "exited" if exited() else "timeout"


def stop(settings: Settings, name: str, timeout: float = 15) -> bool:
    """Stop a service we started (its whole process group); True if one was running."""
    pid = running_pid(settings, name)
    if pid is None:
        return False
    end_group(pid, lambda: _alive(pid), timeout)
    _pid_file(settings, name).unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # not our child: started by another rayloop process
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our own child, exited and now reaped (a zombie answers kill 0)
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def end_group(pid: int, alive: Callable[[], bool], timeout: float) -> None:
    """SIGTERM the process group led by pid, SIGKILL what is left once the leader is gone or after timeout."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # children the leader left behind (a dead head's raylet)


# MLflow 3 starts job-runner processes (huey consumers) beside its server unless told not to; rayloop runs
# no MLflow jobs, and under serving load the four of them took about a fifth of a core doing nothing.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_ui_command(settings: Settings, port: int) -> list[str]:
    """MLflow tracking server + UI over the same backend store the code writes to."""
    artifacts = (settings.data_dir / "mlartifacts").resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    return mlflow_server_command(settings.mlflow_uri, "127.0.0.1", port, default_artifact_root=artifacts.as_uri())


def mlflow_server_command(backend: str, host: str, port: int, *, artifacts_destination: str = "",
                          default_artifact_root: str = "") -> list[str]:
    """`mlflow server` over `backend`. With artifacts_destination (a shared folder or s3://...) it proxies
    artifacts (--serve-artifacts): clients on every node log and load models through it and need no access
    to the artifact store themselves, which is what the cluster profile relies on."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
               "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        command += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    elif default_artifact_root:
        command += ["--default-artifact-root", default_artifact_root]
    return command
