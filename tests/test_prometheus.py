"""Prometheus and Grafana: the configs are valid, and a real Prometheus scrapes a running rayloop."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
import tomllib
import urllib.parse
import urllib.request

import httpx
import pytest
import yaml

from cluster.ray_cluster import free_port
from cluster.services import wait_until
from tests.support.images import png
from tests.support.paths import REPO
from tests.support.registry import register_tiny_model
from tests.support.serving import serving

pytestmark = pytest.mark.slow

MONITORING = REPO / "monitoring"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
PROVISIONING = MONITORING / "grafana" / "provisioning"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: prometheus)")

# Ray exports a histogram as these series, and prefixes every application metric with `ray_`.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
DASHBOARD_TOPICS = ["Requests/s", "p50 / p99", "Error rate", "Batch size", "Predictions by class", "confidence",
                    "Model version over time", "Drift share", "Feedback rate", "Retrain and promotion events"]


def defined_metrics() -> dict[str, str]:
    """Every rayloop metric the code defines (name -> Counter/Gauge/Histogram), read from the source."""
    found = {}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
    for path in [p for package in packages for p in sorted((REPO / package).rglob("*.py"))]:
        for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\(\s*"(rayloop_\w+)"', path.read_text()):
            found[name] = kind
    return found


def exported_series() -> set[str]:
    """Series names Prometheus gets from Ray for those metrics."""
    names = set()
    for name, kind in defined_metrics().items():
        names |= {f"ray_{name}{suffix}" for suffix in HISTOGRAM_SUFFIXES} if kind == "Histogram" else {f"ray_{name}"}
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and annotations."""
    panels = [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]


def series_in(expr: str) -> set[str]:
    return set(re.findall(r"\bray_rayloop_\w+", expr))


# -- configs ---------------------------------------------------------------------------------------
@needs_promtool
def test_compose_prometheus_config_passes_promtool():
    check = subprocess.run([PROMTOOL, "check", "config", str(MONITORING / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_promtool
def test_local_prometheus_config_passes_promtool_and_reads_rays_discovery_file(tmp_path):
    from monitoring.prometheus_local import render_config

    discovery = tmp_path / "session_x" / "prom_metrics_service_discovery.json"
    config = render_config(discovery, port=9999, scrape_interval="5s")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))

    check = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)

    assert check.returncode == 0, check.stdout + check.stderr
    ray_job = next(job for job in config["scrape_configs"] if job["job_name"] == "ray")
    assert ray_job["file_sd_configs"][0]["files"] == [str(discovery)]


