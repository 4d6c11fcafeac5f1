"""The cluster profile check and the shared-storage helpers it relies on (no Ray, no servers)."""

from __future__ import annotations

import argparse

import pytest

from cluster import profile, storage
from cluster.settings import load_settings, to_env

CLUSTER = {"RAYLOOP_MLFLOW_URI": "http://head:5000",
           "RAYLOOP_DATABASE_URL": "postgresql+psycopg://rayloop:secret@head:5432/rayloop",
           "RAYLOOP_STORAGE_URI": "s3://team-bucket/rayloop"}


def test_the_embedded_defaults_are_node_local_and_each_reason_says_what_to_set(tmp_path):
    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path)})
    problems = profile.node_local(settings)
    assert len(problems) == 3
    for variable, problem in zip(["RAYLOOP_MLFLOW_URI", "RAYLOOP_DATABASE_URL", "RAYLOOP_STORAGE_URI"], problems):
        assert variable in problem


def test_a_tracking_server_postgresql_and_shared_storage_pass(tmp_path):
    assert profile.node_local(load_settings({"RAYLOOP_DATA_DIR": str(tmp_path), **CLUSTER})) == []
    shared_folder = {**CLUSTER, "RAYLOOP_STORAGE_URI": str(tmp_path / "nfs" / "rayloop")}
    assert profile.node_local(load_settings({"RAYLOOP_DATA_DIR": str(tmp_path / "data"), **shared_folder})) == []


def test_shared_storage_inside_the_node_local_data_dir_is_refused(tmp_path):
    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path), **CLUSTER,
                              "RAYLOOP_STORAGE_URI": str(tmp_path / "shared")})
    [problem] = profile.node_local(settings)
    assert "inside the node-local data dir" in problem


@pytest.mark.parametrize("location, local", [
    ("mlflow-artifacts:/1", False), ("s3://bucket/mlartifacts/1", False),
    ("file:///srv/rayloop/data/mlartifacts", True), ("/srv/rayloop/data/mlartifacts", True),
    ("file:///mnt/shared/mlartifacts/1", False),
])
def test_experiment_artifacts_must_be_proxied_or_shared(location, local):
    settings = load_settings({"RAYLOOP_DATA_DIR": "/srv/rayloop/data", **CLUSTER,
                              "RAYLOOP_STORAGE_URI": "/mnt/shared"})
    assert (profile.local_artifacts(settings, location) is not None) == local


def test_shared_locations_follow_the_storage_uri_and_keep_its_query(tmp_path):
    embedded = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path)})
    assert embedded.blob_root == str(tmp_path / "blobs") and embedded.ray_storage == str(tmp_path / "ray_results")
    uri = "s3://b/p?endpoint_override=minio:9000&scheme=http"
    shared = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path), "RAYLOOP_STORAGE_URI": uri})
    assert shared.blob_root == "s3://b/p/blobs?endpoint_override=minio:9000&scheme=http"
    assert shared.reports_root == "s3://b/p/drift?endpoint_override=minio:9000&scheme=http"
    assert load_settings(to_env(shared)).storage_uri == uri  # a job or a container rebuilds the same


def test_local_storage_writes_lists_reads_and_deletes(tmp_path):
    folder = str(tmp_path / "reports")
    assert storage.names(folder) == [] and storage.read(folder, "a.html") is None
    assert storage.write(folder, "b.html", b"two") == f"{folder}/b.html"
    storage.write(folder, "a.html", b"one")
    assert storage.names(folder) == ["a.html", "b.html"] and storage.read(folder, "b.html") == b"two"
    (tmp_path / "secret").write_bytes(b"not a report")
    (tmp_path / "reports" / "link.html").symlink_to(tmp_path / "secret")
    assert storage.read(folder, "link.html") is None  # a link out of the folder is not followed
    storage.delete(folder, "a.html")
    storage.delete(folder, "a.html")  # already gone: fine
    assert storage.names(folder) == ["b.html", "link.html"]


def test_a_runs_results_and_its_trials_are_deleted_and_nothing_else(tmp_path):
    for name in ["retrain-1", "retrain-1-trial_a", "retrain-12", "train-1"]:
        (tmp_path / name / "checkpoint_000").mkdir(parents=True)
    assert storage.delete_below(str(tmp_path), "retrain-1") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrain-12", "train-1"]
    assert storage.delete_below(str(tmp_path / "missing"), "x") == 0


def test_rayloop_up_cluster_refuses_node_local_settings_before_starting_anything(tmp_path, capsys):
    from rayloop.lifecycle import cmd_up

    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path / "data")})
    args = argparse.Namespace(cluster=True, no_ui=True, monitoring=False, started_at=0.0)
    assert cmd_up(settings, args) == 2
    err = capsys.readouterr().err
    assert "state would be node-local" in err and "RAYLOOP_STORAGE_URI" in err and "docs/deploy.md" in err
    assert not (tmp_path / "data" / "run").exists()  # no service was started
