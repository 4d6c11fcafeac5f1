"""Ray Serve application: HTTP ingress and the batched classifier."""

import cluster  # noqa: F401 - sets Ray's auth mode (RAY_AUTH_MODE) before anything here imports ray
