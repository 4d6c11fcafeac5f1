"""Gate evidence when each item has a score in [0, 1] rather than right/wrong: a segmentation model's per-image IoU.

The same rules as train/evidence.py, in the same order, with the paired tests of a continuous score: the gain is
the mean of the per-image differences (challenger - champion) on the same images; a one-sided Wilcoxon
signed-rank test asks whether the differences lean positive; a seeded percentile bootstrap over images gives
the interval of the mean gain; the holdout size a gain of `margin` needs follows from the spread of the
differences (one-sided normal approximation). There is no per-class rule: classes are per pixel here, and the
mean IoU over images already falls when any part of the masks gets worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from train.evidence import EvidenceRule, Interval, NonInferiority, Verdict

RESAMPLE_CHUNK = 250  # bootstrap resamples drawn at a time: memory of chunk x items indexes


@dataclass
class Scored:
    """Both models' score on each of the same items (per-image IoU), in one order."""

    champion: np.ndarray
    challenger: np.ndarray

    def __post_init__(self):
        self.champion = np.asarray(self.champion, dtype=np.float64)
        self.challenger = np.asarray(self.challenger, dtype=np.float64)
        if self.champion.ndim != 1 or self.champion.shape != self.challenger.shape:
            raise ValueError(f"need two 1-D arrays over the same items, got shapes {self.champion.shape} and "
                             f"{self.challenger.shape}")

    def accuracies(self) -> tuple[float, float] | None:
        """(champion, challenger) mean score; None without items (named as Paired's, for the gate)."""
        return (float(self.champion.mean()), float(self.challenger.mean())) if len(self.champion) else None

    def decide(self, test: "Scored", rule: EvidenceRule, classes=None, gain_on: str = "feedback holdout"
               ) -> Verdict:
        """decide_on_scores with these items as the holdout (as Paired.decide; there are no per-class rules)."""
        return decide_on_scores(self, test, rule, gain_on=gain_on)


def signed_rank_p(differences: np.ndarray) -> float:
    """One-sided Wilcoxon signed-rank p-value for "the challenger scores higher"; 1 without any difference."""
    if not np.any(differences != 0):
        return 1.0
    return float(stats.wilcoxon(differences, alternative="greater", zero_method="wilcox").pvalue)


def mean_interval(differences: np.ndarray, confidence: float, resamples: int = 2000, seed: int = 0) -> Interval:
    """Seeded percentile bootstrap interval of the mean difference, resampling items."""
    n = len(differences)
    if not n:
        raise ValueError("no items to resample")
    rng = np.random.default_rng(seed)
    means = np.concatenate([differences[rng.integers(0, n, (min(RESAMPLE_CHUNK, resamples - done), n))].mean(1)
                            for done in range(0, resamples, RESAMPLE_CHUNK)])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(differences.mean()), float(low), float(high), confidence)


def required_items(margin: float, spread: float, alpha: float, power: float) -> int:
    """Items a one-sided test at `alpha` needs to show a mean gain of `margin` with `power` when the
    differences have standard deviation `spread`."""
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    return math.ceil((z * spread / margin) ** 2)


@dataclass(frozen=True)
class ScoreEvidence:
    """Every number the verdict rests on."""

    rule: EvidenceRule
    holdout_items: int
    holdout_differing: int  # images the two models score differently on
    holdout_p_value: float
    holdout_scores: tuple[float, float] | None
    holdout_interval: Interval | None
    holdout_required: int
    test_items: int
    test_scores: tuple[float, float]
    test: NonInferiority

    def as_dict(self) -> dict:
        interval, (champion, challenger) = self.holdout_interval, self.holdout_scores or (None, None)
        return {**{f"rule_{k}": v for k, v in vars(self.rule).items()}, "score": "per-image foreground IoU",
                "holdout_items": self.holdout_items, "holdout_differing": self.holdout_differing,
                "holdout_p_value": self.holdout_p_value,
                "holdout_champion_accuracy": champion, "holdout_challenger_accuracy": challenger,
                **{f"holdout_interval_{k}": getattr(interval, k, None) for k in ("estimate", "low", "high",
                                                                                   "confidence")},
                "holdout_required": self.holdout_required, "test_items": self.test_items,
                "test_champion_accuracy": self.test_scores[0], "test_challenger_accuracy": self.test_scores[1],
                "test_difference": self.test.estimate, "test_lower_bound": self.test.lower_bound,
                "test_confidence": self.test.confidence, "test_non_inferior": self.test.passed,
                "flagged_classes": [], "classes": []}


