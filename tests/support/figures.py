"""Figures the reliability tests measure (tests/reliability): printed, and with RAYLOOP_RECORD_FIGURES=1
(bench/reliability.py sets it) kept in bench/ for bench/RESULTS.md."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.support.paths import REPO

SECURITY = REPO / "bench" / "reliability_security.json"
FAULTS = REPO / "bench" / "reliability_faults.json"


def record_figures(section: str, figures: dict, path: Path = SECURITY) -> None:
    """Print a section of measured figures; with RAYLOOP_RECORD_FIGURES=1 also merge it into `path`
    (SECURITY or FAULTS), so a plain `make test` leaves the tracked files alone."""
    print(f"\n[reliability] {section}: {json.dumps(figures, default=str)}", flush=True)
    if os.environ.get("RAYLOOP_RECORD_FIGURES") != "1":
        return
    current = json.loads(path.read_text()) if path.is_file() else {}
    current[section] = {**figures, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "load_average": round(os.getloadavg()[0], 2)}
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(current, indent=2, default=str) + "\n")
    partial.replace(path)
