"""The code's shape: no import cycles (a function-level import counts), small files, replicas hashed whole.

pyproject.toml's import contract (`lint-imports`, run by `make lint`) says which part may import which.
"""

from __future__ import annotations

import itertools

import grimp
import pytest

from serve.app import REPLICA_PACKAGES
from tests.conftest import REPO

PACKAGES = ["cluster", "store", "train", "tune", "control", "serve", "monitoring", "simulation", "ui", "rayloop"]
MAX_LINES = 400


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_no_module_imports_itself_through_others(graph):
    cycles = set()
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                cycles.add(tuple(sorted((module, imported))))
    assert not cycles, f"import cycles between modules: {sorted(cycles)}"


def test_no_two_packages_import_each_other(graph):
    both_ways = [(a, b) for a, b in itertools.combinations(PACKAGES, 2)
                 if graph.chain_exists(importer=a, imported=b, as_packages=True)
                 and graph.chain_exists(importer=b, imported=a, as_packages=True)]
    assert not both_ways, f"packages importing each other: {both_ways}"


def test_every_source_file_is_short_enough_to_read_in_one_sitting():
    long = {str(path.relative_to(REPO)): n for package in [*PACKAGES, "tests", "bench"]
            for path in (REPO / package).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_a_code_change_anywhere_a_replica_imports_redeploys_the_replicas(graph):
    # code_version() hashes REPLICA_PACKAGES: a package the replicas import but the hash skips would let a
    # redeploy keep replicas running old code (tune/ was such a package).
    imported = {module.split(".")[0] for module in graph.find_upstream_modules("serve.app")} | {"serve"}
    assert imported <= set(REPLICA_PACKAGES), f"imported by replicas but not hashed: {imported - set(REPLICA_PACKAGES)}"


@pytest.mark.slow  # a fresh interpreter importing torch, MLflow and Ray Serve: 10-20 s
def test_a_serving_replica_never_loads_ray_tune_or_the_retrain_code():
    # The admin routes used to import tune.job, and with it Ray Tune, into every replica on the first call.
    import subprocess
    import sys

    probe = ("from cluster import environment; environment.apply(); import sys, serve.app, serve.http.admin; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tune' or m.startswith('ray.tune')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
