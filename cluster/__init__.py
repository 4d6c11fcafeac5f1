"""Cluster: settings, the rayloop CLI, local Ray and background services."""

import os

# Ray 2.60 guards clusters with a token, but only a process whose environment says so sends it, and
# Ray reads the mode when it is imported: so before anything imports ray, one mode for the local head,
# our CLI, jobs and tests (`ray` CLI users: export RAY_AUTH_MODE=token).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ray Train gives a worker group 60 s to start; on a busy small machine (2 cores shared with Serve
# replicas, the monitor and a Tune trial) starting a torch worker process takes longer, and the run
# failed with WorkerGroupStartupTimeoutError. Processes Ray starts inherit this environment.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
