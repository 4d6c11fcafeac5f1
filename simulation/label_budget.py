"""The label-budget benchmark's decisions on plain values: which pool images each strategy has labelled, how
many labels a strategy needs to recover accuracy on a shift, and the RESULTS.md section from its results file.

bench/label_queue.py trains and measures; everything here is pure, so tests/test_bench_label_queue.py checks it
without training. Each order's picks (simulation.label_orders: the queue's own, store.label_queue.rank, and the
orders measured against it) are over the champion's predictions, built as serving stores them; the random picks
are a seeded uniform sample. All are nested: a larger budget labels what a smaller one did and more, as a queue
worked down page by page does.

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

from simulation.label_orders import ORDERS, Embedded, Reference, embedding_of

BUDGETS = (3, 10, 30, 100, 320)  # about x3 apart: from a handful to what the loop benchmark's retrains used
# A partial and a strong rotation, and the mild severities of bench/loop.py's other shifts that needed the most
# labels there (simulation.bench_loop.SEVERITIES).
SHIFTS = "rotate:30,contrast:0.4,invert:0.5,noise:0.15,rotate:90"
RECOVERY_SHARE = 0.9
GOAL_RATIO = 0.5  # issue 17 item 3: half as many labels as a random sample
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def candidates(probabilities: np.ndarray, features: list[dict], classes: list[str], version: str = "1"
               ) -> list[Embedded]:
    """The champion's predictions on the pool as the queue reads them from the store: one per image (its blob
    key names its index in the pool), the likeliest class, probabilities rounded as serving writes them, the
    embedding read back from the drift features the served model logged (train.features.feature_rows)."""
    out = []
    for i, (probs, row) in enumerate(zip(np.asarray(probabilities, dtype=np.float64), features, strict=True)):
        best = int(probs.argmax())
        out.append(Embedded(f"prediction-{i}", T0 + timedelta(seconds=i), version, classes[best], float(probs[best]),
                             {c: round(float(p), 6) for c, p in zip(classes, probs)}, f"image-{i}",
                             embedding_of(row)))
    return out


def picks(pool: list[Embedded], strategy: str, budget: int, reference: Reference | None = None) -> np.ndarray:
    """Pool indices of the first `budget` images `strategy` asks for (`reference`: the champion's drift
    reference, for the orders by distance from it)."""
    chosen = ORDERS[strategy](pool, budget, reference)
    return np.array([int(c.blob_key.removeprefix("image-")) for c in chosen], dtype=np.int64)


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

    @property
    def beats_random(self) -> bool | None:
        """Whether the strategy needed fewer labels than the random sample; None when the grid cannot tell."""
        if self.value is None or (self.bound == "=" and self.value == 1):
            return None
        return self.bound == "<=" or (self.bound == "=" and self.value < 1)

    def text(self) -> str:
        if self.value is None:
            return "-"
        return f"{'' if self.bound == '=' else self.bound + ' '}{self.value:.2f}"


def ratio(queue: float | None, random: float | None, budgets: list[int]) -> Ratio:
    """A strategy's labels needed over the random sample's, with what the grid's edges leave unknown."""
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


def summary(budgets: list[int], before: float, runs: dict[str, list[list[float]]]) -> dict:
    """One shift's verdict from its shifted-accuracy runs per strategy (one list per run, one value per budget;
    "random" among them): each other strategy's labels needed and its ratio to the random sample's."""
    curves = {strategy: mean_curve(strategy_runs) for strategy, strategy_runs in runs.items()}
    target = target_accuracy(before, curves["random"])
    needed = {s: None if target is None else labels_needed(budgets, curve, target) for s, curve in curves.items()}
    ratios = {}
    for strategy in curves:
        found = Ratio(None, "=") if target is None else ratio(needed[strategy], needed["random"], budgets)
        ratios[strategy] = {"value": found.value, "bound": found.bound, "meets_goal": found.meets_goal,
                            "beats_random": found.beats_random}
    return {"target": target, "needed": needed, "ratios": ratios, "curves": curves}


def strategy_ratio(row: dict, strategy: str) -> Ratio:
    found = row["summary"]["ratios"][strategy]
    return Ratio(found["value"], found["bound"])


def others(row: dict) -> list[str]:
    """The strategies measured against the random sample, in the order they ran."""
    return [s for s in row["shifted"] if s != "random"]


