"""The process environment Ray needs, set by each entry point before anything imports ray.

Ray reads some settings once, when it loads (the auth mode), and processes Ray starts inherit the
environment of the one that started them: so the CLI, the retrain job, the Serve app builder, the
demo, the tests and the benchmarks each call `apply()` first, and no `import` changes it.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {
    # Ray 2.60 guards clusters with a token, but only a process whose environment says so sends it:
    # one mode for the local head, our CLI, jobs and tests (`ray` CLI users: export RAY_AUTH_MODE=token).
    "RAY_AUTH_MODE": "token",
    # Ray Train gives a worker group 60 s to start; on a busy small machine (2 cores shared with Serve
    # replicas, the monitor and a Tune trial) starting a torch worker process takes longer, and the run
    # failed with WorkerGroupStartupTimeoutError.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
}
# Read by Ray when it is imported: setting them later changes nothing in this process.
READ_AT_IMPORT = {"RAY_AUTH_MODE"}


def apply(environ: os._Environ | dict | None = None) -> dict[str, str]:
    """Set each default the environment does not set already; returns what it set.

    Raises RuntimeError when ray was imported, not yet connected, and a value Ray reads at import was
    missing: the driver would then run without it, silently (e.g. not sending the cluster's auth token).
    Inside a Ray worker (the Serve app builder) the connection is made already; only children inherit.
    """
    environ = os.environ if environ is None else environ
    added = {name: value for name, value in DEFAULTS.items() if name not in environ}
    environ.update(added)
    late = sorted(READ_AT_IMPORT & added.keys())
    ray = sys.modules.get("ray")
    if late and environ is os.environ and ray is not None and not ray.is_initialized():
        raise RuntimeError(f"ray was imported before cluster.environment.apply() set {', '.join(late)}: "
                           "call apply() first in the entry point")
    return added
