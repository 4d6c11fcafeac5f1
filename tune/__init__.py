"""Retraining with Ray Tune and the champion/challenger gate."""

import cluster  # noqa: F401,E402 - sets Ray's auth mode (RAY_AUTH_MODE) before anything here imports ray
