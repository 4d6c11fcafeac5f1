"""MLflow: tracking runs and the model registry. The only code that reads or moves the aliases."""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cluster.settings import Settings  # noqa: E402
from train.evaluate import Evaluation  # noqa: E402
from train.factory import Model  # noqa: E402
from train.seg_evaluate import MaskEvaluation  # noqa: E402
from train.tasks import task_of  # noqa: E402

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"
REFERENCE_ARTIFACT = "drift/reference_features.csv"


@dataclass
class RegisteredModel:
    """A model version in the registry."""

    name: str
    version: str
    run_id: str
    is_champion: bool


def artifact_location(settings: Settings) -> str | None:
    """Where a new experiment keeps its artifacts. A tracking server decides itself (with --serve-artifacts
    it proxies them, so no client needs the artifact store's disk or credentials); an embedded store keeps
    them under the data dir."""
    if settings.mlflow_uri.startswith(("http://", "https://")):
        return None
    artifacts = settings.data_dir / "mlartifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts.resolve().as_uri()


def configure(settings: Settings) -> MlflowClient:
    """Point MLflow at the settings' store and make sure the experiment exists with our artifact root."""
    mlflow.set_tracking_uri(settings.mlflow_uri)
    mlflow.set_registry_uri(settings.mlflow_uri)
    name = settings.registry.experiment
    if mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=artifact_location(settings))
        except MlflowException:
            pass  # created by a concurrent process meanwhile
    mlflow.set_experiment(name)
    return MlflowClient()


def configure_ahead(settings: Settings) -> MlflowClient:
    """configure(), plus the installed-packages map MLflow builds on a process's first log_model (to check
    the model's pinned requirements against this environment): 1.5 s here, for a background thread."""
    client = configure(settings)
    from mlflow.utils import requirements_utils

    warm = getattr(requirements_utils, "_init_modules_to_packages_map", None)  # private: absent is fine
    if warm is not None:
        warm()
    return client


def log_training(history: list[dict], params: dict, evaluation: Evaluation | MaskEvaluation,
                 extra: dict[str, float]) -> None:
    """Params, per-epoch metrics, test metrics, per-class report and confusion matrix of the active run (for
    segmentation: mIoU, IoU, Dice, pixel accuracy, crack area and length errors, per-class IoU and examples)."""
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    for row in history:
        step = int(row["epoch"])
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)
    mlflow.log_metrics({"test_accuracy": evaluation.accuracy, **extra})
    evaluation.log_mlflow("test")


def log_and_register(settings: Settings, model: Model, reference: pd.DataFrame,
                     tags: dict[str, str], alias: str | None = None) -> RegisteredModel:
    """Log the model (signature + example) with its drift reference, register it, crown it if first.

    Refuses (ValueError) a model of another task than the champion's: a segmenter cannot challenge a classifier.
    """
    name = settings.registry.model_name
    check_same_task(MlflowClient(), name, task_of(model).name)
    example = torch.rand(2, model.channels, model.image_size, model.image_size)
    with torch.no_grad():
        logits = model(example).numpy()
    signature = infer_signature(example.numpy(), logits)
    info = mlflow.pytorch.log_model(
        model, name="model", signature=signature, input_example=example.numpy(),
        registered_model_name=name,
        # Pickled (not torch.export'ed) so infer(), classes and the drift axes come back with it.
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                          f"torchvision=={importlib.metadata.version('torchvision').split('+')[0]}"],
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(REFERENCE_ARTIFACT).name
        reference.to_csv(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(REFERENCE_ARTIFACT).parent))
    mlflow.log_dict({"classes": model.classes}, "model_meta/classes.json")
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version)
    crowned = champion_version(client, name) is None
    if crowned:
        client.set_registered_model_alias(name, CHAMPION, version)
    return RegisteredModel(name, version, mlflow.active_run().info.run_id, crowned)


def check_same_task(client: MlflowClient, name: str, task: str) -> None:
    """Raise when the registered model's champion was trained for another task (a version without a task tag
    is a classifier: it predates segmentation)."""
    version = champion_version(client, name)
    if version is None:
        return
    theirs = client.get_model_version(name, version).tags.get("task", "classification")
    if theirs != task:
        raise ValueError(f"registered model {name!r}: its champion (version {version}) is a {theirs} model and "
                         f"this one is for {task}; set registry.model_name in params.yaml to another name "
                         f"for the {task} models, or use another data dir")


