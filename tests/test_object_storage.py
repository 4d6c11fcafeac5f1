"""A dataset in an S3 bucket: listed, versioned, trained on and evaluated through the same pyarrow and
Ray Data path as a local folder.

The bucket is served by moto's S3 server (the S3 HTTP API, in a process of its own); the photos exist
nowhere else once uploaded, so every pixel the run sees was read over S3 by the driver or a Ray Data task.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient

from cluster.ray_cluster import free_port
from cluster.settings import DataSettings, load_settings
from simulation.photos import make_photo_folder
from store import BlobStore
from train.data import load_prepared, prepare

pytestmark = pytest.mark.slow  # each module run starts an S3 server process

BUCKET = "team-photos"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rayloop-test", "AWS_SECRET_ACCESS_KEY": "rayloop-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """host:port of a running S3 server. Its credentials go into this process's environment before the
    module's Ray starts: Ray's workers inherit the raylet's environment, as they would an instance role's."""
    port = free_port()
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError as exc:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto's S3 server did not start (see {log.name})") from exc
            time.sleep(0.2)
    patch = pytest.MonkeyPatch()
    for name, value in CREDENTIALS.items():
        patch.setenv(name, value)
    yield f"127.0.0.1:{port}"
    patch.undo()
    server.terminate()
    server.wait(10)
    log.close()


def bucket_fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True,
                             access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                             secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region="us-east-1")


def upload(folder: Path, endpoint: str, prefix: str) -> str:
    """Copy folder into the bucket under prefix, delete the local copy; returns the dataset URI."""
    fs = bucket_fs(endpoint)
    fs.create_dir(BUCKET)
    pafs.copy_files(str(folder), f"{BUCKET}/{prefix}", destination_filesystem=fs)
    shutil.rmtree(folder)
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def test_a_bucket_folder_is_listed_split_and_versioned_like_a_local_one(tmp_path, s3_endpoint):
    counts = make_photo_folder(tmp_path / "cracks", per_class=12, size=64)
    uri = upload(tmp_path / "cracks", s3_endpoint, "listing")

    data = prepare(DataSettings(dataset=uri), tmp_path / "a")

    assert data.meta.classes == ["negative", "positive"] and data.meta.channels == 3
    assert data.meta.image_size == 64 and sum(data.meta.counts.values()) == sum(counts.values())
    assert data.manifest["path"].str.startswith(("negative/", "positive/")).all()  # relative to the prefix
    assert (data.manifest["bytes"] > 0).all()
    x, y = data.split("test")  # decoded from the bucket, in this process
    assert x.shape[1:] == (64, 64, 3) and x.dtype.name == "uint8" and len(x) == len(y) > 0
    assert prepare(DataSettings(dataset=uri), tmp_path / "b").meta.version == data.meta.version

    fs = bucket_fs(s3_endpoint)
    victim = f"{BUCKET}/listing/{data.manifest['path'].iloc[0]}"
    with fs.open_input_stream(victim) as handle:
        original = handle.read()
    with fs.open_output_stream(victim) as handle:  # same name, one more byte: a changed file
        handle.write(original + b"\0")
    assert prepare(DataSettings(dataset=uri), tmp_path / "c").meta.version != data.meta.version


def test_missing_bucket_prefix_is_a_clear_error(tmp_path, s3_endpoint):
    bucket_fs(s3_endpoint).create_dir(BUCKET)
    uri = f"s3://{BUCKET}/nothing-here?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        prepare(DataSettings(dataset=uri), tmp_path / "out")


def test_rayloop_trains_and_registers_from_a_bucket_through_ray_data(data_dir, monkeypatch, tmp_path, s3_endpoint,
                                                                     local_ray):
    from train import registry
    from train.pipeline import run_train

    make_photo_folder(tmp_path / "cracks", per_class=60, size=96)
    uri = upload(tmp_path / "cracks", s3_endpoint, "training")
    monkeypatch.setenv("RAYLOOP_DATASET", uri)
    monkeypatch.setenv("RAYLOOP_MODEL_ARCH", "cnn")
    monkeypatch.setenv("RAYLOOP_TRAIN_EPOCHS", "2")
    monkeypatch.setenv("RAYLOOP_TRAIN_BATCH_SIZE", "32")
    settings = load_settings()

    summary = run_train(settings)

    data = load_prepared(settings.prepared_dir)
    assert data.meta.root == uri and sum(data.meta.counts.values()) == 120 and data.meta.image_size == 96
    assert summary["num_workers"] == 0 and 0.0 < summary["test_accuracy"] <= 1.0
    champion = registry.describe_champion(settings)
    assert champion["tags"]["data_version"] == data.meta.version
    # Every training image of every epoch was read from the bucket by a Ray Data task (an unreadable file
    # would be dropped with a note, not fail the run), and every validation image by the driver's pass.
    trained = [m.value for m in MlflowClient().get_metric_history(champion["run_id"], "train_images")]
    assert trained == [data.meta.counts["train"] // 32 * 32] * 2
    assert len(registry.load_reference(champion["run_id"])) == data.meta.counts["val"] + data.meta.counts["test"]
    model, _ = registry.load_registered(settings)
    assert (model.arch, model.image_size, model.classes) == ("cnn", 96, ["negative", "positive"])
    assert not (tmp_path / "cracks").exists()  # the bucket held the only copy


def test_shared_storage_in_a_bucket_holds_blobs_reports_and_ray_results(tmp_path, s3_endpoint):
    """The cluster profile's RAYLOOP_STORAGE_URI as an S3 prefix: the store's images, the drift reports and
    Ray's results all go through it, and nothing lands under the node's data dir."""
    from cluster import storage
    from store import Store

    bucket_fs(s3_endpoint).create_dir(BUCKET)
    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path / "data"),
                              "RAYLOOP_STORAGE_URI": f"s3://{BUCKET}/shared?endpoint_override={s3_endpoint}"
                                                     "&scheme=http&region=us-east-1"})
    store = Store(f"sqlite:///{tmp_path / 'rayloop.db'}", settings.blob_root)
    try:
        image = b"\x89PNG an image"
        key = store.blobs.put(image)
        assert store.blobs.exists(key) and store.blobs.get(key) == image
        assert bucket_fs(s3_endpoint).get_file_info(f"{BUCKET}/shared/blobs/{key[:2]}/{key[2:]}").size == len(image)
        assert store.blobs.delete(key) and not store.blobs.exists(key) and not store.blobs.delete(key)
    finally:
        store.close()

    where = storage.write(settings.reports_root, "20260101T000000000000Z.html", b"<html>report</html>")
    assert where.startswith(f"s3://{BUCKET}/shared/drift/20260101T000000000000Z.html?endpoint_override=")
    assert storage.read(settings.reports_root, "20260101T000000000000Z.html") == b"<html>report</html>"
    assert storage.read(settings.reports_root, "missing.html") is None
    assert storage.names(settings.reports_root) == ["20260101T000000000000Z.html"]

    ray_args = storage.ray_storage(settings.ray_storage)
    assert ray_args["storage_path"] == f"{BUCKET}/shared/ray_results"
    assert isinstance(ray_args["storage_filesystem"], pafs.S3FileSystem)
    for name in ("retrain-1", "retrain-1-trial_00000", "retrain-10"):
        storage.write(storage.join(settings.ray_storage, name), "checkpoint.pt", b"weights")
    assert storage.delete_below(settings.ray_storage, "retrain-1") == 2  # the run and its trial, not retrain-10
    assert [i.base_name for i in bucket_fs(s3_endpoint).get_file_info(
        pafs.FileSelector(f"{BUCKET}/shared/ray_results"))] == ["retrain-10"]
    assert not (tmp_path / "data").exists()



def test_an_image_is_stored_again_after_its_folder_was_removed_behind_the_store(tmp_path):
    """The blob store remembers the folders it made (no mkdir per image); a wiped folder is made again."""
    blobs = BlobStore(tmp_path / "blobs")
    key = blobs.put(b"first image")
    shutil.rmtree(tmp_path / "blobs")

    assert blobs.put(b"first image") == key and blobs.get(key) == b"first image"
    assert [p.name for p in (tmp_path / "blobs" / key[:2]).iterdir()] == [key[2:]]  # no partial file left
