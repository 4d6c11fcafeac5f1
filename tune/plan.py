"""How large a search a retrain runs: the full Tune search, or one trial when the shift is beyond doubt.

The full search (`tune.num_samples` trials, ASHA) earns its time when the best settings are unclear: a subtle
shift, noisy labels. When the champion fails plainly on the new labels (a rotated stream: 0.13 where it
scores 0.98 on its own validation split), any reasonable fine-tune fixes it, and the other trials only delay
the recovery. Clear means: the upper end of a one-sided Clopper-Pearson interval of the champion's accuracy on
the labelled feedback it will learn from (never the gate's holdout) lies more than `tune.clear_drop` below
its accuracy on the base validation split. Then one trial runs, at the centre of the search space, from the
champion's weights. The gate judges its challenger like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray.tune
from scipy import stats

from cluster.settings import TuneSettings

CONFIDENCE = 0.95


def batch_sizes(rule: TuneSettings) -> list[int]:
    return [int(v) for v in rule.batch_sizes.split(",")]


def search_space(rule: TuneSettings) -> dict:
    """Tune's param space from the `tune` settings."""
    fine_tune = {"true": [True], "false": [False], "search": [True, False]}[rule.fine_tune.strip().lower()]
    return {
        "lr": ray.tune.loguniform(rule.lr_min, rule.lr_max),
        "weight_decay": ray.tune.choice([float(v) for v in rule.weight_decays.split(",")]),
        "batch_size": ray.tune.choice(batch_sizes(rule)),
        "fine_tune": ray.tune.choice(fine_tune),
        # Each trial's own training seed, drawn like the rest (reproducibly, see run_tune).
        "seed": ray.tune.randint(0, 2**31 - 1),
    }


def focused_space(rule: TuneSettings) -> dict:
    """One point: the learning rate at the geometric centre of its range, the first weight decay and batch
    size listed, the champion's weights unless `fine_tune` is false; the seed still drawn."""
    return {**search_space(rule), "lr": math.sqrt(rule.lr_min * rule.lr_max),
            "weight_decay": float(rule.weight_decays.split(",")[0]), "batch_size": batch_sizes(rule)[0],
            "fine_tune": rule.fine_tune.strip().lower() != "false"}


def accuracy_upper_bound(right: int, items: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of an accuracy seen as `right` of `items`."""
    if items <= 0:
        return 1.0
    return 1.0 if right >= items else float(stats.beta.ppf(confidence, right + 1, items - right))


@dataclass(frozen=True)
class Plan:
    """The search a retrain runs, and why."""

    trials: int
    space: dict
    clear: bool
    reason: str

    def as_dict(self) -> dict:
        return {"trials": self.trials, "clear": self.clear, "reason": self.reason}


def plan_search(rule: TuneSettings, feedback_right: np.ndarray, base_accuracy: float) -> Plan:
    """The full search, or one focused trial when the champion plainly fails on the feedback (module doc).

    `feedback_right`: whether the champion got each labelled feedback item right (its training and
    validation parts); `base_accuracy`: its accuracy on the base validation split."""
    right, items = int(np.count_nonzero(feedback_right)), len(feedback_right)
    bound = accuracy_upper_bound(right, items)
    seen = (f"the champion got {right} of {items} feedback labels right ({right / items:.2f}, at most {bound:.2f} at "
            f"{CONFIDENCE:.0%}) against {base_accuracy:.2f} on the base validation split" if items else
            "no feedback labels to judge the champion on")
    if rule.clear_drop > 0 and items and bound < base_accuracy - rule.clear_drop:
        return Plan(1, focused_space(rule), True, f"clear shift, one focused trial: {seen}, more than "
                                                  f"tune.clear_drop={rule.clear_drop} below")
    return Plan(rule.num_samples, search_space(rule), False,
                f"full search of {rule.num_samples} trials: {seen}"
                + ("" if rule.clear_drop > 0 else " (tune.clear_drop=0: always the full search)"))
