"""Who used the CPU during a stretch of a benchmark: every process on the machine, grouped by its part.

    before = cpu.snapshot(); ...; shares = cpu.shares(before, cpu.snapshot())

Shares are % of one core over the stretch's wall time (200 = both cores of a 2-core box). A process
that started inside the stretch counts from zero; one that ended inside it is lost (not counted).
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass

import psutil

# (pattern on the joined command line, part): the first match names the process. Ray workers set their
# title to `ray::<Actor class>` (`ray::ServeReplica:<app>:<deployment>` for Serve replicas).
PARTS = [
    (r"ray::ServeReplica:[^:\s]+:Classifier", "Serve Classifier replicas"),
    (r"ray::ServeReplica:[^:\s]+:Ingress", "Serve Ingress replicas"),
    (r"ray::DriftMonitorActor", "drift monitor actor"),
    (r"ray::ServeController", "Serve controller"),
    (r"ray::ProxyActor|ray::HAProxyManager|ray::.*Proxy", "Serve proxy actor"),
    (r"(^|/)haproxy\b", "HAProxy"),
    (r"ray::RateLimits", "rate-limit actor"),
    (r"ray::IDLE", "idle Ray workers"),
    (r"ray::DashboardAgent|dashboard/agent\.py|runtime_env/agent", "Ray node agents"),
    (r"ray::", "other Ray workers"),
    (r"gcs_server", "Ray GCS"),
    (r"(^|/)raylet\b", "raylet"),
    (r"dashboard/dashboard\.py|dashboard\.subprocesses|ray-dashboard", "Ray dashboard"),
    (r"log_monitor\.py|autoscaler/_private/monitor\.py", "Ray log and autoscaler monitors"),
    (r"\bray start\b|/ray start|bin/ray\s", "`ray start --block`"),
    (r"huey_consumer", "MLflow job runners"),
    (r"mlflow", "MLflow server"),
    (r"-m ui\.app|ui/app\.py", "Gradio demo"),
    (r"bench\.baseline_app", "baseline uvicorn"),
    (r"(^|/)wrk\b", "wrk (load generator)"),
    (r"bench/serve\.py", "bench driver"),
]


@dataclass(frozen=True)
class Seen:
    part: str
    cpu_s: float  # user + system seconds so far


def part_of(cmdline: str) -> str:
    for pattern, part in PARTS:
        if re.search(pattern, cmdline):
            return part
    return "other processes"


def command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return ""


def part_of_process(process: psutil.Process) -> str:
    """The part a process belongs to: its own command line's, else its nearest named ancestor's (uvicorn's
    workers and multiprocessing children are spawned with anonymous command lines)."""
    try:
        if not process.cmdline() and process.ppid() in {0, 2}:
            return "kernel threads (loopback network, I/O)"
    except psutil.Error:
        return "other processes"
    part = part_of(command_line(process))
    if part != "other processes":
        return part
    try:
        ancestors = process.parents()[:3]
    except psutil.Error:
        return part
    for parent in ancestors:
        named = part_of(command_line(parent))
        if named != "other processes":
            return named
    return part


def snapshot() -> tuple[float, dict[int, Seen]]:
    """(monotonic time, pid -> part and CPU seconds so far) for every process we may read."""
    seen = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seen[process.pid] = Seen(part_of_process(process), times.user + times.system)
    return time.monotonic(), seen


def children_cpu_s() -> float:
    """CPU seconds of this process's children that ended and were waited for (wrk, run to its end)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def shares(before: tuple[float, dict[int, Seen]], after: tuple[float, dict[int, Seen]], floor: float = 0.5,
           extra: dict[str, float] | None = None) -> dict[str, float]:
    """% of one core per part between two snapshots, largest first; parts under `floor` % are left out.
    `extra`: CPU seconds of parts the snapshots cannot see (a child that ended between them)."""
    wall = max(after[0] - before[0], 1e-9)
    used: dict[str, float] = dict(extra or {})
    for pid, now in after[1].items():
        then = before[1].get(pid)
        spent = now.cpu_s - (then.cpu_s if then is not None and then.part == now.part else 0.0)
        used[now.part] = used.get(now.part, 0.0) + max(spent, 0.0)
    percent = {part: 100 * seconds / wall for part, seconds in used.items()}
    return dict(sorted(((p, v) for p, v in percent.items() if v >= floor), key=lambda item: -item[1]))


def line(percent: dict[str, float]) -> str:
    """One readable line: `part 41%, part 7%, ...`."""
    return ", ".join(f"{part} {value:.0f}%" for part, value in percent.items()) or "nothing above the floor"
