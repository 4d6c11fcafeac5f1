"""KubeRay manifests (deploy/kuberay/): valid custom resources that run what rayloop's code expects.

No Kubernetes is needed: each RayService, RayCluster and RayJob is checked against KubeRay's CRD schema
(its openAPIV3Schema as JSON Schema, in the shared schemas) with unknown fields refused, as kubectl's
strict field validation refuses them; then against rayloop itself: the Serve builder and the settings
names the Serve config uses, the retrain job's flags, and the cluster profile every Ray pod must get.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.profile import node_local
from cluster.settings import ENV_ALIASES, Settings, load_settings, to_env
from rayloop import cli
from tests.support.paths import REPO
from tune import job

KUBERAY = REPO / "deploy/kuberay"
KINDS = {"rayservice.yaml": ["RayService"], "raycluster.yaml": ["RayCluster"], "rayjob-retrain.yaml": ["RayJob"],
         "profile.yaml": ["ConfigMap", "Secret"], "services.yaml": ["Service", "Deployment", "Service"]}
SCHEMAS = {"RayService": "rayservice-v1.json", "RayCluster": "raycluster-v1.json", "RayJob": "rayjob-v1.json"}
IMAGE = "rayloop:0.1.0"
PROFILE = {"RAYLOOP_DATABASE_URL", "RAYLOOP_MLFLOW_URI", "RAYLOOP_STORAGE_URI", "RAYLOOP_DATA_DIR",
           "RAYLOOP_RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED"}
# What load_settings reads: RAYLOOP_<SECTION>_<KEY>, the short aliases and the top-level values.
SETTING_NAMES = {*to_env(Settings()), *ENV_ALIASES, "RAYLOOP_DATA_DIR", "RAYLOOP_MLFLOW_URI", "RAYLOOP_DATABASE_URL",
                 "RAYLOOP_RAY_ADDRESS", "RAYLOOP_STORAGE_URI"}


def schema_path(name: str) -> Path:
    """A shared KubeRay schema: beside the repo (CI clone, /work layout) or inside it."""
    candidates = [Path(__file__).resolve().parents[2] / "shared/schemas/kuberay" / name,
                  REPO / "shared/schemas/kuberay" / name]
    for path in candidates:
        if path.is_file():
            return path
    # Deliberately a failure, not a skip: without the schema the manifests go unchecked.
    pytest.fail(f"KubeRay schema {name} not found; looked in {', '.join(map(str, candidates))}")


def strict(schema: dict) -> dict:
    """The schema with unknown fields refused. A CRD schema only lists fields, and the API server drops
    the others silently, unless the client asks for strict field validation (kubectl does): a typo then fails."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(sub) for sub in schema[key]]
    return schema


@functools.cache
def validator(kind: str, *, unknown_fields_refused: bool = True) -> jsonschema.protocols.Validator:
    """A validator of the schema's own draft (draft-07 when it names none)."""
    schema = json.loads(schema_path(SCHEMAS[kind]).read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(strict(schema) if unknown_fields_refused else schema)


def errors(validator: jsonschema.protocols.Validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    """Every document of every manifest, as kubectl reads them."""
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
            for path in sorted(KUBERAY.glob("*.yaml"))}


@pytest.fixture(scope="module")
def ray(manifests) -> dict[str, dict]:
    """The RayService, RayCluster and RayJob, by kind."""
    return {doc["kind"]: doc for name in ["rayservice.yaml", "raycluster.yaml", "rayjob-retrain.yaml"]
            for doc in manifests[name]}


@pytest.fixture(scope="module")
def profile(manifests) -> dict[tuple[str, str], dict[str, str]]:
    """profile.yaml's ConfigMap and Secret, as (kind, name) -> the variables they hold."""
    out = {}
    for doc in manifests["profile.yaml"]:
        data = dict(doc.get("data") or {})
        if doc["kind"] == "Secret":
            data = {key: base64.b64decode(value).decode() for key, value in data.items()}
            data.update(doc.get("stringData") or {})
        out[(doc["kind"], doc["metadata"]["name"])] = data
    return out


def cluster_of(resource: dict) -> dict | None:
    """The RayCluster spec inside a RayService or RayJob, or the RayCluster's own."""
    spec = resource["spec"]
    return spec if resource["kind"] == "RayCluster" else spec.get("rayClusterConfig") or spec.get("rayClusterSpec")


def groups(cluster: dict) -> dict[str, dict]:
    """Head and worker groups by name ("head" for the head)."""
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}}


