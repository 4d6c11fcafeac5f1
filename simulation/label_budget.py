"""The label-budget benchmark's decisions on plain values: which pool images each strategy has labelled, and how
many labels a strategy needs to recover accuracy on a shift.

bench/label_queue.py trains and measures; everything here is pure, so tests/test_bench_label_queue.py checks it
without training. The queue's picks are the product's own ranking (store.label_queue.rank) over the champion's
predictions, built as serving stores them; the random picks are a seeded uniform sample. Both are nested: a
larger budget labels what a smaller one did and more, as a queue worked down page by page does.

Labels needed: the smallest budget whose mean accuracy on the shifted evaluation set reaches the target, the
champion's accuracy before plus RECOVERY_SHARE of the gain the random sample reached at the largest budget;
linear in log2(budget) between the two budgets around the crossing. Reached at the
smallest budget: that budget, an upper bound. Not reached: None, more than the largest budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from store.label_queue import Candidate, rank

BUDGETS = (3, 10, 30, 100, 320)  # about x3 apart: from a handful to what the loop benchmark's retrains used
# A partial and a strong rotation, and the mild severities of bench/loop.py's other shifts that needed the most
# labels there (simulation.bench_loop.SEVERITIES).
SHIFTS = "rotate:30,contrast:0.4,invert:0.5,noise:0.15,rotate:90"
RECOVERY_SHARE = 0.9
GOAL_RATIO = 0.5  # issue 17 item 3: half as many labels as a random sample
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def candidates(probabilities: np.ndarray, classes: list[str], version: str = "1") -> list[Candidate]:
    """The champion's predictions on the pool as the queue reads them from the store: one per image (its blob
    key names its index in the pool), the likeliest class, probabilities rounded as serving writes them."""
    out = []
    for i, probs in enumerate(np.asarray(probabilities, dtype=np.float64)):
        best = int(probs.argmax())
        out.append(Candidate(f"prediction-{i}", T0 + timedelta(seconds=i), version, classes[best], float(probs[best]),
                             {c: round(float(p), 6) for c, p in zip(classes, probs)}, f"image-{i}"))
    return out


def queue_picks(pool: list[Candidate], budget: int) -> np.ndarray:
    """Pool indices of the first `budget` images the labelling queue asks for. No drift episode: the whole pool
    is the shifted traffic, so the episode would cover every candidate and change nothing."""
    return np.array([int(c.blob_key.removeprefix("image-")) for c in rank(pool, budget)], dtype=np.int64)


def random_picks(pool_size: int, budget: int, seed: int) -> np.ndarray:
    """Pool indices of a uniform random sample of `budget` images: one seeded order, so budgets are nested."""
    return np.random.default_rng(seed).permutation(pool_size)[:budget]


def target_accuracy(before: float, random_curve: list[float], share: float = RECOVERY_SHARE) -> float | None:
    """The accuracy on the shift that counts as recovered: `before` plus `share` of the gain of the random sample
    at the largest budget. None when that sample gained nothing: there was nothing labels recovered."""
    gain = random_curve[-1] - before
    return before + share * gain if gain > 0 else None


def labels_needed(budgets: list[int], curve: list[float], target: float) -> float | None:
    """The first budget whose accuracy reaches `target`, interpolated in log2(budget) from the budget before it;
    the smallest budget when it already does; None when no budget does."""
    for i, (budget, accuracy) in enumerate(zip(budgets, curve)):
        if accuracy >= target:
            if i == 0:
                return float(budget)
            low, below = budgets[i - 1], curve[i - 1]
            fraction = (target - below) / (accuracy - below)
            return float(2 ** (math.log2(low) + fraction * (math.log2(budget) - math.log2(low))))
    return None


def needed_text(needed: float | None, budgets: list[int]) -> str:
    if needed is None:
        return f"> {budgets[-1]}"
    return f"<= {budgets[0]}" if needed <= budgets[0] else f"{needed:.0f}"


@dataclass(frozen=True)
class Ratio:
    """Queue labels over random labels: `value` is exact (`bound` "="), an upper bound ("<="), a lower bound (">="
    or, the queue never reaching the target, ">"), or None when both reached the target at the smallest budget (no
    ratio can be read off the grid)."""

    value: float | None
    bound: str

    @property
    def meets_goal(self) -> bool | None:
        """Whether the queue needed at most GOAL_RATIO of the random labels; None when the grid cannot tell."""
        if self.value is None:
            return None
        if self.bound == "=":
            return self.value <= GOAL_RATIO
        if self.bound == "<=":
            return True if self.value <= GOAL_RATIO else None
        beyond = self.value >= GOAL_RATIO if self.bound == ">" else self.value > GOAL_RATIO
        return False if beyond else None

    def text(self) -> str:
        if self.value is None:
            return "- (both at the smallest budget)"
        return f"{'' if self.bound == '=' else self.bound + ' '}{self.value:.2f}"


def ratio(queue: float | None, random: float | None, budgets: list[int]) -> Ratio:
    """The queue's labels needed over the random sample's, with what the grid's edges leave unknown."""
    smallest, largest = budgets[0], budgets[-1]
    if random is None:  # cannot happen with the target from the random curve itself; kept total
        return Ratio(None, "=")
    random_at_edge = random <= smallest
    if queue is None:
        return Ratio(largest / random, ">")
    if queue <= smallest:
        return Ratio(None, "=") if random_at_edge else Ratio(smallest / random, "<=")
    return Ratio(queue / smallest, ">=") if random_at_edge else Ratio(queue / random, "=")


