"""Evidence for the champion/challenger gate: paired tests on the same items, sized to what they can detect.

Both models are scored on the same items, so every question is about the items they disagree on: b items
the challenger gets right and the champion wrong, c items the other way round. A gain is b - c over the
items; the exact McNemar test asks whether b is unusual among b + c coin flips; a bootstrap resample of the
items only redraws these counts, so it is a multinomial draw of three numbers, whatever the item count.
Pure functions over plain arrays: scoring the models and logging the verdict happen around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy import stats

Alternative = Literal["greater", "less", "two-sided"]
Outcome = Literal["promote", "reject", "not_enough_evidence"]


@dataclass
class Paired:
    """Whether the champion and the challenger got each item right, on the same items, and their true classes."""

    champion: np.ndarray
    challenger: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self):
        self.champion, self.challenger = _pairs(self.champion, self.challenger)
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if self.labels.shape != self.champion.shape:
                raise ValueError(f"{len(self.labels)} labels for {len(self.champion)} items")

    @classmethod
    def from_predictions(cls, champion_predicted, challenger_predicted, labels) -> "Paired":
        """From both models' predicted classes and the true ones."""
        labels = np.asarray(labels)
        return cls(np.asarray(champion_predicted) == labels, np.asarray(challenger_predicted) == labels, labels)

    def accuracies(self) -> tuple[float, float] | None:
        """(champion, challenger) accuracy; None without items."""
        return (float(self.champion.mean()), float(self.challenger.mean())) if len(self.champion) else None

    def decide(self, test: "Paired", rule: "EvidenceRule", classes: Sequence[str] | None = None,
               gain_on: str = "feedback holdout") -> "Verdict":
        """decide_on_evidence with these items as the holdout (the gate's one call for either evidence)."""
        return decide_on_evidence(self, test, rule, classes, gain_on=gain_on)


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test: b = challenger right where the champion is wrong, c = the reverse."""

    b: int
    c: int
    items: int
    p_value: float
    alternative: str


@dataclass(frozen=True)
class Interval:
    """A two-sided bootstrap interval of the accuracy difference, challenger - champion."""

    estimate: float
    low: float
    high: float
    confidence: float


@dataclass(frozen=True)
class NonInferiority:
    """Whether the challenger loses no more than `tolerance`: its one-sided lower bound is above -tolerance."""

    passed: bool
    lower_bound: float
    estimate: float
    tolerance: float
    confidence: float


@dataclass(frozen=True)
class ClassLoss:
    """One class's accuracy on both models; flagged when it loses more than allowed and not by chance."""

    label: str | int
    items: int
    champion_accuracy: float
    challenger_accuracy: float
    drop: float  # champion - challenger: positive when the class got worse
    p_value: float  # exact McNemar within the class, one-sided: is the challenger worse?
    flagged: bool


def _pairs(champion_correct, challenger_correct) -> tuple[np.ndarray, np.ndarray]:
    champion, challenger = np.asarray(champion_correct, dtype=bool), np.asarray(challenger_correct, dtype=bool)
    if champion.ndim != 1 or champion.shape != challenger.shape:
        raise ValueError(f"need two 1-D arrays over the same items, got shapes {champion.shape} and "
                         f"{challenger.shape}")
    return champion, challenger


def _counts(champion: np.ndarray, challenger: np.ndarray) -> tuple[int, int, int]:
    """(b, c, items): challenger-only right, champion-only right, all items."""
    return int(np.count_nonzero(challenger & ~champion)), int(np.count_nonzero(champion & ~challenger)), len(champion)


def _mcnemar_p(b: int, c: int, alternative: str) -> float:
    n = b + c
    greater, less = float(stats.binom.sf(b - 1, n, 0.5)), float(stats.binom.cdf(b, n, 0.5))
    if alternative == "greater":
        return greater
    if alternative == "less":
        return less
    if alternative == "two-sided":  # Binomial(n, 1/2) is symmetric: twice the smaller tail
        return min(1.0, 2 * min(greater, less))
    raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', not {alternative!r}")


def mcnemar_exact(champion_correct, challenger_correct, alternative: Alternative = "greater") -> McNemar:
    """Exact McNemar test: among the b + c items the models disagree on, is b unusual for Binomial(b + c, 1/2)?

    "greater": is the challenger better (b large); "less": is it worse; "two-sided": either. Without
    disagreements there is no evidence either way: p = 1.
    """
    b, c, items = _counts(*_pairs(champion_correct, challenger_correct))
    return McNemar(b, c, items, _mcnemar_p(b, c, alternative), alternative)


