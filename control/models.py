"""The serving side's window on the registry: which version an alias names, the champion, loading a version."""

from __future__ import annotations

from cluster.settings import Settings
from train import registry

CHAMPION = registry.CHAMPION


def champion(settings: Settings) -> dict | None:
    """The champion's name, version, metrics and provenance, or None before the first training."""
    return registry.describe_champion(settings)


def resolve(settings: Settings, alias_or_version: str) -> str:
    """The version number an alias names (a number is returned as is)."""
    return registry.resolve_version(settings, alias_or_version)


def load(settings: Settings, alias_or_version: str) -> tuple:
    """(model, version): a registered version as a train.model.ImageClassifier on the CPU, and its number."""
    return registry.load_registered(settings, alias_or_version)


def reference(run_id: str):
    """The drift reference table logged with a model's run (a pandas DataFrame)."""
    return registry.load_reference(run_id)


def calibration(run_id: str, name: str) -> dict | None:
    """A drift calibration stored with a model's run (monitoring/thresholds.py), or None."""
    return registry.load_run_json(run_id, name)


def save_calibration(run_id: str, name: str, value: dict) -> None:
    """Store a drift calibration with the model's run, beside the reference it was fitted on."""
    registry.log_run_json(run_id, name, value)