def discard(settings: Settings, version: str) -> str | None:
    """A challenger that failed the gate: its registry version goes and its model files are deleted; the run,
    with its metrics, tags and drift reference, stays. Returns where the files were (None when gone)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = MlflowClient()
    name = settings.registry.model_name
    model = client.get_model_version(name, version)
    # MLflow 3 registers a logged model: the version's source is models:/<model id> (model_id is not always set).
    model_id = model.model_id or (model.source.split("/", 1)[1] if model.source.startswith("models:/m-") else None)
    location = client.get_logged_model(model_id).artifact_location if model_id else None
    client.delete_model_version(name, version)  # its aliases (challenger) go with it
    if location:
        get_artifact_repository(location).delete_artifacts()
    return location


def version_holding(client: MlflowClient, name: str, alias: str) -> str | None:
    """Version number holding an alias, or None."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def champion_version(client: MlflowClient, name: str) -> str | None:
    """Version number holding the champion alias, or None."""
    return version_holding(client, name, CHAMPION)


def alias_version(settings: Settings, alias: str) -> str | None:
    """Version number holding an alias of the settings' model, or None."""
    return version_holding(configure(settings), settings.registry.model_name, alias)


def resolve_version(settings: Settings, alias_or_version: str) -> str:
    """Version number behind an alias (a number is returned as is); raises MlflowException when none holds it."""
    if alias_or_version.isdigit():
        return alias_or_version
    return str(configure(settings).get_model_version_by_alias(settings.registry.model_name, alias_or_version).version)


def promote(settings: Settings, version: str) -> str | None:
    """Make `version` champion; the old champion keeps alias `previous`. Returns the old champion."""
    client = configure(settings)
    name = settings.registry.model_name
    current = champion_version(client, name)
    if current == version:
        return current
    # `previous` first: a stop between the two writes leaves the old champion still serving.
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    return current


def rollback(settings: Settings) -> tuple[str, str]:
    """Put `previous` back as champion (the demoted one becomes `previous`); returns (from, to)."""
    client = configure(settings)
    name = settings.registry.model_name
    current, previous = champion_version(client, name), version_holding(client, name, PREVIOUS)
    if previous is None or current is None:
        raise ValueError("no previous champion to roll back to")
    client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, previous)
    return current, previous


def describe_champion(settings: Settings) -> dict | None:
    """Champion's name, version, metrics and provenance, or None when there is none yet."""
    client = configure(settings)
    name = settings.registry.model_name
    version = champion_version(client, name)
    if version is None:
        return None
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    return {"name": name, "version": version, "run_id": mv.run_id, "tags": dict(mv.tags),
            "metrics": dict(run.data.metrics), "created": mv.creation_timestamp}


def load_reference(run_id: str) -> pd.DataFrame:
    """The drift reference table logged with a model's run."""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT)
    return pd.read_csv(path, dtype={"predicted_class": str})


def load_registered(settings: Settings, alias_or_version: str = CHAMPION) -> tuple[Model, str]:
    """Load models:/<name>@alias (or /version) as a torch module; returns (model, version)."""
    version = resolve_version(settings, alias_or_version)
    model = mlflow.pytorch.load_model(f"models:/{settings.registry.model_name}/{version}", map_location="cpu")
    return model.eval(), version


def write_json(path: Path, value: dict) -> None:
    """Pretty JSON file, parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def load_run_json(run_id: str, artifact_path: str) -> dict | None:
    """A JSON artifact of a run, or None when the run has none at that path."""
    folder = str(Path(artifact_path).parent)
    if artifact_path not in {f.path for f in MlflowClient().list_artifacts(run_id, folder)}:
        return None
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_path}")


def log_run_json(run_id: str, artifact_path: str, value: dict) -> None:
    """Add a JSON artifact to a run (finished runs included): what belongs with the run's model."""
    MlflowClient().log_dict(run_id, value, artifact_path)
