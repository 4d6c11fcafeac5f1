"""The gate's evidence: paired tests that promote a better challenger and rarely a coin flip. Seeded, no Ray."""

import json
import time

import numpy as np
import pytest
from scipy import stats

from train.evidence import (
    EvidenceRule,
    Paired,
    class_losses,
    decide_on_evidence,
    estimate_discordance,
    mcnemar_exact,
    non_inferior,
    paired_bootstrap,
    required_pairs,
    required_test_items,
)

RULE = EvidenceRule()  # alpha 0.05, power 0.8, margin 0.02, tolerance 0.03, class_tolerance 0.05


def pairs(b: int, c: int, right: int, wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """(champion, challenger) correctness: b items the challenger fixes, c it breaks, the rest both right/wrong."""
    counts = [b, c, right, wrong]
    return np.repeat([False, True, True, False], counts), np.repeat([True, False, True, False], counts)


def independent(rng: np.random.Generator, items: int, champion: float, challenger: float) -> Paired:
    """Two models right with the given accuracies, their mistakes independent of each other."""
    return Paired(rng.random(items) < champion, rng.random(items) < challenger)


SAME_ON_TEST = Paired(*pairs(0, 0, 1800, 200))  # a test split on which the models agree item for item


@pytest.mark.parametrize("b,c", [(7, 2), (2, 7), (10, 10), (0, 5), (31, 12), (1, 0), (40, 61)])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_exact_mcnemar_is_the_binomial_test_on_the_items_the_models_disagree_on(b, c, alternative):
    result = mcnemar_exact(*pairs(b, c, right=50, wrong=9), alternative=alternative)
    assert (result.b, result.c, result.items) == (b, c, b + c + 59)
    assert result.p_value == pytest.approx(stats.binomtest(b, b + c, 0.5, alternative=alternative).pvalue,
                                           rel=1e-9, abs=1e-15)


def test_models_that_never_disagree_give_no_evidence_either_way():
    assert mcnemar_exact(*pairs(0, 0, 80, 20)).p_value == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])


def test_the_bootstrap_is_seeded_fast_and_brackets_the_observed_gain():
    rng = np.random.default_rng(3)
    champion, challenger = rng.random(10_000) < 0.80, rng.random(10_000) < 0.82
    interval = paired_bootstrap(champion, challenger, resamples=2000, seed=11)
    assert interval == paired_bootstrap(champion, challenger, resamples=2000, seed=11)
    assert interval.estimate == pytest.approx(challenger.mean() - champion.mean())
    assert interval.low < interval.estimate < interval.high
    timings = []
    for _ in range(3):  # the best of three: a timing, not a retry of the assertion
        start = time.perf_counter()
        paired_bootstrap(champion, challenger, resamples=2000, seed=11)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.05


def test_the_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng, simulations, items = np.random.default_rng(2024), 400, 300
    shares = [0.15, 0.10, 0.75]  # challenger-only right, champion-only right, agreed: true gain 0.05
    covered, widths = 0, []
    for seed in range(simulations):
        kind = rng.choice(3, size=items, p=shares)
        interval = paired_bootstrap(kind != 0, kind != 1, confidence=0.95, resamples=1000, seed=seed)
        covered += interval.low <= 0.05 <= interval.high
        widths.append(interval.high - interval.low)
    assert covered >= stats.binom.ppf(0.001, simulations, 0.92)  # no worse than 92% true coverage
    normal_width = 2 * 1.96 * np.sqrt((0.25 - 0.05 ** 2) / items)  # not covering by being too wide either
    assert np.mean(widths) == pytest.approx(normal_width, rel=0.1)


def test_required_pairs_grow_for_smaller_gains_more_power_and_more_disagreement():
    assert required_pairs(0.01, 0.1) > required_pairs(0.02, 0.1) > required_pairs(0.05, 0.1)
    assert required_pairs(0.02, 0.1, power=0.9) > required_pairs(0.02, 0.1, power=0.8) > required_pairs(
        0.02, 0.1, power=0.5)
    assert required_pairs(0.02, 0.3) > required_pairs(0.02, 0.1)
    assert required_pairs(0.02, 0.1, alpha=0.01) > required_pairs(0.02, 0.1, alpha=0.05)
    with pytest.raises(ValueError):  # a gain of 0.05 needs at least 5% of items to disagree on
        required_pairs(0.05, 0.04)


@pytest.mark.parametrize("margin,discordance", [(0.05, 0.20), (0.10, 0.30)])
def test_a_holdout_of_the_required_size_detects_the_margin_with_about_the_promised_power(margin, discordance):
    items, rng, simulations = required_pairs(margin, discordance), np.random.default_rng(7), 1000
    shares = [(discordance + margin) / 2, (discordance - margin) / 2, 1 - discordance]
    detected = 0
    for b, c, agreed in rng.multinomial(items, shares, size=simulations):
        detected += mcnemar_exact(*pairs(b, c, agreed, 0)).p_value < 0.05
    assert 0.70 <= detected / simulations <= 0.90  # 0.8 promised; Connor's normal approximation, exact test