def test_compose_mounts_the_monitoring_configs():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {v.split(":")[0]: v.split(":")[1] for name in ("prometheus", "grafana")
              for v in compose["services"][name]["volumes"] if v.startswith("./")}
    assert mounts["./monitoring/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./monitoring/grafana/dashboards"] == "/var/lib/grafana/dashboards"
    for source in mounts:
        assert (REPO / source).exists(), source
    # Grafana loads the dashboards from where compose mounts them, through the provisioned datasource.
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "rayloop.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_dashboard_covers_the_loop_and_queries_only_metrics_rayloop_exports():
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads((DASHBOARDS / "rayloop.json").read_text())

    titles = " | ".join(p["title"] for p in dashboard["panels"])
    queries = dashboard_queries(dashboard)
    used = set().union(*map(series_in, queries))

    assert [topic for topic in DASHBOARD_TOPICS if topic not in titles] == []
    assert used and used <= exported_series(), used - exported_series()
    assert {f"ray_{name}" for name, kind in defined_metrics().items() if kind != "Histogram"} <= used
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {datasource["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    dashboard = json.loads((DASHBOARDS / "rayloop.json").read_text())
    # promtool parses a rule's expression; Grafana's interval variables become a plain duration first.
    rules = [{"record": f"rayloop:dashboard:query{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(dashboard_queries(dashboard))]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)

    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout


class RecordingGauge:
    def __init__(self):
        self.values: dict[str, float] = {}

    def set(self, value: float, tags: dict) -> None:
        self.values[tags["event"]] = value


def test_loop_events_are_exported_as_counts_from_the_audit_trail(data_dir):
    from cluster.settings import load_settings
    from monitoring.monitor import DriftMonitor
    from store import Store

    settings = load_settings()
    store = Store.from_settings(settings)
    monitor = DriftMonitor(settings, store=store)
    monitor.gauges = {"events": RecordingGauge()}
    try:
        for event in ["retrain_triggered", "retrain_started", "promoted", "retrain_triggered", "drift_check"]:
            store.audit("test", event, {})

        monitor.export_loop_events()

        values = monitor.gauges["events"].values
        assert values["retrain_triggered"] == 2 and values["promoted"] == 1 and values["rollback"] == 0
        assert "drift_check" not in values
    finally:
        store.close()


# -- a real Prometheus against a running rayloop --------------------------------------------------------
def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["data"]["result"]


def wait_for_series(prometheus: str, names: set[str], timeout: float) -> set[str]:
    """Poll Prometheus until every name has a series or the timeout passes; the names still missing."""
    missing = set(names)
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        missing = {name for name in missing if not query(prometheus, name)}
        if missing:
            time.sleep(2)
    return missing


def wait_for_query(prometheus: str, expr: str, check, timeout: float) -> list[dict]:
    """Poll a query until check(result) holds or the timeout passes; the last result. Each Serve replica's
    series shows up at its own metrics export, so the first series seen may be one replica's share."""
    deadline = time.monotonic() + timeout
    while not check(result := query(prometheus, expr)) and time.monotonic() < deadline:
        time.sleep(2)
    return result


@pytest.fixture(scope="module")
def rayloop_with_metrics(tmp_path_factory):
    """Ray (exporting metrics, with its dashboard writing the service-discovery file) + Serve + a champion."""
    import ray

    env = {"RAYLOOP_SERVICES_PROMETHEUS_PORT": str(free_port()),
           "RAYLOOP_MONITOR_MIN_WINDOW": "5", "RAYLOOP_MONITOR_WINDOW_SIZE": "20"}
    assert not ray.is_initialized()
    # Our own Ray, whatever else runs here; the dashboard writes the discovery file.
    # A reference of 64 rows: the check can estimate accuracy (50 at least) for the dashboard's panel.
    with serving(tmp_path_factory.mktemp("prometheus") / "data", env=env, dashboard=True,
                 metrics_export_port=free_port(),
                 champion=lambda settings: register_tiny_model(settings, reference_rows=64)) as served:
        yield served.settings, served.url, ray.get_runtime_context().gcs_address


@needs_prometheus
def test_prometheus_scrapes_rayloop_metrics_from_a_running_rayloop(rayloop_with_metrics):
    from monitoring import prometheus_local
    from monitoring.monitor import DriftMonitor

    settings, url, gcs_address = rayloop_with_metrics
    discovery = prometheus_local.discovery_file(gcs_address)
    prometheus = prometheus_local.start(settings, PROMETHEUS, discovery=discovery, scrape_interval="2s")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            ids = [client.post("/v1/predict", files={"file": ("d.png", png(v), "image/png")}).json()["prediction_id"]
                   for v in range(0, 240, 12)]  # 20: a full window, as the monitor's calibrated check takes
            bad = client.post("/v1/predict", files={"file": ("x.png", b"not an image", "image/png")})
            assert bad.status_code == 400
            for prediction_id in ids[:3]:
                feedback = client.post("/v1/feedback", json={"prediction_id": prediction_id, "label": "3"})
                assert feedback.status_code == 201
        monitor = DriftMonitor(settings)  # one check in this driver: drift and loop-event gauges
        try:
            # The ingress writes predictions off the request path; the check needs them in the store.
            assert wait_until(lambda: monitor.store.count_predictions() >= len(ids), timeout=30)
            monitor.store.audit("test", "promoted", {"version": "1"})
            assert monitor.check_once().report is not None
            monitor.record_failure(RuntimeError("a check that raised"))  # counted, and its metric exported
            # Retention with a one-second horizon: the unlabelled predictions go, and the deletions are counted.
            time.sleep(1.5)
            monitor.settings = dataclasses.replace(settings, store=dataclasses.replace(
                settings.store, retention_days=1 / 86400))
            pruned_rows, _ = monitor.prune_if_due()
            assert pruned_rows == len(ids) - 3
        finally:
            monitor.close()

        wanted = {"ray_rayloop_requests_total", "ray_rayloop_request_seconds_bucket", "ray_rayloop_feedback_total",
                  "ray_rayloop_batch_size_bucket", "ray_rayloop_predictions_total",
                  "ray_rayloop_prediction_confidence_bucket", "ray_rayloop_model_version",
                  "ray_rayloop_drift_share", "ray_rayloop_loop_events", "ray_rayloop_drift_check_failures_total",
                  "ray_rayloop_pruned_total"}
        assert wait_for_series(prometheus, wanted, timeout=90) == set()

        # The values are the ones rayloop recorded, and Prometheus found them through Ray's discovery.
        def total(result):
            return sum(float(r["value"][1]) for r in result)

        def statuses(result):
            return {r["metric"]["status"] for r in result}

        predictions = wait_for_query(prometheus, "ray_rayloop_predictions_total", lambda r: total(r) >= len(ids), 60)
        assert total(predictions) == len(ids), predictions  # both replicas' counters, summed: one per image sent
        requests = wait_for_query(prometheus, "ray_rayloop_requests_total",
                                  lambda r: statuses(r) >= {"200", "201", "400"}, 60)
        assert statuses(requests) >= {"200", "201", "400"}
        assert {r["value"][1] for r in query(prometheus, "ray_rayloop_model_version")} == {"1"}
        assert query(prometheus, 'ray_rayloop_loop_events{event="promoted"}')[0]["value"][1] == "1"
        assert total(query(prometheus, "ray_rayloop_drift_check_failures_total")) == 1
        assert total(query(prometheus, 'ray_rayloop_pruned_total{kind="predictions"}')) == len(ids) - 3
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        assert any(t["labels"]["job"] == "ray" and t["health"] == "up" for t in targets)
        # Every query of the Grafana dashboard names series Prometheus now has.
        dashboard = json.loads((DASHBOARDS / "rayloop.json").read_text())
        used = set().union(*map(series_in, dashboard_queries(dashboard)))
        assert wait_for_series(prometheus, used, timeout=30) == set()
    finally:
        assert prometheus_local.stop(settings)
