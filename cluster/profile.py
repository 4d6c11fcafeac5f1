"""The cluster profile: settings under which no state is node-local, so a replica, a trial or a job on any
node finds the same registry, store, images and results (docs/deploy.md). A pure check over settings."""

from __future__ import annotations

from cluster import storage
from cluster.settings import Settings

DOCS = "docs/deploy.md#the-cluster-profile"


def node_local(settings: Settings) -> list[str]:
    """What would live on one node's disk under these settings; [] when nothing does."""
    problems = []
    if not settings.mlflow_uri.startswith(("http://", "https://")):
        problems.append(f"MLflow's store is {settings.mlflow_uri}, a file on one node: set RAYLOOP_MLFLOW_URI to a "
                        "tracking server every node reaches, started with --serve-artifacts")
    if settings.database_url.startswith("sqlite"):
        problems.append(f"the store is {settings.database_url}, a file on one node: set RAYLOOP_DATABASE_URL to "
                        "PostgreSQL (postgresql+psycopg://user:password@host:5432/rayloop)")
    if not settings.storage_uri:
        problems.append(f"image blobs, drift reports and Ray results would go under {settings.data_dir}: set "
                        "RAYLOOP_STORAGE_URI to s3://bucket/prefix or a folder every node mounts")
    elif not storage.is_uri(settings.storage_uri) and \
            storage.filesystem(settings.storage_uri)[1].startswith(f"{settings.data_dir}/"):
        problems.append(f"RAYLOOP_STORAGE_URI={settings.storage_uri} is inside the node-local data dir "
                        f"{settings.data_dir}")
    return problems


class NotClusterReady(Exception):
    """Settings that would keep state on one node, refused by `rayloop up --cluster`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("state would be node-local:\n" + "\n".join(f"  - {p}" for p in problems)
                         + f"\nSee {DOCS}.")


def local_artifacts(settings: Settings, artifact_location: str) -> str | None:
    """The problem with an MLflow experiment's artifact location on a cluster, if any: a file path is one
    node's disk (the server was started without --serve-artifacts, or the experiment predates it), unless it
    is inside the shared storage folder."""
    if artifact_location.startswith(("mlflow-artifacts:", "s3://", "gs://", "wasbs://", "hdfs://")):
        return None
    shared = settings.storage_uri and not storage.is_uri(settings.storage_uri)
    if shared and storage.filesystem(artifact_location)[1].startswith(storage.filesystem(settings.storage_uri)[1]):
        return None
    return (f"the MLflow experiment keeps its artifacts at {artifact_location}, a path on one node: start the "
            "tracking server with --serve-artifacts --artifacts-destination <shared storage> (an experiment "
            "created before keeps its location: use a new experiment name, registry.experiment)")
