"""Training end to end on a real local Ray: Ray Train workers -> MLflow registry champion."""

import json
import re

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster.settings import load_settings
from train import registry
from train import train as train_module
from train.data import load_prepared
from train.pipeline import run_train
from train.transforms import to_tensor

pytestmark = pytest.mark.slow


def test_mnist_subset_with_two_workers_registers_a_champion(data_dir, monkeypatch, local_ray):
    monkeypatch.setenv("RAYLOOP_DATA_LIMIT", "1000")
    monkeypatch.setenv("RAYLOOP_TRAIN_EPOCHS", "3")
    monkeypatch.setenv("RAYLOOP_TRAIN_NUM_WORKERS", "2")
    settings = load_settings()

    summary = run_train(settings)

    assert summary["num_workers"] == 2 and summary["champion"] is True
    champion = registry.describe_champion(settings)
    assert champion["version"] == summary["model_version"]
    assert champion["metrics"]["test_accuracy"] > 0.5  # chance is 0.1
    assert champion["tags"]["data_version"] == load_prepared(settings.prepared_dir).meta.version

    # The registered model is usable by a client that only has pixels.
    model, version = registry.load_registered(settings)
    x_test, y_test = load_prepared(settings.prepared_dir).split("test")
    with torch.no_grad():
        accuracy = float((model(to_tensor(x_test)).argmax(1).numpy() == y_test).mean())
    assert version == summary["model_version"] and accuracy == pytest.approx(summary["test_accuracy"])

    # Per-epoch metrics, the evaluation report and the drift reference live with the run.
    client = MlflowClient()
    history = client.get_metric_history(champion["run_id"], "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    per_class = json.loads(open(mlflow.artifacts.download_artifacts(
        run_id=champion["run_id"], artifact_path="evaluation/per_class.json")).read())
    assert set(per_class) == {str(d) for d in range(10)}
    reference = registry.load_reference(champion["run_id"])  # validation and test: both held out
    counts = load_prepared(settings.prepared_dir).meta.counts
    assert len(reference) == counts["val"] + counts["test"]
    assert {"confidence", "predicted_class", "brightness", "emb_0"} <= set(reference.columns)

    # A second model is registered as a new version; the champion stays until a gate promotes. Its epoch is
    # capped at 2 steps, and it reads only the rows those steps train on (Ray Data would decode ahead). Its
    # validation target is met by the first epoch, so both workers stop there (3 epochs scheduled).
    monkeypatch.setenv("RAYLOOP_TRAIN_EPOCHS", "3")
    monkeypatch.setenv("RAYLOOP_TRAIN_MAX_STEPS", "2")
    monkeypatch.setenv("RAYLOOP_TRAIN_TARGET_VAL_ACCURACY", "0.01")
    built = []
    of = train_module.TrainingSets.of
    monkeypatch.setattr(train_module.TrainingSets, "of", lambda data, limit=None: built.append(of(data, limit))
                        or built[-1])
    second = run_train(load_settings())
    batch = load_settings().train.batch_size
    [sets] = built
    assert sets.train_rows == 2 * batch and sets.train.count() == 2 * batch
    assert int(second["model_version"]) == int(summary["model_version"]) + 1
    assert second["champion"] is False
    assert [m.step for m in client.get_metric_history(second["run_id"], "val_accuracy")] == [1]
    assert registry.describe_champion(settings)["version"] == summary["model_version"]


def test_rgb_image_folder_registers_model_with_folder_labels(data_dir, monkeypatch, rgb_folder, local_ray):
    monkeypatch.setenv("RAYLOOP_DATASET", str(rgb_folder))
    monkeypatch.setenv("RAYLOOP_TRAIN_EPOCHS", "3")
    monkeypatch.setenv("RAYLOOP_TRAIN_NUM_WORKERS", "1")  # DDP across workers: test_mnist_subset_...
    monkeypatch.setenv("RAYLOOP_TRAIN_BATCH_SIZE", "16")
    settings = load_settings()

    summary = run_train(settings)

    model, _ = registry.load_registered(settings)
    assert model.classes == ["apple", "leaf", "sky"]
    assert model.arch == "resnet18" and model.channels == 3
    assert json.loads(registry.describe_champion(settings)["tags"]["classes"]) == ["apple", "leaf", "sky"]
    assert summary["test_accuracy"] > 1 / 3 + 0.1  # better than chance on colours it never saw before
    probabilities = model.infer(torch.rand(2, 3, model.image_size, model.image_size))["probabilities"]
    assert np.allclose(probabilities.sum(1).numpy(), 1.0, atol=1e-5)


