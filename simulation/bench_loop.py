"""The scenario benchmark's decisions on plain values: which scenarios, which digits, what the audit trail says.

bench/loop.py runs the scenarios (rayloop up and down, HTTP traffic, the audit trail); everything here is pure,
so tests/test_bench_loop.py checks it without Ray or HTTP. A row is one scenario's measurements as a JSON-ready
dict; rows are rendered as one markdown table with the issue's goals checked per cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from simulation.shifts import SHIFT_KINDS

# Two severities per shift: one a user would call mild, one plainly visible (units in shifts.SHIFT_KINDS).
SEVERITIES = {"rotate": (30.0, 90.0), "noise": (0.15, 0.3), "invert": (0.5, 1.0), "blur": (1.0, 2.0),
              "contrast": (0.4, 0.7)}
TRAPS = ("random-labels", "clean-labels")
EVAL_SIZE = 200          # each evaluation set: accuracy on the shift, clean accuracy
BACKGROUND_SIZE = 400    # distinct clean digits the background load cycles through
MIN_USER_POOL = 200
UNSEEN_NEEDED = 2 * EVAL_SIZE + BACKGROUND_SIZE + MIN_USER_POOL

GOALS = {"drift_samples": 200, "false_alarms": 0, "gain": 0.3, "labels": 600, "clean": 0.9, "recovery_s": 180,
         "failed": 0}
GOALS_LINE = ("**Goals**: every real shift reported within 200 shifted samples; no false alarm in 5,000 clean samples; "
              "no promotion in either trap; accuracy on the shift +0.3 or more with <= 600 labels; clean accuracy "
              ">= 0.9; <= 180 s to recovery; 0 failed requests.")
COLUMNS = ("scenario", "shifted samples until drift", "false alarms (of checks)", "promoted",
           "accuracy on the shift before -> after", "clean accuracy after", "labels used", "time to recovery (s)",
           "failed background requests")


@dataclass(frozen=True)
class Scenario:
    """A shift at one severity, or a trap: clean traffic whose labels should not make a better model."""

    shift: str                 # a kind of simulation.shifts, or "none" for a trap's clean traffic
    severity: float | None     # None for a trap
    trap: str = ""             # one of TRAPS for a trap, else ""

    @property
    def name(self) -> str:
        return f"trap:{self.trap}" if self.trap else f"{self.shift}:{self.severity:g}"


def default_scenarios() -> list[Scenario]:
    """The issue's twelve: each shift at both severities, then both traps."""
    shifts = [Scenario(kind, severity) for kind, pair in SEVERITIES.items() for severity in pair]
    return shifts + [Scenario("none", None, trap) for trap in TRAPS]


def parse_scenarios(text: str) -> list[Scenario]:
    """`rotate:90,noise:0.15,trap:random-labels` -> scenarios, in that order, each once."""
    chosen: dict[str, Scenario] = {}
    for item in (part.strip() for part in text.split(",")):
        if item:
            scenario = parse_scenario(item)
            chosen.setdefault(scenario.name, scenario)
    if not chosen:
        raise ValueError("--scenarios: no scenario given")
    return list(chosen.values())


def parse_scenario(item: str) -> Scenario:
    kind, colon, value = item.partition(":")
    if kind == "trap":
        if value not in TRAPS:
            raise ValueError(f"scenario {item!r}: a trap is one of {', '.join(f'trap:{t}' for t in TRAPS)}")
        return Scenario("none", None, value)
    if kind not in SHIFT_KINDS or not colon:
        raise ValueError(f"scenario {item!r}: expected <shift>:<severity> with a shift in "
                         f"{', '.join(SHIFT_KINDS)}, or trap:<{'|'.join(TRAPS)}>")
    try:
        severity = float(value)
    except ValueError:
        raise ValueError(f"scenario {item!r}: severity {value!r} is not a number") from None
    if not 0 <= severity < float("inf"):
        raise ValueError(f"scenario {item!r}: severity must be a finite number >= 0")
    return Scenario(kind, severity)


