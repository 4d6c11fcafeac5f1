"""cluster.environment.apply(): the environment Ray needs, set by entry points, never by an import."""

from __future__ import annotations

import os
import subprocess
import sys

from cluster import environment
from tests.support.paths import REPO


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in environment.DEFAULTS}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120)


def test_apply_sets_only_what_the_environment_leaves_unset():
    environ = {"RAY_AUTH_MODE": "disabled"}
    added = environment.apply(environ)
    assert environ["RAY_AUTH_MODE"] == "disabled"  # a user's choice stands
    assert added == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"} and environ.items() >= added.items()


def test_importing_our_packages_changes_no_environment():
    code = ("import os; before = dict(os.environ); import cluster.settings, store, train, tune, control, serve, "
            "monitoring, simulation, ui, rayloop; print(sorted(set(os.environ.items()) ^ set(before.items())))")
    done = run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_apply_after_ray_was_imported_says_so_instead_of_running_without_the_token():
    done = run("import ray; from cluster import environment; environment.apply()")
    assert done.returncode != 0
    assert "ray was imported before cluster.environment.apply() set RAY_AUTH_MODE" in done.stderr