def test_photos_at_native_size_train_and_retrain_through_ray_data(data_dir, monkeypatch, tmp_path, local_ray, capsys):
    """A photo folder the repo has never seen (227 px JPEGs, made here) trained at its own size, then retrained
    on feedback images read from files: every pixel streamed through Ray Data, none held as a dataset."""
    from simulation.photos import make_photo_folder
    from tune.retrain import FeedbackSamples, retrain

    # 40 per class: both classes in every split (4 + 5 test images); only 0 < accuracy <= 1 is asserted.
    make_photo_folder(tmp_path / "cracks", per_class=40, size=227)
    monkeypatch.setenv("RAYLOOP_DATASET", str(tmp_path / "cracks"))
    monkeypatch.setenv("RAYLOOP_MODEL_ARCH", "mobilenet_v3_small")
    monkeypatch.setenv("RAYLOOP_TRAIN_EPOCHS", "1")
    monkeypatch.setenv("RAYLOOP_TRAIN_BATCH_SIZE", "32")
    monkeypatch.setenv("RAYLOOP_TUNE_NUM_SAMPLES", "1")
    monkeypatch.setenv("RAYLOOP_TUNE_EPOCHS", "1")
    monkeypatch.setenv("RAYLOOP_TUNE_BATCH_SIZES", "32")
    monkeypatch.setenv("RAYLOOP_TRAIN_STEP_MEMORY_MB", "64")  # batches of 32 at 224 px go in micro-batches
    settings = load_settings()

    summary = run_train(settings)

    assert re.search(r"batches of 32 run as micro-batches of \d+ \(train.step_memory_mb=64", capsys.readouterr().out)

    data = load_prepared(settings.prepared_dir)
    assert data.meta.image_size == 224 and data.meta.channels == 3  # the median short side, capped
    assert (settings.prepared_dir / "manifest.csv").is_file() and not list(settings.prepared_dir.glob("*.npz"))
    assert summary["data_version"] == data.meta.version
    model, _ = registry.load_registered(settings)
    assert (model.arch, model.image_size, model.classes) == ("mobilenet_v3_small", 224, ["negative", "positive"])
    assert 0.0 < summary["test_accuracy"] <= 1.0
    assert summary["num_workers"] == 0  # auto on one CPU node: Ray Train's local mode, in this process
    champion = registry.describe_champion(settings)
    assert champion["tags"]["data_version"] == data.meta.version
    logged = mlflow.artifacts.download_artifacts(run_id=champion["run_id"], artifact_path="data/manifest.csv")
    assert open(logged).read() == (settings.prepared_dir / "manifest.csv").read_text()

    make_photo_folder(tmp_path / "new", per_class=40, size=240, seed=7)
    files = sorted((tmp_path / "new").rglob("*.jpg"))
    feedback = FeedbackSamples([f"fb-{i}" for i in range(len(files))], [str(p) for p in files],
                               np.array([0 if p.parent.name == "negative" else 1 for p in files]))
    events = []
    result = retrain(settings, feedback, trigger="manual", audit=lambda name, details: events.append(name))

    assert result.trials[0]["error"] is None and result.trials[0]["epochs"] == 1
    assert result.gate.holdout_size == result.feedback["holdout"] > 0
    assert result.gate.champion_holdout is not None and result.gate.challenger_holdout is not None
    assert events[:3] == ["retrain_started", "trials_finished", "gate_decision"]
    if result.promoted:
        challenger, _ = registry.load_registered(settings, result.challenger_version)
        assert challenger.image_size == 224
    else:  # a losing challenger keeps its MLflow run, not its registry version and model files (retention)
        with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
            registry.load_registered(settings, result.challenger_version)
        reference = registry.load_reference(registry.describe_champion(settings)["run_id"])
        assert len(reference) == data.meta.counts["val"] + data.meta.counts["test"]
