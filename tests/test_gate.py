"""The promotion rule and the feedback split, without Ray."""

import numpy as np
import pytest

from cluster.settings import GateSettings, TuneSettings
from tune.gate import decide
from tune.retrain import FeedbackSamples, feedback_repeats, split_feedback

RULE = GateSettings(margin=0.02, tolerance=0.02, min_holdout=20)


def test_better_on_holdout_and_within_tolerance_on_test_passes():
    passed, reason = decide(0.99, 0.98, 0.40, 0.85, holdout_size=50, rule=RULE)
    assert passed and "holdout" in reason


def test_worse_on_test_beyond_tolerance_fails_even_if_better_on_holdout():
    passed, reason = decide(0.99, 0.95, 0.40, 0.90, holdout_size=50, rule=RULE)
    assert not passed and "base test" in reason


def test_not_better_on_holdout_by_the_margin_fails():
    passed, _ = decide(0.99, 0.99, 0.80, 0.81, holdout_size=50, rule=RULE)
    assert not passed


def test_without_enough_holdout_the_test_split_decides():
    assert decide(0.90, 0.95, None, None, holdout_size=0, rule=RULE)[0]
    assert not decide(0.90, 0.91, 0.5, 0.9, holdout_size=5, rule=RULE)[0]


def feedback(n: int) -> FeedbackSamples:
    return FeedbackSamples([f"fb-{i}" for i in range(n)], [f"/blobs/{i}" for i in range(n)], np.arange(n) % 3)


def test_feedback_split_is_disjoint_stable_and_grows_without_reshuffling():
    rule = TuneSettings(feedback_val_fraction=0.2, feedback_holdout_fraction=0.25)
    small = split_feedback(feedback(200), rule)
    assert sum(len(p) for p in small.values()) == 200
    assert not set(small["holdout"].ids) & set(small["train"].ids)
    assert 30 <= len(small["holdout"]) <= 70  # about a quarter
    larger = split_feedback(feedback(400), rule)
    assert set(small["holdout"].ids) <= set(larger["holdout"].ids)  # an item never moves bucket
    assert small["holdout"].paths == [f"/blobs/{i[3:]}" for i in small["holdout"].ids]  # ids keep their images


@pytest.mark.parametrize("base,feedback_rows,share,repeat", [(700, 100, 0.3, 3), (700, 0, 0.3, 1),
                                                             (700, 1000, 0.3, 1), (700, 100, 0.0, 1)])
def test_feedback_is_streamed_often_enough_to_reach_its_share(base, feedback_rows, share, repeat):
    assert feedback_repeats(base, feedback_rows, share) == repeat
    if feedback_rows and share:
        achieved = repeat * feedback_rows / (base + repeat * feedback_rows)
        assert achieved == pytest.approx(share, abs=0.06) or repeat == 1
