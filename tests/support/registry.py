"""A model in the MLflow registry without training one."""

from __future__ import annotations

from tests.support.images import CLASSES


def register_tiny_model(settings, accuracy: str = "0.1", reference_rows: int = 16) -> str:
    """An untrained small CNN logged and registered like run_train does (champion if first); its version.
    Its drift reference: `reference_rows` random images, with whether it got each right (as finalize keeps)
    against random labels, so that from 50 rows the monitor can estimate its accuracy."""
    import mlflow
    import torch

    from train import registry
    from train.features import CORRECT_COLUMN, feature_frame
    from train.model import ImageClassifier

    registry.configure(settings)
    torch.manual_seed(int(float(accuracy) * 100))
    model = ImageClassifier("cnn", CLASSES, channels=1, image_size=28).eval()
    reference = feature_frame(model, torch.rand(reference_rows, 1, 28, 28))
    labels = torch.randint(len(CLASSES), (reference_rows,)).numpy()
    reference[CORRECT_COLUMN] = (reference["predicted_class"].to_numpy() == [CLASSES[i] for i in labels]) * 1.0
    with mlflow.start_run(run_name="tiny"):
        registered = registry.log_and_register(settings, model, reference, {
            "test_accuracy": accuracy, "data_version": "tiny-v1", "trained_at": "2026-01-01T00:00:00+00:00",
            "arch": "cnn", "classes": ",".join(CLASSES)})
    return registered.version