def summary_table(rows: list[dict]) -> list[str]:
    """Markdown: one row per shift (rows as bench/label_queue.py writes them): labels needed by each strategy,
    its ratio to the random sample's in brackets."""
    strategies = others(rows[0]) if rows else []
    columns = ["shift", "champion on the shift", "random at the largest budget", "target", "labels needed: random",
               *[f"{s} (/ random)" for s in strategies], "clean accuracy after (min)"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        budgets, verdict = row["budgets"], row["summary"]
        target = "-" if verdict["target"] is None else f"{verdict['target']:.3f}"
        cells = [f"{needed_text(verdict['needed'][s], budgets)} ({strategy_ratio(row, s).text()})" for s in strategies]
        clean = min(min(run) for runs in row["clean"].values() for run in runs)
        lines.append(f"| `{row['shift']}` | {row['before']['shifted']:.3f} | {verdict['curves']['random'][-1]:.3f} | "
                     f"{target} | {needed_text(verdict['needed']['random'], budgets)} | " + " | ".join(cells)
                     + f" | {clean:.3f} |")
    return lines


def verdict_line(rows: list[dict], strategy: str) -> str:
    """How a strategy fared against the random sample over the shifts."""
    ratios = [strategy_ratio(row, strategy) for row in rows]
    beats = [r.beats_random for r in ratios]
    goals = [r.meets_goal for r in ratios]
    return (f"- {strategy}: fewer labels than random on {beats.count(True)} of {len(rows)} shifts, more on "
            f"{beats.count(False)}, not readable off the grid on {beats.count(None)}; goal (<= {GOAL_RATIO}) met on "
            f"{goals.count(True)}; " + ", ".join(f"`{row['shift']}` {r.text()}" for row, r in zip(rows, ratios)))


def curve_table(rows: list[dict]) -> list[str]:
    """Markdown: mean accuracy on the shift (and clean) per budget, a row per shift and strategy."""
    budgets = rows[0]["budgets"] if rows else []
    lines = ["| shift | labelled by | 0 | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|" + "---:|" * (len(budgets) + 1)]
    for row in rows:
        for strategy in row["shifted"]:
            shifted, clean = mean_curve(row["shifted"][strategy]), mean_curve(row["clean"][strategy])
            cells = [f"{s:.3f} ({c:.3f})" for s, c in zip(shifted, clean)]
            before = f"{row['before']['shifted']:.3f} ({row['before']['clean']:.3f})"
            lines.append(f"| `{row['shift']}` | {strategy} | {before} | " + " | ".join(cells) + " |")
    return lines


def picked_wrong(picks: np.ndarray, predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of the picked pool images the champion got wrong: what a label there can teach it."""
    return float((predicted[picks] != labels[picks]).mean()) if len(picks) else 0.0


# -- the RESULTS.md section ----------------------------------------------------------------------------------------
HEADING = "## Labelling queue orders against a random sample: labels needed to recover accuracy on a shift"


def kept_runs(previous: dict | None, measured: list[str]) -> list[dict]:
    """The earlier runs a new run's results keep beside it (the previous run, then the runs it kept): each while it
    holds the figures of an order the new run did not measure; a rerun of the same orders replaces them."""
    if previous is None:
        return []
    runs = [{"meta": previous["meta"], "rows": previous["rows"]}, *previous.get("earlier", [])]
    return [run for run in runs if set(run["rows"][0]["shifted"]) - set(measured)]


def report(results: dict) -> str:
    """The section from the results file (bench/label_queue.py writes it): the latest run, then the earlier runs
    it kept. Each run's ratios are to its own random sample."""
    lines = [HEADING, "", "Each run below names its command and the orders it measured; a ratio is always to the "
             "random sample of the same run."]
    for n, run in enumerate([results, *results.get("earlier", [])]):
        lines += ["", f"### {'Latest run' if n == 0 else 'Earlier run'}, {run['meta']['measured']}: "
                  + ", ".join(run["rows"][0]["shifted"]), "", *run_lines(run)]
    return "\n".join(lines)


def run_lines(run: dict) -> list[str]:
    meta, rows = run["meta"], run["rows"]
    return [
        f"Command: `{meta['command']}`  ",
        f"Measured {meta['measured']} on {meta['machine']}; {meta['seconds']:.0f} s in all, fine-tunes in "
        f"{meta['workers']} processes of {meta['threads']} torch thread(s). Offline, no Ray: bench/loop.py runs the "
        "whole loop at 5-9 minutes a scenario on 2 cores, too slow for a sweep of label budgets, so this runs the "
        "loop's parts instead (the module doc of bench/label_queue.py lists which are the product's code). "
        f"The queue's order when it ran (store.label_queue.rank): `{meta.get('queue_order', 'least margin')}`.",
        "",
        f"Labels needed per strategy, its ratio to the random sample's in brackets (lower is better; goal <= "
        f"{GOAL_RATIO}):",
        "",
        *summary_table(rows),
        "",
        *[verdict_line(rows, s) for s in others(rows[0])],
        "",
        "Mean accuracy on the shift (clean accuracy in brackets) after fine-tuning on k labels; 0 is the champion:",
        "",
        *curve_table(rows),
        "",
        "Share of the picked images the champion got wrong (what a label can correct), and how many of the ten "
        "digits the picks hold (true labels), at " + ", ".join(str(b) for b in rows[0]["budgets"])
        + " labels (random: means):",
        "",
        *[picked_line(r) for r in rows],
        "",
        *meta["notes"],
        *meta.get("reading", []),  # written by hand into the results file after the run
    ]


def picked_line(row: dict) -> str:
    def means(runs: list[list[float]], digits: int) -> str:
        return " ".join(f"{v:.{digits}f}" for v in mean_curve(runs))

    wrong, classes = row["picked_wrong"], row["picked_classes"]
    picked = "; ".join(f"{s}: wrong {means(wrong[s], 2)}, digits {means(classes[s], 1 if s == 'random' else 0)}"
                       for s in wrong)
    return (f"- `{row['shift']}` ({row['confidently_wrong']:.0%} of the champion's mistakes on the pool have a margin "
            f"above 0.5): {picked}")
