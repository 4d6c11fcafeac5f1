"""Deployment configs: docker-compose.yml, the Dockerfile and ray-cluster.yaml are valid and fit together.

No Docker engine or cloud account is needed: the compose file is checked against the Compose
Specification's JSON schema, the cluster config against Ray's own validator.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.support.paths import REPO

COMPOSE = REPO / "docker-compose.yml"
CLUSTER = REPO / "ray-cluster.yaml"
DOCKERFILE = REPO / "Dockerfile"
SERVICES = {"ray-head", "ray-worker", "mlflow", "postgres", "prometheus", "grafana", "ui"}
# The packages pyproject.toml installs: the image must hold every one (serve.app imports control, the CLI rayloop).
PACKAGES = [p.rstrip("*") for p in tomllib.loads((REPO / "pyproject.toml").read_text())
            ["tool"]["setuptools"]["packages"]["find"]["include"]]


def compose_schema_path() -> Path:
    """The shared Compose schema: beside the repo (CI clone, /work layout) or inside it."""
    candidates = [Path(__file__).resolve().parents[2] / "shared/schemas/compose-spec.json",
                  REPO / "shared/schemas/compose-spec.json"]
    for path in candidates:
        if path.is_file():
            return path
    # Deliberately a failure, not a skip: without the schema the compose file goes unchecked.
    pytest.fail(f"Compose schema not found; looked in {', '.join(map(str, candidates))}")


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml as Compose itself sees it (YAML anchors and merge keys resolved)."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft7Validator:
    """A draft-07 validator for the Compose Specification."""
    schema = json.loads(compose_schema_path().read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def cluster() -> dict:
    """ray-cluster.yaml as `ray up` reads it."""
    return yaml.safe_load(CLUSTER.read_text())


def host_ports(service: dict) -> list[str]:
    """Host-side ports a service publishes, from short ("8000:8000") or long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if port.get("published") is not None:
                out.append(str(port["published"]))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) >= 2:  # "HOST:CONTAINER" or "IP:HOST:CONTAINER"; a bare port is ephemeral
            out.append(parts[-2])
    return out


def volume_sources(service: dict) -> list[str]:
    """Named volumes a service mounts (bind mounts, paths starting with . / ~, are left out)."""
    names = []
    for volume in service.get("volumes", []):
        source = volume.get("source") if isinstance(volume, dict) else str(volume).split(":")[0]
        if isinstance(volume, dict) and volume.get("type", "volume") != "volume":
            continue
        if source and not source.startswith((".", "/", "~", "$")):
            names.append(source)
    return names


# --- docker-compose.yml ---------------------------------------------------------------------

def test_compose_file_matches_the_compose_specification(compose, compose_validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator.iter_errors(compose)]
    assert errors == []


def test_compose_schema_rejects_a_broken_service(compose, compose_validator):
    broken = copy.deepcopy(compose)
    broken["services"]["ray-head"]["portz"] = ["8265:8265"]  # a typo Compose would refuse
    assert not compose_validator.is_valid(broken)
    broken = copy.deepcopy(compose)
    broken["services"]["postgres"]["healthcheck"] = "pg_isready"  # must be a mapping
    assert not compose_validator.is_valid(broken)


def test_compose_defines_every_service_of_the_design(compose):
    assert SERVICES <= set(compose["services"])


