"""Cluster: settings, the rayloop CLI, local Ray and background services."""

import os

# Ray 2.60 guards clusters with a token, but only a process whose environment says so sends it, and
# Ray reads the mode when it is imported: so before anything imports ray, one mode for the local head,
# our CLI, jobs and tests (`ray` CLI users: export RAY_AUTH_MODE=token).
os.environ.setdefault("RAY_AUTH_MODE", "token")
