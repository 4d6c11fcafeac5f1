"""`dvc repro` runs prepare -> train -> evaluate in a fresh git repo and reports test accuracy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_dvc_repro_in_a_fresh_repo_reports_test_accuracy(tmp_path):
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for package in ("cluster", "train"):
        shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["limit"] = 1000
    params["train"].update(epochs=3, num_workers=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{env['PATH']}", RAYLOOP_RAY_ADDRESS="local", RAY_USAGE_STATS_ENABLED="0")
    run(["git", "init", "-q"], work, env)

    run([str(BIN / "dvc"), "repro"], work, env)

    metrics = json.loads((work / "metrics.json").read_text())
    meta = json.loads((work / "data" / "prepared" / "meta.json").read_text())
    assert metrics["test_count"] == meta["counts"]["test"] and 70 <= metrics["test_count"] <= 130  # ~10% of 1,000
    assert metrics["data_version"] == meta["version"]
    assert (work / "data" / "prepared" / "manifest.csv").is_file()  # the split DVC tracks: files, not pixels
    assert metrics["test_accuracy"] > 0.3  # three quick epochs on 800 digits; chance is 0.1
    shown = run([str(BIN / "dvc"), "metrics", "show"], work, env).stdout
    assert "test_accuracy" in shown and str(metrics["test_accuracy"]) in shown
    assert (work / "dvc.lock").is_file()
    again = run([str(BIN / "dvc"), "status"], work, env).stdout
    assert "up to date" in again  # nothing changed, so nothing to reproduce
    gitignored = (work / "data" / ".gitignore").read_text()
    assert "/prepared" in gitignored and "/model" in gitignored  # DVC tracks the outputs, not git
