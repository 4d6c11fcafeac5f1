"""Drift detection with Evidently, triggers and metrics."""

import cluster  # noqa: F401,E402 - sets Ray's auth mode (RAY_AUTH_MODE) before anything here imports ray
