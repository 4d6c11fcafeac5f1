"""The promotion rule and the feedback split, without Ray."""

import numpy as np
import pytest

from cluster.settings import GateSettings, TuneSettings
from train.data import DatasetMeta, PreparedData
from tune.gate import decide
from tune.retrain import FeedbackSamples, split_feedback, training_data

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
    return FeedbackSamples([f"fb-{i}" for i in range(n)], np.full((n, 4, 4, 1), 7, np.uint8),
                           np.arange(n) % 3)


def test_feedback_split_is_disjoint_stable_and_grows_without_reshuffling():
    rule = TuneSettings(feedback_val_fraction=0.2, feedback_holdout_fraction=0.25)
    small = split_feedback(feedback(200), rule)
    assert sum(len(p) for p in small.values()) == 200
    assert not set(small["holdout"].ids) & set(small["train"].ids)
    assert 30 <= len(small["holdout"]) <= 70  # about a quarter
    larger = split_feedback(feedback(400), rule)
    assert set(small["holdout"].ids) <= set(larger["holdout"].ids)  # an item never moves bucket


def test_training_data_oversamples_feedback_to_the_share():
    meta = DatasetMeta("t", ["a", "b", "c"], 4, 1, {}, "v", {})
    arrays = {f"{x}_{s}": (np.zeros((n, 4, 4, 1), np.uint8) if x == "x" else np.zeros(n, np.int64))
              for s, n in (("train", 700), ("val", 100), ("test", 100)) for x in ("x", "y")}
    parts = split_feedback(feedback(200), TuneSettings())
    data = training_data(PreparedData(meta, arrays), parts, share=0.3)
    x_train, _ = data.split("train")
    share = (x_train == 7).all(axis=(1, 2, 3)).mean()
    assert share == pytest.approx(0.3, abs=0.06)
    assert len(data.split("val")[0]) == 100 + len(parts["val"])
    assert len(data.split("test")[0]) == 100  # the gate's test split is untouched