def gather(holdout: Scored, test: Scored, rule: EvidenceRule, seed: int = 0) -> ScoreEvidence:
    if not len(test.champion):
        raise ValueError("the gate's test split is empty")
    test_diff = test.challenger - test.champion
    bound = mean_interval(test_diff, 2 * (1 - rule.alpha) - 1, rule.resamples, seed)
    holdout_diff = holdout.challenger - holdout.champion
    interval = mean_interval(holdout_diff, 1 - 2 * rule.alpha, rule.resamples, seed) if len(holdout_diff) else None
    spread = max(float(holdout_diff.std(ddof=1)) if len(holdout_diff) > 1 else 0.0, rule.discordance_floor)
    return ScoreEvidence(rule, len(holdout_diff), int(np.count_nonzero(holdout_diff)), signed_rank_p(holdout_diff),
                         holdout.accuracies(), interval, required_items(rule.margin, spread, rule.alpha, rule.power),
                         len(test_diff), test.accuracies(),
                         NonInferiority(bound.low > -rule.tolerance, bound.low, bound.estimate, rule.tolerance,
                                        1 - rule.alpha))


def decide_on_scores(holdout: Scored, test: Scored, rule: EvidenceRule = EvidenceRule(), seed: int = 0,
                     gain_on: str = "feedback holdout") -> Verdict:
    """Promote, reject, or wait for more feedback, by train/evidence.decide_on_evidence's rules on mean IoU:
    non-inferior on the base test split first, then a gain on the holdout shown by the signed-rank test AND
    a bootstrap lower bound above 0; no gain: reject when the interval rules out `margin` or the holdout
    had the items to show it, else not enough evidence."""
    e = gather(holdout, test, rule, seed)
    return Verdict(*_judge(e, gain_on), e)


def _judge(e: ScoreEvidence, on: str) -> tuple[str, str, str | None]:
    r, t = e.rule, e.test
    tested = (f"mean IoU {e.test_scores[1]:.4f} vs the champion's {e.test_scores[0]:.4f} on {e.test_items} "
              "images")
    if not t.passed:
        return "reject", (f"worse on the base test split than allowed: {tested}, and the {t.confidence:.0%} lower "
                          f"bound of the difference, {t.lower_bound:+.4f}, is not above -{r.tolerance}"), "test_split"
    if e.holdout_items < r.min_holdout:
        return "not_enough_evidence", (f"only {e.holdout_items} {on} images, fewer than the {r.min_holdout} "
                                       "needed before they can decide anything"), "holdout_size"
    (champion, challenger), interval = e.holdout_scores, e.holdout_interval
    if not e.holdout_differing:
        return "not_enough_evidence", f"the two models score alike on all {e.holdout_items} {on} images", \
            "no_disagreement"
    shown = (f"mean IoU {challenger:.4f} vs the champion's {champion:.4f} on {e.holdout_items} {on} images "
             f"(signed-rank p={e.holdout_p_value:.2g}, {interval.confidence:.0%} interval of the gain "
             f"[{interval.low:+.4f}, {interval.high:+.4f}])")
    if e.holdout_p_value < r.alpha and interval.low > 0:
        return "promote", (f"better on the {on}, {shown}, and within {r.tolerance} of the champion on the base "
                           f"test split, {tested}"), None
    if interval.high < r.margin:
        return "reject", f"not better on the {on}, {shown}, which rules out a gain of {r.margin}", "holdout"
    if e.holdout_items < e.holdout_required:
        return "not_enough_evidence", (f"no gain shown on the {on}, {shown}, and {e.holdout_items} images are "
                                       f"fewer than the {e.holdout_required} needed to show a gain of {r.margin} "
                                       f"with power {r.power}"), "holdout_size"
    return "reject", (f"not better on the {on}, {shown}, although {e.holdout_items} images are enough to show a "
                      f"gain of {r.margin} with power {r.power}"), "holdout"