@pytest.mark.parametrize("tolerance,discordance", [(0.03, 0.05), (0.02, 0.08)])
def test_a_test_split_of_the_required_size_passes_an_equal_challenger_with_about_the_promised_power(
        tolerance, discordance):
    items, rng, simulations = required_test_items(tolerance, discordance), np.random.default_rng(3), 300
    passed = 0
    for seed, (b, c, agreed) in enumerate(rng.multinomial(items, [discordance / 2] * 2 + [1 - discordance],
                                                          size=simulations)):
        passed += non_inferior(*pairs(b, c, agreed, 0), tolerance, 0.95, 500, seed).passed
    assert 0.70 <= passed / simulations <= 0.90  # 0.8 promised


def test_a_small_test_split_says_it_is_too_small_when_it_rejects():
    better_on_holdout = independent(np.random.default_rng(5), 500, 0.80, 0.90)
    equal_on_200 = Paired(*pairs(6, 9, 180, 5))  # -1.5 points on 200 items, 7.5% disagreement
    verdict = decide_on_evidence(better_on_holdout, equal_on_200, RULE)
    assert verdict.evidence.test_required > 200
    assert verdict.outcome == "reject" and "fewer than the" in verdict.reason
    assert verdict.evidence.as_dict()["test_required"] == verdict.evidence.test_required
    with pytest.raises(ValueError):
        required_test_items(0.0, 0.05)


def test_the_estimated_disagreement_never_falls_below_its_floor():
    nearly_identical = pairs(1, 0, 900, 99)
    assert estimate_discordance(*nearly_identical) == 0.05
    assert required_pairs(0.02, estimate_discordance(*nearly_identical)) >= 700
    assert estimate_discordance(*pairs(100, 80, 700, 120)) == pytest.approx(0.18)


def test_a_coin_flip_challenger_is_promoted_in_at_most_about_alpha_of_holdouts():
    rng, holdouts = np.random.default_rng(99), 300
    verdicts = [decide_on_evidence(independent(rng, 400, 0.8, 0.8), SAME_ON_TEST, RULE, seed=i)
                for i in range(holdouts)]
    promoted = sum(v.promoted for v in verdicts)
    assert promoted <= stats.binom.ppf(0.999, holdouts, RULE.alpha)
    # The holdout decided every one of them: the safety checks passed, so the test above exercised the holdout.
    assert {v.failed_rule for v in verdicts} <= {None, "holdout_size", "holdout"}


def test_a_clearly_better_challenger_is_promoted_with_every_number_on_record():
    verdict = decide_on_evidence(independent(np.random.default_rng(5), 500, 0.80, 0.90), SAME_ON_TEST, RULE)
    assert verdict.outcome == "promote" and verdict.failed_rule is None
    record = json.loads(json.dumps(verdict.as_dict()))  # audit- and MLflow-ready
    assert record["holdout_items"] == 500 and record["holdout_p_value"] < 0.05
    assert 0 < record["holdout_interval_low"] < record["holdout_interval_estimate"] < record["holdout_interval_high"]
    assert record["holdout_b"] > record["holdout_c"] and record["test_non_inferior"]
    # A shown gain needs no size check: 500 items are below what a 0.02 gain would need, yet this one is clear.
    assert record["holdout_required"] > 500
    assert "500 feedback holdout items" in verdict.reason and f"p={record['holdout_p_value']:.2g}" in verdict.reason


def test_a_small_holdout_is_not_enough_evidence_either_way():
    too_few = decide_on_evidence(Paired(*pairs(3, 0, 10, 2)), SAME_ON_TEST, RULE)
    assert too_few.outcome == "not_enough_evidence" and "fewer than the 20" in too_few.reason
    small = decide_on_evidence(Paired(*pairs(3, 1, 22, 4)), SAME_ON_TEST, RULE)
    assert small.outcome == "not_enough_evidence" and small.failed_rule == "holdout_size"
    assert f"fewer than the {small.evidence.required_holdout} needed" in small.reason
    agreeing = decide_on_evidence(Paired(*pairs(0, 0, 4000, 1000)), SAME_ON_TEST, RULE)
    assert agreeing.outcome == "not_enough_evidence" and agreeing.failed_rule == "no_disagreement"


def test_no_gain_on_a_holdout_big_enough_to_show_one_rejects():
    verdict = decide_on_evidence(Paired(*pairs(20, 20, 860, 100)), SAME_ON_TEST, RULE)
    assert verdict.evidence.required_holdout <= 1000
    assert verdict.outcome == "reject" and verdict.failed_rule == "holdout"
    assert "not better on the feedback holdout" in verdict.reason


