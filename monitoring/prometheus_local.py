"""A local Prometheus beside `rayloop up`: it finds Ray's metrics through Ray's service-discovery file.

    python -m monitoring.prometheus_local up      # start (or reload) it; http://127.0.0.1:9090
    python -m monitoring.prometheus_local down    # stop it
    python -m monitoring.prometheus_local config  # print the generated config

The config is derived from monitoring/prometheus.yml (the compose one), so both scrape the same
way; only the `ray` job reads the local head's service-discovery file instead of the dashboard.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

import yaml

from cluster import environment, services
from cluster.settings import Settings, load_settings

TEMPLATE = Path(__file__).with_name("prometheus.yml")
DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
SERVICE = "prometheus"


def gcs_address(settings: Settings) -> str:
    """The Ray cluster rayloop uses: RAYLOOP_RAY_ADDRESS, else the local head `rayloop up` starts."""
    address = settings.ray_address
    if address and address not in {"auto", "local"} and not address.startswith("ray://"):
        return address
    from cluster.ray_cluster import head_address

    return head_address(settings)


def discovery_file(address: str) -> Path:
    """The service-discovery file the head of the Ray cluster at `address` keeps up to date.

    It sits in the head's session directory, which changes every time the head starts; Ray also
    links it from /tmp/ray, but that link follows whichever Ray instance on this machine wrote last.
    """
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_service_pb2 import GetAllNodeInfoRequest

    head = GetAllNodeInfoRequest.NodeSelector(is_head_node=True)
    nodes = GcsClient(address=address).get_all_node_info(timeout=10, node_selectors=[head])
    nodes = list(nodes.values()) if isinstance(nodes, dict) else list(nodes)
    sessions = [node.session_dir for node in nodes if getattr(node, "session_dir", "")]
    if not sessions:
        raise RuntimeError(f"the Ray head at {address} reported no session directory")
    return Path(sessions[-1]) / DISCOVERY_FILE


def render_config(discovery: Path, port: int, scrape_interval: str = "10s") -> dict:
    """monitoring/prometheus.yml with the `ray` job reading `discovery` and self-scraping on `port`."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    for job in config["scrape_configs"]:
        if job["job_name"] == "ray":
            job.pop("http_sd_configs", None)
            job["file_sd_configs"] = [{"files": [str(discovery)], "refresh_interval": "30s"}]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    return config


def command(binary: str, config: Path, storage: Path, host: str, port: int) -> list[str]:
    """The Prometheus server command line."""
    return [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address={host}:{port}", "--storage.tsdb.retention.time=15d"]


def url(settings: Settings) -> str:
    """Where the local Prometheus answers (loopback when it listens on every interface)."""
    host = settings.services.host
    return f"http://{'127.0.0.1' if host in {'0.0.0.0', '::', ''} else host}:{settings.services.prometheus_port}"


def start(settings: Settings, binary: str, discovery: Path | None = None, scrape_interval: str = "10s",
          timeout: float = 60) -> str:
    """Write the config under <data_dir>/prometheus and start Prometheus (or reload a running one)."""
    discovery = discovery or discovery_file(gcs_address(settings))
    folder = settings.data_dir / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    port = settings.services.prometheus_port
    config.write_text(yaml.safe_dump(render_config(discovery, port, scrape_interval), sort_keys=False))
    running = services.running_pid(settings, SERVICE)
    if running is not None:
        # A head restarted since: a new session directory, so the running server rereads its config.
        os.kill(running, signal.SIGHUP)
    services.start(settings, SERVICE, command(binary, config, folder / "data", settings.services.host, port),
                   health_url=f"{url(settings)}/-/ready", timeout=timeout)
    return url(settings)


def stop(settings: Settings) -> bool:
    """Stop the Prometheus `start` started; True if it ran."""
    return services.stop(settings, SERVICE)


def main(argv: list[str] | None = None) -> int:
    environment.apply()  # `python -m monitoring.prometheus_local` reads the head's state through Ray
    parser = argparse.ArgumentParser(description="A local Prometheus scraping the rayloop Ray cluster.")
    parser.add_argument("action", choices=["up", "down", "config"])
    parser.add_argument("--scrape-interval", default="10s")
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.action == "down":
        print("[rayloop] Prometheus stopped" if stop(settings) else "[rayloop] Prometheus was not running")
        return 0
    from cluster.ray_cluster import head_running

    if not settings.ray_address and not head_running(settings):
        print("[rayloop] no Ray head is running for this data dir: `rayloop up` first", file=sys.stderr)
        return 1
    if args.action == "config":
        discovery = discovery_file(gcs_address(settings))
        print(yaml.safe_dump(render_config(discovery, settings.services.prometheus_port, args.scrape_interval),
                             sort_keys=False), end="")
        return 0
    binary = shutil.which("prometheus")
    if binary is None:
        # Optional: the loop runs without it, and docker compose brings its own.
        print("[rayloop] Prometheus is not installed (Debian/Ubuntu: apt-get install prometheus); skipped",
              file=sys.stderr)
        return 0
    print(f"[rayloop] Prometheus is up at {start(settings, binary, scrape_interval=args.scrape_interval)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
