"""Promotion and rollback: moving the registry aliases champion / previous / challenger."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from cluster.settings import Settings
from train import registry

CHAMPION = registry.CHAMPION
CHALLENGER = "challenger"
PREVIOUS = "previous"


def alias_version(settings: Settings, alias: str) -> str | None:
    """Version holding an alias, or None."""
    client = registry.configure(settings)
    try:
        return str(client.get_model_version_by_alias(settings.registry.model_name, alias).version)
    except MlflowException:
        return None


def promote(settings: Settings, version: str) -> str | None:
    """Make `version` champion; the old champion keeps alias `previous`. Returns the old champion."""
    client = registry.configure(settings)
    name = settings.registry.model_name
    current = alias_version(settings, CHAMPION)
    if current == version:
        return current
    # `previous` first: a stop between the two writes leaves the old champion still serving.
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    return current


def rollback(settings: Settings) -> tuple[str, str]:
    """Put `previous` back as champion (the demoted one becomes `previous`); returns (from, to)."""
    current = alias_version(settings, CHAMPION)
    previous = alias_version(settings, PREVIOUS)
    if previous is None or current is None:
        raise ValueError("no previous champion to roll back to")
    client = registry.configure(settings)
    name = settings.registry.model_name
    client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, previous)
    return current, previous
