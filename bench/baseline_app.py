"""Benchmark baseline: plain FastAPI doing rayloop's decode + champion forward pass, nothing else (and, for a
segmentation model, the same mask fields rayloop answers with: train.tasks.segmentation.mask_fields).

Run by bench/serve.py as `uvicorn bench.baseline_app:app --workers 2`; each worker loads
the champion from MLflow (RAYLOOP_MLFLOW_URI) once at start-up.
"""

from __future__ import annotations

from cluster import environment

environment.apply()  # serve.classifier imports ray

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastapi import FastAPI, File, HTTPException, UploadFile  # noqa: E402

from cluster.settings import load_settings  # noqa: E402
from serve import images  # noqa: E402
from serve.classifier import load, run  # noqa: E402
from train.tasks.segmentation import mask_fields  # noqa: E402

settings = load_settings()
torch.set_num_threads(1)  # one process per core: intra-op threads would only fight each other
loaded = load(settings, "champion", torch.device("cpu"))
app = FastAPI(title="rayloop benchmark baseline")


@app.post("/v1/predict")
def predict(file: UploadFile = File(...)) -> dict:
    """Same validation, decode and forward pass as rayloop, one image per forward pass, no logging; a
    segmentation model's answer also has the mask at the image's size and its area, as rayloop's has."""
    channels, size, _ = loaded.input_shape
    data = file.file.read()
    try:
        pixels = images.prepare(data, size, channels, settings.serve.max_upload_bytes, settings.serve.max_pixels)
    except images.ImageRejected as exc:
        raise HTTPException(413 if exc.too_large else 400, exc.detail) from None
    result = run(loaded, pixels[np.newaxis])[0]
    segmentation = mask_fields(result["mask"], data) if "mask" in result else {}
    return {**{k: result[k] for k in ("label", "confidence", "probabilities", "model_version")}, **segmentation}