def scenario_order(name: str) -> tuple:
    """Table order: the shifts as simulation.shifts lists them, mildest first, then the traps."""
    kind, _, value = name.partition(":")
    if kind == "trap":
        return (len(SHIFT_KINDS), TRAPS.index(value) if value in TRAPS else len(TRAPS), value)
    kinds = list(SHIFT_KINDS)
    return (kinds.index(kind) if kind in kinds else len(kinds), float(value), "")


@dataclass
class TrafficSets:
    """Disjoint sets of digits the system never trained, validated or tested on: (images, labels) each."""

    user: tuple[np.ndarray, np.ndarray]           # what users send, shifted or clean, and label
    shifted_eval: tuple[np.ndarray, np.ndarray]   # shifted, never labelled: accuracy on the shift
    clean_eval: tuple[np.ndarray, np.ndarray]     # clean, never labelled: clean accuracy after
    background: tuple[np.ndarray, np.ndarray]     # the clean background load


def split_unseen(images: np.ndarray, labels: np.ndarray, seen: set[bytes], seed: int = 0) -> TrafficSets:
    """Digits whose pixels are not in `seen`, shuffled (the set is sorted by class) and cut into the four sets."""
    unseen = np.array([i for i in range(len(images)) if images[i].tobytes() not in seen], dtype=np.int64)
    if len(unseen) < UNSEEN_NEEDED:
        raise ValueError(f"only {len(unseen)} digits the system never saw; the benchmark needs {UNSEEN_NEEDED}: "
                         f"lower RAYLOOP_DATA_LIMIT (--data-limit)")
    order = np.random.default_rng(seed).permutation(unseen)
    cuts = np.cumsum([EVAL_SIZE, EVAL_SIZE, BACKGROUND_SIZE])
    shifted, clean, background, user = np.split(order, cuts)
    part = lambda idx: (images[idx], labels[idx])  # noqa: E731
    return TrafficSets(part(user), part(shifted), part(clean), part(background))


def round_indices(pool_size: int, sent_before: int, size: int, seed: int = 0) -> np.ndarray:
    """The pool items of the next round: one seeded order, so every digit is sent once before any comes again."""
    order = np.random.default_rng(seed).permutation(pool_size)
    return order[(sent_before + np.arange(size)) % pool_size]


class Mark(NamedTuple):
    """An audit event as plain values: when (epoch seconds) and its details."""

    at: float
    details: dict


class Ending(NamedTuple):
    """How a shift scenario's loop ended: promoted, rejected (a gate kept the champion) or failed."""

    outcome: str
    mark: Mark


def first_drift(checks: list[Mark]) -> Mark | None:
    """The earliest drift check that reported drift."""
    drifted = [c for c in checks if c.details.get("drifted")]
    return min(drifted, key=lambda m: m.at) if drifted else None


def samples_to_drift(rounds: list[tuple[float, int]], drift_at: float | None) -> int | None:
    """Shifted samples sent by the end of the first round that ended at or after the drift report: an upper
    bound, since the report came somewhere within that round. None: not reported during the rounds."""
    if drift_at is None:
        return None
    return next((sent for at, sent in sorted(rounds) if at >= drift_at), None)


def loop_end(gates: list[Mark], promotions: list[Mark], failures: list[Mark],
             rolled_back: list[Mark] = ()) -> Ending | None:
    """The first decisive event: a promotion, a gate that rejected, a retrain that failed or was interrupted, a
    staged rollout rolled back. A gate that found not enough evidence decides nothing (the monitor retries with
    more labels), nor does a passing gate until its `promoted` event says the alias moved."""
    events = sorted([(m.at, 0, "promoted", m) for m in promotions] + [(m.at, 1, "failed", m) for m in failures]
                    + [(m.at, 1, "rolled_back", m) for m in rolled_back]
                    + [(m.at, 2, "gate", m) for m in gates], key=lambda e: e[:2])
    for _, _, kind, mark in events:
        if kind != "gate":
            return Ending(kind, mark)
        if mark.details.get("outcome") not in ("promote", "not_enough_evidence"):
            return Ending("rejected", mark)
    return None


