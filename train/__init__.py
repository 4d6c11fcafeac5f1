"""Training: datasets, transforms, models, the Ray Train loop, evaluation, MLflow registry."""