def paired_bootstrap(champion_correct, challenger_correct, confidence: float = 0.95, resamples: int = 2000,
                     seed: int = 0) -> Interval:
    """Seeded percentile bootstrap interval of the accuracy difference (challenger - champion), two-sided.

    Resampling n items with replacement only changes how many b items, c items and agreements the resample
    holds, and those counts are Multinomial(n, observed shares): drawing them is the same bootstrap as
    resampling items, in O(resamples) memory and time whatever n is. Percentile, not BCa: for a mean of
    values in {-1, 0, 1} at gate sizes the corrections are small, and the coverage test holds it to ~95%.
    """
    b, c, items = _counts(*_pairs(champion_correct, challenger_correct))
    if not items:
        raise ValueError("no items to resample")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    drawn = np.random.default_rng(seed).multinomial(items, [b / items, c / items, 1 - (b + c) / items],
                                                    size=resamples)
    differences = (drawn[:, 0] - drawn[:, 1]) / items
    low, high = np.quantile(differences, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval((b - c) / items, float(low), float(high), confidence)


def non_inferior(champion_correct, challenger_correct, tolerance: float = 0.02, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> NonInferiority:
    """Is the challenger worse by no more than `tolerance`, at one-sided `confidence`? (lower bound > -tolerance)

    The lower end of a two-sided (2 * confidence - 1) interval is a one-sided `confidence` lower bound.
    """
    interval = paired_bootstrap(champion_correct, challenger_correct, 2 * confidence - 1, resamples, seed)
    return NonInferiority(interval.low > -tolerance, interval.low, interval.estimate, tolerance, confidence)


def class_losses(champion_correct, challenger_correct, labels, classes: Sequence[str] | None = None,
                 class_tolerance: float = 0.05, alpha: float = 0.05) -> list[ClassLoss]:
    """Each class's accuracy drop, flagged when it is above `class_tolerance` and unlikely to be chance.

    Unlikely to be chance: the exact McNemar test within the class says the challenger is worse at
    alpha / (number of classes present). Bonferroni, because a challenger as good as the champion gets one
    chance per class to look worse somewhere. Tiny classes: with under 5 items on which the models disagree
    no result reaches p < 0.05 (1/2^5 = 0.031), so a class that small is reported but never flagged; a big
    class losing a few points is flagged only when the loss is clear. `classes` names the labels' indices.
    """
    champion, challenger = _pairs(champion_correct, challenger_correct)
    labels = np.asarray(labels)
    if labels.shape != champion.shape:
        raise ValueError(f"{len(labels)} labels for {len(champion)} items")
    present = np.unique(labels)
    level = alpha / max(len(present), 1)
    losses = []
    for label in present:
        mine = labels == label
        b, c, items = _counts(champion[mine], challenger[mine])
        p_value, drop = _mcnemar_p(b, c, "less"), (c - b) / items
        losses.append(ClassLoss(classes[int(label)] if classes is not None else label.item(), items,
                                float(champion[mine].mean()), float(challenger[mine].mean()), drop, p_value,
                                drop > class_tolerance and p_value < level))
    return losses


def required_pairs(margin: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Holdout items a one-sided McNemar test at `alpha` needs to detect a gain of `margin` with `power`.

    Connor (1987), "Sample size for testing differences in proportions for the paired-sample design",
    Biometrics 43:207-211, one-sided normal approximation:
        n = (z[1 - alpha] * sqrt(psi) + z[power] * sqrt(psi - delta^2))^2 / delta^2
    with delta = margin (the gain, p_b - p_c) and psi = discordance (the share of items the models disagree
    on, p_b + p_c). psi >= delta: a gain of delta needs at least that many disagreements.
    """
    if not 0 < margin <= discordance <= 1:
        raise ValueError(f"need 0 < margin <= discordance <= 1, got margin {margin}, discordance {discordance}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must be between 0 and 1, got {alpha} and {power}")
    z_alpha, z_power = stats.norm.ppf(1 - alpha), stats.norm.ppf(power)
    root = z_alpha * math.sqrt(discordance) + z_power * math.sqrt(discordance - margin ** 2)
    return math.ceil(root ** 2 / margin ** 2)


def required_test_items(tolerance: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Test items a one-sided non-inferiority bound at `alpha` needs to pass an equally good challenger
    (true difference 0) with `power`, when the models disagree on `discordance` of the items.

    The difference of two paired accuracies has standard error sqrt(discordance / n) when the gain is 0, and
    the bound passes when it sits above -tolerance: n = (z[1 - alpha] + z[power])^2 * discordance / tolerance^2.
    A test split smaller than this rejects equally good challengers more often than 1 - power.
    """
    if not 0 < tolerance < 1 or not 0 < discordance <= 1:
        raise ValueError(f"need 0 < tolerance < 1 and 0 < discordance <= 1, got {tolerance} and {discordance}")
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    return math.ceil(z ** 2 * discordance / tolerance ** 2)


def estimate_discordance(champion_correct, challenger_correct, floor: float = 0.05) -> float:
    """The share of items the models disagree on, never below `floor`.

    The floor keeps the holdout size honest: two nearly identical models (1 disagreement in 1000) would
    otherwise "need" only a few hundred items, and a small holdout that happened to show few disagreements
    would justify its own size. Retrained classifiers disagree on a few percent of items or more.
    """
    b, c, items = _counts(*_pairs(champion_correct, challenger_correct))
    return max(floor, (b + c) / items) if items else floor


@dataclass(frozen=True)
class EvidenceRule:
    """What the gate asks for; every test is one-sided at `alpha`."""

    alpha: float = 0.05              # the chance a challenger no better than the champion gets promoted, at most
    power: float = 0.8               # the chance a holdout of the required size shows a real gain of `margin`
    margin: float = 0.02             # the smallest accuracy gain worth promoting: sizes the holdout
    tolerance: float = 0.03          # the most accuracy the challenger may lose on the base test split
    class_tolerance: float = 0.05    # the most accuracy any one class may lose (on either split)
    min_holdout: int = 20            # below this many holdout items, no conclusion from the holdout at all
    discordance_floor: float = 0.05  # the least disagreement assumed when sizing the holdout
    resamples: int = 2000            # bootstrap resamples


@dataclass(frozen=True)
class Evidence:
    """Every number the verdict rests on, computed whichever rule decides."""

    rule: EvidenceRule
    holdout: McNemar
    holdout_accuracy: tuple[float, float] | None  # (champion, challenger); None without a holdout
    holdout_interval: Interval | None  # two-sided at 1 - 2 alpha: its low end is a one-sided 1 - alpha bound
    discordance: float  # the holdout's, floored: what `required_holdout` assumes
    required_holdout: int
    test_items: int
    test_required: int  # test items an equally good challenger needs to pass non-inferiority with `power`
    test_accuracy: tuple[float, float]
    test: NonInferiority
    classes: tuple[tuple[str, ClassLoss], ...]  # (split, loss), test split first

    def as_dict(self) -> dict:
        h, interval, (champion, challenger) = self.holdout, self.holdout_interval, self.holdout_accuracy or (None,) * 2
        return {**{f"rule_{k}": v for k, v in vars(self.rule).items()},
                "holdout_items": h.items, "holdout_b": h.b, "holdout_c": h.c, "holdout_p_value": h.p_value,
                "holdout_champion_accuracy": champion, "holdout_challenger_accuracy": challenger,
                **{f"holdout_interval_{k}": getattr(interval, k, None) for k in ("estimate", "low", "high",
                                                                                   "confidence")},
                "holdout_discordance": self.discordance, "holdout_required": self.required_holdout,
                "test_items": self.test_items, "test_required": self.test_required,
                "test_champion_accuracy": self.test_accuracy[0],
                "test_challenger_accuracy": self.test_accuracy[1], "test_difference": self.test.estimate,
                "test_lower_bound": self.test.lower_bound, "test_confidence": self.test.confidence,
                "test_non_inferior": self.test.passed,
                "flagged_classes": [f"{split}:{loss.label}" for split, loss in self.classes if loss.flagged],
                "classes": [{"split": split, **vars(loss)} for split, loss in self.classes]}


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and its reason in one sentence, with the evidence behind it."""

    outcome: Outcome
    reason: str
    failed_rule: str | None  # test_split, class_loss, holdout_size, no_disagreement, holdout; None on promote
    evidence: Evidence

    @property
    def promoted(self) -> bool:
        return self.outcome == "promote"

    def as_dict(self) -> dict:
        """Flat and JSON-ready for MLflow and the audit log (the int and float values are the metrics)."""
        return {"outcome": self.outcome, "reason": self.reason, "failed_rule": self.failed_rule,
                **self.evidence.as_dict()}


def gather_evidence(holdout: Paired, test: Paired, rule: EvidenceRule = EvidenceRule(),
                    classes: Sequence[str] | None = None, seed: int = 0) -> Evidence:
    """Every statistic the gate uses, on the feedback holdout and the base test split; seeded."""
    if not len(test.champion):
        raise ValueError("the gate's test split is empty")
    interval = (paired_bootstrap(holdout.champion, holdout.challenger, 1 - 2 * rule.alpha, rule.resamples, seed)
                if len(holdout.champion) else None)
    discordance = estimate_discordance(holdout.champion, holdout.challenger, max(rule.discordance_floor, rule.margin))
    split_losses = [(split, loss) for split, paired in (("test", test), ("holdout", holdout))
                    if paired.labels is not None and len(paired.labels)
                    for loss in class_losses(paired.champion, paired.challenger, paired.labels, classes,
                                             rule.class_tolerance, rule.alpha)]
    return Evidence(rule, mcnemar_exact(holdout.champion, holdout.challenger, "greater"), holdout.accuracies(),
                    interval, discordance, required_pairs(rule.margin, discordance, rule.alpha, rule.power),
                    len(test.champion),
                    required_test_items(rule.tolerance, estimate_discordance(test.champion, test.challenger,
                                                                            rule.discordance_floor),
                                        rule.alpha, rule.power),
                    test.accuracies(),
                    non_inferior(test.champion, test.challenger, rule.tolerance, 1 - rule.alpha, rule.resamples, seed),
                    tuple(split_losses))


def decide_on_evidence(holdout: Paired, test: Paired, rule: EvidenceRule = EvidenceRule(),
                       classes: Sequence[str] | None = None, seed: int = 0,
                       gain_on: str = "feedback holdout") -> Verdict:
    """Promote, reject, or wait for more feedback.

    The rules, in order (safety first: no amount of feedback changes the base test split):

    1. reject when the challenger is not shown within `tolerance` of the champion on the base test split
       (one-sided 1 - alpha bootstrap lower bound of the difference > -tolerance);
    2. reject when a class loses more than `class_tolerance` on either split (see `class_losses`);
    3. not enough evidence with under `min_holdout` holdout items, or none the models disagree on;
    4. promote when the holdout shows a gain: exact McNemar p < alpha AND the bootstrap lower bound > 0.
       Lower bound > 0, not >= margin: margin sizes the holdout (rule 5), and demanding proof of a gain of
       at least margin would refuse a challenger exactly margin better about 95% of the time;
    5. no gain shown: reject when the interval's upper bound is below margin (a gain worth promoting is ruled
       out) or the holdout has the `required_pairs` for a gain of margin (it would likely have shown one);
       otherwise not enough evidence. A shown gain needs no size check: the exact test keeps false
       promotions under alpha at any size.

    `gain_on` names the `holdout` items in the reason (the gate passes the base test split as both when
    there is no feedback holdout yet).
    """
    evidence = gather_evidence(holdout, test, rule, classes, seed)
    return Verdict(*_judge(evidence, gain_on), evidence)


def _judge(e: Evidence, on: str = "feedback holdout") -> tuple[Outcome, str, str | None]:
    r, h, t = e.rule, e.holdout, e.test
    tested = f"{e.test_accuracy[1]:.4f} vs the champion's {e.test_accuracy[0]:.4f} on {e.test_items} items"
    if not t.passed:
        small = (f"; its {e.test_items} items are fewer than the {e.test_required} that would show an equally good "
                 f"challenger within {r.tolerance} with power {r.power}: a larger test split or tolerance "
                 f"decides better" if e.test_items < e.test_required else "")
        return "reject", (f"worse on the base test split than allowed: {tested}, and the {t.confidence:.0%} lower "
                          f"bound of the difference, {t.lower_bound:+.4f}, is not above -{r.tolerance}{small}"), \
            "test_split"
    for split, loss in e.classes:
        if loss.flagged:
            return "reject", (f"class {loss.label!r} loses {loss.drop:.4f} of its accuracy on the {split} split "
                              f"({loss.champion_accuracy:.4f} -> {loss.challenger_accuracy:.4f} on {loss.items} "
                              f"items, p={loss.p_value:.2g}), more than {r.class_tolerance}"), "class_loss"
    if h.items < r.min_holdout:
        return "not_enough_evidence", (f"only {h.items} {on} items, fewer than the {r.min_holdout} "
                                       f"needed before they can decide anything"), "holdout_size"
    if not h.b + h.c:
        return "not_enough_evidence", f"the two models agree on all {h.items} {on} items", "no_disagreement"
    (champion, challenger), interval = e.holdout_accuracy, e.holdout_interval
    shown = (f"{challenger:.4f} vs the champion's {champion:.4f} on {h.items} {on} items (fixes {h.b}, breaks "
             f"{h.c}, McNemar p={h.p_value:.2g}, {interval.confidence:.0%} interval of the gain "
             f"[{interval.low:+.4f}, {interval.high:+.4f}])")
    if h.p_value < r.alpha and interval.low > 0:
        return "promote", (f"better on the {on}, {shown}, and within {r.tolerance} of the champion "
                           f"on the base test split, {tested}, with no class losing more than "
                           f"{r.class_tolerance}"), None
    if interval.high < r.margin:
        return "reject", (f"not better on the {on}, {shown}, which rules out a gain of "
                          f"{r.margin}"), "holdout"
    if h.items < e.required_holdout:
        return "not_enough_evidence", (f"no gain shown on the {on}, {shown}, and {h.items} items are "
                                       f"fewer than the {e.required_holdout} needed to show a gain of {r.margin} "
                                       f"with power {r.power}"), "holdout_size"
    return "reject", (f"not better on the {on}, {shown}, although {h.items} items are enough to "
                      f"show a gain of {r.margin} with power {r.power}"), "holdout"