def rollout_stages(stages: list[Mark], end: Mark) -> str:
    """How long a staged rollout spent in each stage until `end` (its promotion or rollback), in words."""
    bounds = [m.at for m in stages] + [end.at]
    names = ["shadow" if m.details.get("stage") == "shadow" else f"{m.details.get('canary_share', 0):.0%}"
             for m in stages]
    return ", ".join(f"{name} {b - a:.0f} s" for name, a, b in zip(names, bounds, bounds[1:]))


def trap_finished(triggered: list[Mark], endings: list[Mark], checks_after: list[Mark], now: float,
                  settle_s: float = 5.0) -> bool:
    """Once a trap's digits are all sent: done when its first retrain ended, or, when none was triggered, when a
    drift check at least `settle_s` old came after the last digit (a trigger is audited just after its check)."""
    if triggered:
        first = min(m.at for m in triggered)
        return any(e.at >= first for e in endings)
    return any(c.at <= now - settle_s for c in checks_after)


GATE_OUTCOMES = {"promote": "promoted", "reject": "rejected", "not_enough_evidence": "not enough evidence"}


def gate_before(gates: list[Mark], at: float) -> Mark | None:
    """The latest gate decided at or before `at` (the one a promotion or an ending followed)."""
    earlier = [g for g in gates if g.at <= at]
    return max(earlier, key=lambda m: m.at) if earlier else None


def retrain_of(gate: Mark, started: list[Mark]) -> Mark | None:
    """The retrain_started of the retrain a gate decided: the same Ray Job when both name one, else the latest
    retrain that started before the gate (retrains never overlap)."""
    job = gate.details.get("ray_job")
    same = [s for s in started if job and s.details.get("ray_job") == job]
    candidates = same or [s for s in started if s.at <= gate.at]
    return max(candidates, key=lambda m: m.at) if candidates else None


def labels_in(started: Mark | None) -> int | None:
    """Labels a retrain used, all splits together (train, val, and the gate's holdout)."""
    if started is None:
        return None
    return int(sum(started.details.get("feedback", {}).values()))


def misses(row: dict) -> list[str]:
    """The goal cells a row misses, each as "<column>: <what> (goal ...)"; empty when it meets them all."""
    if row.get("error"):
        return [f"did not finish: {row['error'][:200]}"]
    found = _trap_misses(row) if row["trap"] else _shift_misses(row)
    clean = row.get("clean_accuracy_after")
    if clean is None or clean < GOALS["clean"]:
        shown = "not measured" if clean is None else f"{clean:.3f}"
        found.append(f"clean accuracy after: {shown} (goal >= {GOALS['clean']})")
    if row.get("background_failed", 0) > GOALS["failed"]:
        found.append(f"failed background requests: {row['background_failed']} (goal 0)")
    others = row.get("user_failed", 0) + row.get("eval_failed", 0)
    if others > GOALS["failed"]:
        found.append(f"failed user and evaluation requests (not a column): {others} (goal 0)")
    return found


def _shift_misses(row: dict) -> list[str]:
    found = []
    samples = row.get("samples_to_drift")
    if samples is None:
        found.append("shifted samples until drift: never reported (goal <= 200)")
    elif samples > GOALS["drift_samples"]:
        found.append(f"shifted samples until drift: {samples} (goal <= {GOALS['drift_samples']})")
    if not row.get("promoted"):
        found.append(f"accuracy on the shift: no new champion ({row.get('outcome')}; goal +0.3 with <= 600 labels)")
        found.append("time to recovery: never (goal <= 180 s)")
        return found
    before, after = row.get("accuracy_before"), row.get("accuracy_after")
    if before is None or after is None or after - before < GOALS["gain"]:
        gain = "not measured" if before is None or after is None else f"{after - before:+.3f}"
        reach = (f", out of reach from {before:.3f}: at most {1 - before:+.3f}"
                 if before is not None and 1 - before < GOALS["gain"] else "")
        found.append(f"accuracy on the shift: {gain} (goal +{GOALS['gain']} or more{reach})")
    labels = row.get("labels_used")
    if labels is None or labels > GOALS["labels"]:
        found.append(f"labels used: {labels if labels is not None else 'unknown'} (goal <= {GOALS['labels']})")
    recovery = row.get("recovery_s")
    if recovery is None or recovery > GOALS["recovery_s"]:
        shown = "never" if recovery is None else f"{recovery:.0f} s"
        found.append(f"time to recovery: {shown} (goal <= {GOALS['recovery_s']} s)")
    return found