def mean_curve(runs: list[list[float]]) -> list[float]:
    """The mean over runs, budget by budget."""
    return [float(v) for v in np.mean(np.asarray(runs, dtype=np.float64), axis=0)]


def summary(budgets: list[int], before: float, queue_runs: list[list[float]], random_runs: list[list[float]]
            ) -> dict:
    """One shift's verdict from its shifted-accuracy runs (one list per run, one value per budget)."""
    queue_curve, random_curve = mean_curve(queue_runs), mean_curve(random_runs)
    target = target_accuracy(before, random_curve)
    if target is None:
        return {"target": None, "queue_needed": None, "random_needed": None, "ratio": None, "ratio_bound": "=",
                "meets_goal": None, "queue_curve": queue_curve, "random_curve": random_curve}
    queue, random = labels_needed(budgets, queue_curve, target), labels_needed(budgets, random_curve, target)
    found = ratio(queue, random, budgets)
    return {"target": target, "queue_needed": queue, "random_needed": random, "ratio": found.value,
            "ratio_bound": found.bound, "meets_goal": found.meets_goal, "queue_curve": queue_curve,
            "random_curve": random_curve}


SUMMARY_COLUMNS = ("shift", "champion on the shift", "random at the largest budget", "target",
                   "labels needed: queue", "random", "queue / random", "goal <= 0.5", "clean accuracy after (min)")


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown: one row per shift (rows as bench/label_queue.py writes them)."""
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|---|" + "---:|" * (len(SUMMARY_COLUMNS) - 1)]
    for row in rows:
        budgets, verdict = row["budgets"], row["summary"]
        found = Ratio(verdict["ratio"], verdict["ratio_bound"])
        goal = {True: "met", False: "missed", None: "-"}[verdict["meets_goal"]]
        target = "-" if verdict["target"] is None else f"{verdict['target']:.3f}"
        clean = min(min(run) for strategy in ("queue", "random") for run in row["clean"][strategy])
        lines.append(f"| `{row['shift']}` | {row['before']['shifted']:.3f} | {verdict['random_curve'][-1]:.3f} | "
                     f"{target} | {needed_text(verdict['queue_needed'], budgets)} | "
                     f"{needed_text(verdict['random_needed'], budgets)} | {found.text()} | {goal} | {clean:.3f} |")
    return lines


def curve_table(rows: list[dict]) -> list[str]:
    """Markdown: mean accuracy on the shift (and clean) per budget, a row per shift and strategy."""
    budgets = rows[0]["budgets"] if rows else []
    lines = ["| shift | labelled by | 0 | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|" + "---:|" * (len(budgets) + 1)]
    for row in rows:
        for strategy in ("queue", "random"):
            shifted, clean = mean_curve(row["shifted"][strategy]), mean_curve(row["clean"][strategy])
            cells = [f"{s:.3f} ({c:.3f})" for s, c in zip(shifted, clean)]
            before = f"{row['before']['shifted']:.3f} ({row['before']['clean']:.3f})"
            lines.append(f"| `{row['shift']}` | {strategy} | {before} | " + " | ".join(cells) + " |")
    return lines


def picked_wrong(picks: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of the picked pool images the champion got wrong: what a label there can teach it."""
    return float((predicted[picks] != labels[picks]).mean()) if len(picks) else 0.0
