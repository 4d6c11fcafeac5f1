"""Training: datasets, transforms, models, the Ray Train loop, evaluation, MLflow registry."""

import cluster  # noqa: F401,E402 - sets Ray's auth mode (RAY_AUTH_MODE) before anything here imports ray