def test_a_challenger_clearly_worse_on_a_small_holdout_is_rejected_not_waited_for():
    verdict = decide_on_evidence(Paired(*pairs(2, 20, 70, 8)), SAME_ON_TEST, RULE)
    assert verdict.evidence.required_holdout > 100  # too small to show a gain of 0.02, big enough to show a loss
    assert verdict.outcome == "reject" and verdict.failed_rule == "holdout"
    assert "rules out a gain of 0.02" in verdict.reason


def test_worse_on_the_test_split_beyond_tolerance_rejects_naming_the_test_split():
    better_on_holdout = independent(np.random.default_rng(5), 500, 0.80, 0.90)
    five_points_worse = Paired(*pairs(20, 120, 1780, 80))
    verdict = decide_on_evidence(better_on_holdout, five_points_worse, RULE)
    assert verdict.outcome == "reject" and verdict.failed_rule == "test_split"
    assert "base test split" in verdict.reason and not verdict.evidence.test.passed
    half_a_point_worse = Paired(*pairs(20, 30, 1850, 100))  # within tolerance, and shown to be
    assert decide_on_evidence(better_on_holdout, half_a_point_worse, RULE).promoted


NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_a_class_collapse_rejects_naming_the_class_though_the_total_stays_within_tolerance():
    parts, labels = [], []
    for label in range(10):
        # Champion: 95% right on every class. Challenger: fixes 2 items of each class but loses half of "seven".
        part = pairs(0, 30, 27, 3) if label == 7 else pairs(2, 0, 190, 8)
        parts.append(part)
        labels.append(np.full(len(part[0]), label))
    test = Paired(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                  np.concatenate(labels))
    verdict = decide_on_evidence(independent(np.random.default_rng(5), 500, 0.80, 0.90), test, RULE, NAMES)
    assert verdict.evidence.test.passed  # the total alone would have let it through
    assert verdict.outcome == "reject" and verdict.failed_rule == "class_loss"
    assert "'seven'" in verdict.reason and verdict.as_dict()["flagged_classes"] == ["test:seven"]


def test_a_class_is_flagged_only_for_a_loss_beyond_tolerance_that_is_not_chance():
    cases = {"tiny": pairs(0, 4, 0, 0),        # loses all 4 items: too few to tell from chance
             "noisy": pairs(4, 10, 80, 6),     # -6 points on 100 items: p = 0.09, could be chance
             "small": pairs(0, 12, 488, 0),    # -2.4 points on 500 items, clear but within tolerance
             "clear": pairs(1, 21, 70, 8)}     # -20 points on 100 items
    champion, challenger = (np.concatenate([case[i] for case in cases.values()]) for i in (0, 1))
    labels = np.concatenate([np.full(len(case[0]), i) for i, case in enumerate(cases.values())])
    losses = {loss.label: loss for loss in class_losses(champion, challenger, labels, list(cases))}
    assert losses["tiny"].drop == 1.0 and losses["clear"].drop == pytest.approx(0.20)
    assert [name for name, loss in losses.items() if loss.flagged] == ["clear"]


def test_non_inferiority_is_a_one_sided_lower_bound_against_the_tolerance():
    slightly_worse = pairs(30, 40, 1800, 130)  # -0.5 points on 2000 items
    result = non_inferior(*slightly_worse, tolerance=0.02, confidence=0.95)
    assert result.passed and -0.02 < result.lower_bound < result.estimate == pytest.approx(-0.005)
    assert not non_inferior(*slightly_worse, tolerance=0.005, confidence=0.95).passed
    within_but_unsure = pairs(30, 60, 1800, 110)  # -1.5 points: inside the tolerance, but not shown to be
    assert not non_inferior(*within_but_unsure, tolerance=0.02, confidence=0.95).passed
    many = non_inferior(*pairs(300, 400, 18000, 1300), tolerance=0.02, confidence=0.95)  # 20,000 items
    one_sided_95 = stats.norm.ppf(0.95) * np.sqrt((0.035 - 0.005 ** 2) / 20_000)  # normal theory, not 1.96
    assert many.estimate - many.lower_bound == pytest.approx(one_sided_95, rel=0.08)


def test_correctness_comes_from_predictions_and_mismatched_items_are_refused():
    paired = Paired.from_predictions([1, 2, 3, 4], [1, 0, 3, 4], labels=[1, 2, 0, 4])
    assert paired.champion.tolist() == [True, True, False, True]
    assert paired.challenger.tolist() == [True, False, False, True]
    with pytest.raises(ValueError):
        Paired(np.ones(5, bool), np.ones(4, bool))
    with pytest.raises(ValueError):
        Paired(np.ones(4, bool), np.ones(4, bool), labels=np.zeros(3))