@pytest.mark.parametrize("name", ["ray-worker", "ray-worker-gpu"])
def test_ray_workers_are_scalable(compose, name):
    worker = compose["services"][name]
    # `--scale` needs containers without a fixed name or host port (both must be unique).
    assert "container_name" not in worker
    assert host_ports(worker) == []
    assert "ray-head:6379" in " ".join(worker["command"])
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_gpu_reservation_is_opt_in(compose):
    gpu = compose["services"]["ray-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["profiles"] == ["gpu"]
    # The default profile must start on a host without NVIDIA GPUs.
    for name, service in compose["services"].items():
        if not service.get("profiles"):
            assert "devices" not in service.get("deploy", {}).get("resources", {}).get("reservations", {}), name


def test_every_dependency_is_a_real_service(compose):
    services = set(compose["services"])
    for name, service in compose["services"].items():
        assert set(service.get("depends_on", [])) <= services, name


def test_every_named_volume_is_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = {v for service in compose["services"].values() for v in volume_sources(service)}
    assert used and used <= declared, used - declared


def test_host_ports_are_unique(compose):
    ports = [p for service in compose["services"].values() for p in host_ports(service)]
    assert len(ports) == len(set(ports)), sorted(ports)
    assert {"8265", "8000", "5000", "7860", "9090", "3000"} <= set(ports)


def test_builds_point_at_the_dockerfile(compose):
    builders = {name: s["build"] for name, s in compose["services"].items() if "build" in s}
    assert {"ray-head", "ray-worker", "mlflow", "ui"} <= set(builders)
    for name, build in builders.items():
        build = {"context": build} if isinstance(build, str) else build
        dockerfile = (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
        assert dockerfile == DOCKERFILE.resolve() and dockerfile.is_file(), name


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        tag = service["image"].rpartition(":")[2] if ":" in service.get("image", "") else ""
        assert tag and tag != "latest", f"{name}: {service.get('image')!r} has no explicit version"


def test_project_containers_share_the_data_volume(compose):
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if env.get("RAYLOOP_DATA_DIR"):
            assert f"rayloop-data:{env['RAYLOOP_DATA_DIR']}" in service["volumes"], name
            assert env["RAYLOOP_MLFLOW_URI"] == "http://mlflow:5000", name
            assert env["RAYLOOP_DATABASE_URL"].startswith("postgresql+psycopg://"), name


def test_ui_reaches_serve_over_http(compose):
    ui = compose["services"]["ui"]
    assert ui["command"] == ["python", "-m", "ui.app"]
    assert ui["environment"]["RAYLOOP_SERVE_URL"] == "http://ray-head:8000"


def test_stateful_services_have_healthchecks(compose):
    for name in ["ray-head", "mlflow", "postgres"]:
        assert compose["services"][name]["healthcheck"]["test"], name


# --- Dockerfile -----------------------------------------------------------------------------

def test_dockerfile_copies_paths_that_exist():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    sources = [src for line in re.findall(r"^COPY\s+(.+)$", text, re.M) for src in line.split()[:-1]]
    assert set(PACKAGES) | {"requirements.lock", "pyproject.toml", "params.yaml"} <= set(sources)
    assert [s for s in sources if not (REPO / s).exists()] == []


def test_dockerfile_exposes_the_service_ports():
    exposed = set(" ".join(re.findall(r"^EXPOSE\s+(.+)$", DOCKERFILE.read_text(), re.M)).split())
    assert {"8000", "7860", "8265", "5000", "6379", "8080"} <= exposed


# --- ray-cluster.yaml -----------------------------------------------------------------------

def test_cluster_config_passes_rays_validator(cluster):
    validate_config(copy.deepcopy(cluster))
    # `ray up` validates again after merging the provider defaults; that must pass too.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_validator_rejects_a_broken_config(cluster):
    broken = copy.deepcopy(cluster)
    broken["idle_timeout_minutes"] = "soon"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["worker.gpu"]["max_wokers"] = 4  # typo: unknown field
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_cluster_has_autoscaling_gpu_and_cpu_workers(cluster):
    node_types = cluster["available_node_types"]
    workers = {name: t for name, t in node_types.items() if name != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and cpu
    for node_type in gpu + cpu:
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]
    assert cluster["provider"]["type"] == "aws"


def test_cluster_head_starts_ray_and_the_loop(cluster):
    commands = cluster["head_start_ray_commands"]
    start = next(i for i, c in enumerate(commands) if "ray start --head" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in commands[start]
    assert any("rayloop up" in c for c in commands[start + 1:])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cluster["worker_start_ray_commands"])


def test_cluster_nodes_install_the_locked_project(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert "-m venv" in setup
    assert "pip install --quiet -r ~/rayloop/requirements.lock" in setup
    assert "--no-deps" in setup and "-e ." in setup
    assert cluster["file_mounts"]["~/rayloop"] == "."


def profile_env(node_env: dict) -> dict:
    """deploy/cluster.env as a node's shell sources it before `ray start`."""
    shell = subprocess.run(["bash", "-c", "set -a && . deploy/cluster.env && env -0"], cwd=REPO, env=node_env,
                           capture_output=True, check=True)
    return dict(line.split("=", 1) for line in shell.stdout.decode().split("\0") if "=" in line)


def test_every_cluster_node_starts_ray_under_the_cluster_profile(cluster):
    from cluster import profile
    from cluster.settings import load_settings

    head = cluster["head_start_ray_commands"]
    sourced = [c for c in head + cluster["worker_start_ray_commands"] if "ray start" in c or "rayloop up" in c]
    assert sourced and all(". ~/rayloop/deploy/cluster.env" in c for c in sourced)
    assert any("rayloop up --cluster" in c for c in head) and any("head-services.sh" in c for c in head)
    worker = profile_env({"PATH": os.environ["PATH"], "HOME": "/home/ubuntu", "RAY_HEAD_IP": "10.0.3.7"})
    settings = load_settings({**worker, "RAYLOOP_PARAMS": str(REPO / "params.yaml")})
    assert profile.node_local(settings) == []
    assert settings.mlflow_uri == "http://10.0.3.7:5000" and "@10.0.3.7:5432/" in settings.database_url
    # On the head itself: its private address, never loopback (settings travel to the other nodes).
    on_head = profile_env({"PATH": os.environ["PATH"], "HOME": "/home/ubuntu"})
    assert "127.0.0.1" not in on_head["RAYLOOP_MLFLOW_URI"] and on_head["RAYLOOP_HEAD"]


def test_compose_ray_containers_run_the_cluster_profile_on_a_shared_volume(compose):
    from cluster import profile
    from cluster.settings import load_settings

    for name in ["ray-head", "ray-worker"]:
        service = compose["services"][name]
        settings = load_settings({**service["environment"], "RAYLOOP_PARAMS": str(REPO / "params.yaml")})
        assert profile.node_local(settings) == [], name
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounts[settings.storage_uri] in compose["volumes"], name  # the same named volume in both
    assert "rayloop up --no-ui --cluster" in compose["services"]["ray-head"]["command"][-1]
