"""Settings: one typed object, params.yaml defaults, RAYLOOP_* overrides, clear errors."""

import pytest
import yaml

from cluster.settings import load_settings
from tests.support.paths import REPO


def test_built_in_defaults_match_params_yaml(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults only
    built_in = load_settings(env={})
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in params.items():
        for key, value in values.items():
            assert getattr(getattr(built_in, section), key) == value, f"{section}.{key}"


def test_env_overrides_params_and_derives_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    settings = load_settings(env={"RAYLOOP_DATA_DIR": str(tmp_path), "RAYLOOP_TRAIN_EPOCHS": "3",
                                  "RAYLOOP_TRAIN_AUGMENT": "false", "RAYLOOP_DATASET": "/imgs",
                                  "RAYLOOP_RAY_ADDRESS": "10.0.0.1:6379"})
    assert settings.train.epochs == 3
    assert settings.train.augment is False
    assert settings.data.dataset == "/imgs"
    assert settings.ray_address == "10.0.0.1:6379"
    assert settings.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert settings.database_url == f"sqlite:///{tmp_path}/rayloop.db"


def test_bad_values_are_named_in_the_error(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="RAYLOOP_TRAIN_EPOCHS"):
        load_settings(env={"RAYLOOP_TRAIN_EPOCHS": "many"})


def test_unknown_params_key_is_rejected(monkeypatch, tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochz: 3\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="epochz"):
        load_settings(env={})



def test_to_env_rebuilds_the_same_settings_elsewhere(monkeypatch, tmp_path):
    from cluster.settings import to_env

    monkeypatch.chdir(REPO)
    original = load_settings(env={"RAYLOOP_DATA_DIR": str(tmp_path), "RAYLOOP_TRAIN_EPOCHS": "5",
                                  "RAYLOOP_TRAIN_AUGMENT": "false", "RAYLOOP_MONITOR_INTERVAL_S": "2.5"})
    monkeypatch.chdir(tmp_path)  # another working directory, no params.yaml
    rebuilt = load_settings(env=to_env(original))
    assert rebuilt == original