def _trap_misses(row: dict) -> list[str]:
    found = []
    alarms = row.get("false_alarms")
    if alarms is None or alarms > GOALS["false_alarms"]:
        found.append(f"false alarms: {alarms if alarms is not None else 'not counted'} (goal 0)")
    if row.get("user_sent", 0) < row.get("samples_target", 0):
        found.append(f"false alarms: over {row['user_sent']:,} clean samples only, the timeout came first "
                     f"(goal: {row['samples_target']:,})")
    if row.get("promoted"):
        found.append(f"promoted: v{row.get('champion_after')} (goal: no promotion in a trap)")
    return found


def merged(rows: dict[str, dict], row: dict) -> dict[str, dict]:
    """Rows by scenario with `row` added; a newer row for the same scenario replaces the older."""
    return dict(sorted({**rows, row["scenario"]: row}.items(), key=lambda item: scenario_order(item[0])))


def table(rows: dict[str, dict]) -> list[str]:
    """One markdown row per scenario, the issue's columns in its order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * 2 + "---|---|" + "---:|" * 4]
    for name in sorted(rows, key=scenario_order):
        lines.append("| " + " | ".join(cells(rows[name])) + " |")
    return lines


def cells(row: dict) -> list[str]:
    """The table cells of one row; "-" where a measure does not apply to the scenario's kind."""
    if row.get("error"):
        return [f"`{row['scenario']}`", "did not finish", *["-"] * (len(COLUMNS) - 2)]
    trap, number = row["trap"], lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    if trap:
        drift = "-"
        alarms = "-" if row.get("false_alarms") is None else f"{row['false_alarms']} of {row['drift_checks']}"
        if row.get("decisions") and alarms != "-":
            alarms += f" (~{row['decisions']:,} decisions)"
        accuracy = "-"
    else:
        drift = "not reported" if row.get("samples_to_drift") is None else str(row["samples_to_drift"])
        alarms = "-"
        accuracy = f"{number(row.get('accuracy_before'), '.3f')} -> {number(row.get('accuracy_after'), '.3f')}"
        if row.get("estimated_before") is not None or row.get("estimated_after") is not None:
            accuracy += (f" (estimated {number(row.get('estimated_before'), '.2f')} -> "
                         f"{number(row.get('estimated_after'), '.2f')})")
    promoted = f"yes (v{row.get('champion_after')})" if row.get("promoted") else f"no ({row.get('outcome')})"
    return [f"`{row['scenario']}`", drift, alarms, promoted, accuracy, number(row.get("clean_accuracy_after"), ".3f"),
            number(row.get("labels_used"), "d"), number(row.get("recovery_s"), ".0f"),
            f"{row.get('background_failed', 0)} of {row.get('background_sent', 0):,}"]


def goal_lines(rows: dict[str, dict]) -> list[str]:
    """The goals, then per scenario the goal cells it misses (computed from the row, never written by hand)."""
    lines = [GOALS_LINE, "", "Goal cells missed:", ""]
    for name in sorted(rows, key=scenario_order):
        found = misses(rows[name])
        lines.append(f"- `{name}`: " + ("; ".join(found) if found else "none, every goal met"))
    return lines


def detail_lines(rows: dict[str, dict]) -> list[str]:
    """Per scenario: when and how it was measured, how the loop ended and what else happened."""
    lines = []
    for name in sorted(rows, key=scenario_order):
        row = rows[name]
        said = [f"measured {row.get('measured_at', '?')}, load {row.get('load_before', float('nan')):.1f} before "
                f"`rayloop up`, champion v{row.get('champion_before', '?')}"]
        if row.get("gate_outcome"):
            said.append(f"gate {row['gate_outcome']}: {str(row.get('gate_reason', ''))[:240]}")
        if row.get("rollout"):
            said.append(f"staged rollout (part of the recovery time): {row['rollout']}")
        said += row.get("notes", [])
        lines.append(f"- `{name}`: " + "; ".join(said) + ".")
    return lines
