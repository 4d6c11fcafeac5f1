"""Benchmark: the reliability figures (faults, restarts, contention, fuzzing) into bench/RESULTS.md.

    .venv/bin/python bench/reliability.py                # run tests/reliability with recording on, then report
    .venv/bin/python bench/reliability.py --report-only  # only turn the recorded JSON into the section

The tests in tests/reliability measure and assert (failed share <= 1%, every acknowledged write found,
no 5xx); with RAYLOOP_RECORD_FIGURES=1 they also merge what they measured into
bench/reliability_faults.json and bench/reliability_security.json, each figure with its time and load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from bench.results import write_section  # noqa: E402

FAULTS = REPO / "bench" / "reliability_faults.json"
SECURITY = REPO / "bench" / "reliability_security.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def when(figure: dict) -> str:
    return f"{figure.get('measured_at', '?')}, load {figure.get('load_average', float('nan')):.1f}"


def section(faults: dict, security: dict, command: str) -> str:
    lines = ["## Reliability: faults under load, restarts, contention, hostile input", "",
             f"Command: `{command}`  ",
             "Figures as measured and asserted by tests/reliability (each row: when, and the load average then; "
             "2 cores shared with whatever else ran).", "",
             "| replica killed under load (3 client threads) | requests | failed (share) | recovery s | "
             "slowest request s | measured |", "|---|---:|---:|---:|---:|---|"]
    for key, name in (("serving_replica_killed_1_of_2_haproxy",
                       "Classifier serving HTTP (topology fused), 1 of 2, behind HAProxy (`rayloop up`)"),
                      ("classifier_replica_killed", "topology split: Classifier, 1 of 2"),
                      ("ingress_replica_killed_1_of_1", "topology split: Ingress, the only one"),
                      ("ingress_replica_killed_1_of_2",
                       "topology split: Ingress, 1 of 2 (`serve.ingress_replicas: 2`)"),
                      ("ingress_replica_killed_1_of_1_haproxy",
                       "topology split: Ingress, the only one, behind HAProxy (earlier `rayloop up`)")):
        f = faults.get(key)
        if f:
            lines.append(f"| {name} | {f['requests']} | {f['failed']} ({f['failed_share']:.2%}) | "
                         f"{f['recovery_s']} | {f['max_latency_s']} | {when(f)} |")
    lines += ["", "| restart / retrain failure | what was kept or happened | measured |", "|---|---|---|"]
    for key, f in faults.items():
        if key.startswith(("classifier_replica", "ingress_", "serving_replica")):
            continue
        shown = {k: v for k, v in f.items()
                 if k not in {"measured_at", "load_average"} and not isinstance(v, (list, dict))}
        lines.append(f"| {key} | " + ", ".join(f"{k} {v}" for k, v in shown.items()) + f" | {when(f)} |")
    lines += ["", "| store and input | figures | measured |", "|---|---|---|"]
    for key, f in security.items():
        shown = {k: v for k, v in f.items() if k not in {"measured_at", "load_average"}}
        lines.append(f"| {key} | " + ", ".join(f"{k} {json.dumps(v)}" for k, v in shown.items()) + f" | {when(f)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="no test run: report the recorded figures")
    args = parser.parse_args()
    command = "python bench/reliability.py" + (" --report-only" if args.report_only else "")
    if not args.report_only:
        env = {**os.environ, "RAYLOOP_RECORD_FIGURES": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "tests/reliability"], cwd=REPO, env=env)
        if done.returncode != 0:
            print("some reliability tests failed: figures of the passing ones are recorded", file=sys.stderr)
    write_section("bench/reliability.py", section(load(FAULTS), load(SECURITY), command))
    print("recorded in bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