def ray_containers(ray: dict) -> dict[str, dict]:
    """The Ray container (the first, as KubeRay takes it) of each group of each cluster defined."""
    return {f"{kind}/{name}": group["template"]["spec"]["containers"][0]
            for kind, resource in ray.items() if cluster_of(resource)
            for name, group in groups(cluster_of(resource)).items()}


def expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references as Kubernetes expands them in env values, command and args; an undefined one stays."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)


def container_env(container: dict, profile: dict) -> dict[str, str]:
    """The environment Kubernetes gives the container: envFrom first, then env with $(VAR) expanded."""
    env = {}
    for source in container.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source["configMapRef" if kind == "ConfigMap" else "secretRef"]
        assert (kind, ref["name"]) in profile, f"{kind} {ref['name']} is not in profile.yaml"
        env.update({source.get("prefix", "") + key: value for key, value in profile[(kind, ref["name"])].items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            ref = var["valueFrom"].get("configMapKeyRef") or var["valueFrom"]["secretKeyRef"]
            kind = "ConfigMap" if "configMapKeyRef" in var["valueFrom"] else "Secret"
            assert ref["key"] in profile.get((kind, ref["name"]), {}), f"{var['name']}: {kind} {ref['name']}"
            env[var["name"]] = profile[(kind, ref["name"])][ref["key"]]
    return env


def serve_config(ray: dict) -> dict:
    return yaml.safe_load(ray["RayService"]["spec"]["serveConfigV2"])


# --- the manifests as custom resources -------------------------------------------------------

def test_each_manifest_holds_the_documents_the_docs_apply(manifests):
    assert {name: [doc["kind"] for doc in docs] for name, docs in manifests.items()} == KINDS
    for docs in manifests.values():
        for doc in docs:
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), doc["kind"]


@pytest.mark.parametrize("kind", SCHEMAS)
def test_ray_resources_match_the_kuberay_crd_schemas(ray, kind):
    assert ray[kind]["apiVersion"] == "ray.io/v1"
    assert errors(validator(kind), ray[kind]) == []


# Broken on purpose, each the way a hand edit breaks a manifest: (kind, where, key, value).
BROKEN = [
    pytest.param("RayCluster", "spec/workerGroupSpecs/0", "minReplica", 0, id="misspelled-field"),
    pytest.param("RayCluster", "spec/workerGroupSpecs/0", "maxReplicas", "four", id="wrong-type"),
    pytest.param("RayCluster", "spec/headGroupSpec/template/spec/containers/0/resources/limits", "cpu", "4 cores",
                 id="not-a-quantity"),
    pytest.param("RayCluster", "spec/headGroupSpec/rayStartParams", "metrics-export-port", 8080, id="unquoted-param"),
    pytest.param("RayService", "spec", "serveConfigV2", {"applications": []}, id="serve-config-not-yaml-text"),
]


def broken(resource: dict, where: str, key: str, value) -> dict:
    out = copy.deepcopy(resource)
    node = out
    for part in where.split("/"):
        node = node[int(part) if part.isdigit() else part]
    node[key] = value
    return out


@pytest.mark.parametrize("kind, where, key, value", BROKEN)
def test_the_schema_check_rejects_a_broken_manifest(ray, kind, where, key, value):
    found = errors(validator(kind), broken(ray[kind], where, key, value))
    assert found and all(e.startswith(where) for e in found), found


def test_a_misspelled_field_passes_the_bare_crd_schema_but_not_the_strict_check(ray):
    typo = broken(ray["RayCluster"], "spec/workerGroupSpecs/0", "minReplica", 0)
    # Why the check is strict: the API server would drop `minReplica` and use its default instead.
    assert errors(validator("RayCluster", unknown_fields_refused=False), typo) == []
    assert any("'minReplica' was unexpected" in e for e in errors(validator("RayCluster"), typo))


# --- the Serve application -------------------------------------------------------------------

def test_serve_config_is_the_application_rayloop_deploys(ray):
    from ray.serve.schema import ServeDeploySchema

    from control.deployment import APP_IMPORT_PATH, APP_NAME

    config = serve_config(ray)
    ServeDeploySchema.model_validate(config)  # Serve's own check of the config KubeRay hands it
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    [app] = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (APP_NAME, "/", APP_IMPORT_PATH)
    module, _, attribute = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_serve_args_are_settings_the_builder_reads(ray, profile):
    from serve.app import build

    args_env = serve_config(ray)["applications"][0]["args"]["env"]
    assert set(args_env) <= SETTING_NAMES
    assert all(isinstance(value, str) for value in args_env.values()), "env values must be strings"
    # app_builder's settings: the head's environment (the profile), then args.env on top.
    head = container_env(ray["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
                         ["containers"][0], profile)
    settings = load_settings(env={**head, **args_env, "RAYLOOP_PARAMS": str(REPO / "params.yaml")})
    assert settings.serve.num_replicas == int(args_env["RAYLOOP_SERVE_NUM_REPLICAS"])
    build(settings)  # raises on sizes Serve cannot run (batching, topology)


def test_serve_cluster_has_a_head_proxy_and_autoscaling_cpu_and_gpu_workers(ray):
    service = ray["RayService"]["spec"]
    assert service["upgradeStrategy"] == {"type": "NewCluster"}
    cluster = service["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert "num-cpus" not in head["rayStartParams"]  # the head runs work: the monitor, Serve's proxy
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {"serve": 8000, "dashboard": 8265, "metrics": 8080}.items() <= ports.items()
    workers = {g["groupName"]: (g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]}
    assert workers == {"cpu": (1, 0, 4), "gpu": (0, 0, 4)}


def test_serve_head_starts_the_drift_monitor_once_its_ray_answers(ray):
    """The operator deploys serveConfigV2 only: the head's postStart hook starts the monitor on that cluster."""
    head = ray["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    shell, flag, script = head["lifecycle"]["postStart"]["exec"]["command"]
    assert (shell, flag) == ("/bin/bash", "-c")
    assert script.startswith("setsid ") and script.endswith("&")  # returns at once: a failed hook kills the pod
    gcs = {p["name"]: p["containerPort"] for p in head["ports"]}["gcs-server"]
    waits, starts = re.fullmatch(r"setsid bash -c '(until .*?; done); (.*?)' >\S+ 2>&1 &", script).groups()
    assert waits == f"until ray health-check --address 127.0.0.1:{gcs}; do sleep 2; done"
    env, program, *argv = shlex.split(starts)
    assert env == f"RAYLOOP_RAY_ADDRESS=127.0.0.1:{gcs}" and program == "rayloop"
    assert cli.parser().parse_args(argv).action == "start"  # argparse exits on what the CLI does not know
    assert "health-check" in cli_commands_of_ray()


@functools.cache
def cli_commands_of_ray() -> set[str]:
    from ray.scripts.scripts import cli as ray_cli

    return set(ray_cli.commands)


# --- the retrain job and its cluster ---------------------------------------------------------

def test_retrain_job_runs_rayloop_job_on_the_training_cluster(ray):
    spec = ray["RayJob"]["spec"]
    python, flag, module, *args = shlex.split(spec["entrypoint"])
    assert (python, flag, module) == ("python", "-m", "rayloop.job")
    assert importlib.util.find_spec(module) is not None
    parsed = job.parse(args)  # argparse exits on a flag the job does not know
    assert (parsed.trigger, parsed.actor, parsed.no_rollout) == ("schedule", "kuberay", False)
    assert spec["clusterSelector"] == {"ray.io/cluster": ray["RayCluster"]["metadata"]["name"]}
    assert "rayClusterSpec" not in spec  # the profile comes from that cluster's pods
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is False  # the cluster is shared
    assert ray["RayJob"]["metadata"]["generateName"]  # `kubectl create` runs it again under a new name


@pytest.mark.parametrize("config, expected", [
    ('{"runtime_env": {}, "metadata": {"job_submission_id": "rayloop-retrain-x7k2p-abcde", "job_name": "n"}}',
     "rayloop-retrain-x7k2p-abcde"),
    (None, None), ("not json", None), ('{"metadata": null}', None)])
def test_a_retrain_job_names_itself_after_the_ray_job_it_runs_in(monkeypatch, config, expected):
    """The operator submits `rayloop.job` without --ray-job: the id comes from what Ray's job supervisor
    gives its driver (ray/dashboard/modules/job/job_supervisor.py), so audit events and the lease name it."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from rayloop import job as rayloop_job

    assert rayloop_job.JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR
    if config is None:
        monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, config)
    assert rayloop_job.own_submission_id() == expected


def test_training_cluster_scales_its_gpu_workers_from_zero(ray):
    cluster = ray["RayCluster"]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert [(g["groupName"], g["minReplicas"]) for g in cluster["workerGroupSpecs"]] == [("gpu", 0)]


def test_each_gpu_group_asks_for_a_gpu_and_tolerates_gpu_nodes(ray):
    gpu_groups = {f"{kind}/{name}": group for kind, resource in ray.items() if cluster_of(resource)
                  for name, group in groups(cluster_of(resource)).items() if name == "gpu"}
    assert set(gpu_groups) == {"RayService/gpu", "RayCluster/gpu"}
    for name, group in gpu_groups.items():
        pod = group["template"]["spec"]
        assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), name


# --- the cluster profile and what it points at -----------------------------------------------

def test_every_ray_container_gets_the_whole_cluster_profile(ray, profile):
    envs = {name: container_env(container, profile) for name, container in ray_containers(ray).items()}
    assert set(envs) == {"RayService/head", "RayService/cpu", "RayService/gpu", "RayCluster/head", "RayCluster/gpu"}
    for name, env in envs.items():
        assert PROFILE <= set(env), f"{name} lacks {PROFILE - set(env)}"
        assert {key for key in env if key.startswith("RAYLOOP_")} <= SETTING_NAMES, name
        assert not any("$(" in value for value in env.values()), f"{name}: a $(VAR) with no VAR"
    first = next(iter(envs.values()))
    assert all(env == first for env in envs.values()), "the clusters must share one registry, store and storage"
    database = first["RAYLOOP_DATABASE_URL"]
    assert database.startswith("postgresql+psycopg://") and "sqlite" not in database
    assert first["RAYLOOP_MLFLOW_URI"].startswith(("http://", "https://"))
    assert first["RAYLOOP_STORAGE_URI"] and first["RAYLOOP_RAY_ADDRESS"] == "auto"
    assert first["RAY_USAGE_STATS_ENABLED"] == "0"
    settings = load_settings(env={**first, "RAYLOOP_PARAMS": str(REPO / "params.yaml")})
    assert node_local(settings) == []  # what `rayloop up --cluster` demands: no state on one node's disk
    assert settings.storage_uri == first["RAYLOOP_STORAGE_URI"]
    # The training cluster's retrain moves the champion; the serving replicas pick it up themselves.
    assert 0 < settings.serve.follow_champion_s <= 60


def test_profile_is_a_configmap_of_strings_and_a_secret(manifests):
    configmap, secret = manifests["profile.yaml"]
    assert configmap["metadata"]["name"] == "rayloop-cluster-profile"
    assert all(isinstance(value, str) for value in configmap["data"].values())
    assert secret["type"] == "Opaque" and "POSTGRES_PASSWORD" in secret["stringData"]
    assert not PROFILE & set(secret["stringData"]), "the profile's plain values belong in the ConfigMap"


def test_clusters_declare_the_locked_ray_version(ray):
    for kind in ("RayService", "RayCluster"):
        assert cluster_of(ray[kind])["rayVersion"] == importlib.metadata.version("ray"), kind


def test_every_container_is_the_project_image_with_requests_and_limits(manifests, ray):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert IMAGE == compose["x-rayloop-image"]["image"]  # the image docker compose builds, same tag
    deployments = [doc for doc in manifests["services.yaml"] if doc["kind"] == "Deployment"]
    containers = {**ray_containers(ray), **{d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                                            for d in deployments}}
    for name, container in containers.items():
        assert container["image"] == IMAGE, name
        for side in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][side]), f"{name}: {side}"
    for kind in ("RayService", "RayCluster"):  # the autoscaler's sidecar
        assert {"requests", "limits"} <= set(cluster_of(ray[kind])["autoscalerOptions"]["resources"]), kind


def test_mlflow_and_postgres_are_the_services_the_profile_names(manifests, ray, profile):
    services = {doc["metadata"]["name"]: doc for doc in manifests["services.yaml"] if doc["kind"] == "Service"}
    env = container_env(ray_containers(ray)["RayService/head"], profile)
    mlflow_host, mlflow_port = re.match(r"https?://([^:/]+):(\d+)", env["RAYLOOP_MLFLOW_URI"]).groups()
    assert int(mlflow_port) in [p["port"] for p in services[mlflow_host]["spec"]["ports"]]
    db_host = re.match(r"postgresql\+psycopg://[^@]+@([^:/]+):5432/rayloop$", env["RAYLOOP_DATABASE_URL"])[1]
    assert services[db_host]["spec"]["type"] == "ExternalName"  # a managed database, not a pod of ours


def test_mlflow_server_serves_artifacts_as_the_compose_one_does(manifests, profile):
    [deployment] = [doc for doc in manifests["services.yaml"] if doc["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = container_env(container, profile)
    command = [expand(part, env) for part in container["command"]]
    assert command[:2] == ["mlflow", "server"] and not any("$(" in part for part in command)
    flags = dict(part.partition("=")[::2] for part in command[2:])
    assert flags["--backend-store-uri"].startswith("postgresql+psycopg://rayloop:")
    assert "--serve-artifacts" in flags and re.match(r"\w+://", flags["--artifacts-destination"])
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["mlflow"]
    compose_flags = dict(part.partition("=")[::2] for part in compose["command"][2:])
    assert set(compose_flags) <= set(flags)
    assert flags["--allowed-hosts"] == compose_flags["--allowed-hosts"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == compose["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]
