"""The retrain's search size: one focused trial only when the champion plainly fails on the new labels."""

import math

import numpy as np
import pytest
from scipy import stats

from cluster.settings import TuneSettings
from tune.plan import accuracy_upper_bound, focused_space, plan_search

RULE = TuneSettings()  # 4 trials, clear_drop 0.2


def answers(right: int, wrong: int) -> np.ndarray:
    return np.array([True] * right + [False] * wrong)


def test_the_upper_bound_is_clopper_pearsons_and_covers_the_truth_at_least_95_percent_of_the_time():
    assert accuracy_upper_bound(3, 25) == pytest.approx(stats.beta.ppf(0.95, 4, 22))
    assert accuracy_upper_bound(0, 10) == pytest.approx(1 - 0.05 ** (1 / 10))  # the exact zero-success bound
    assert accuracy_upper_bound(10, 10) == 1.0 and accuracy_upper_bound(0, 0) == 1.0
    rng, truth = np.random.default_rng(0), 0.3
    covered = [accuracy_upper_bound(int(k), 40) >= truth for k in rng.binomial(40, truth, size=2000)]
    assert np.mean(covered) >= 0.95


def test_a_plain_failure_on_the_feedback_runs_one_focused_trial():
    plan = plan_search(RULE, answers(4, 26), base_accuracy=0.98)  # 0.13 on a rotated stream
    assert plan.clear and plan.trials == 1 and "clear shift" in plan.reason and "4 of 30" in plan.reason
    assert plan.space["lr"] == pytest.approx(math.sqrt(RULE.lr_min * RULE.lr_max))
    assert plan.space["batch_size"] == 64 and plan.space["fine_tune"] is True and plan.space["weight_decay"] == 0.0


@pytest.mark.parametrize("right, wrong, why", [
    (60, 15, "a subtle shift: 0.80, its bound 0.87 within 0.2 of 0.98"),
    (2, 3, "too few labels: 0.40, but the bound of 5 items reaches 0.81"),
    (0, 0, "no labels at all"),
])
def test_anything_short_of_a_plain_failure_runs_the_full_search(right, wrong, why):
    plan = plan_search(RULE, answers(right, wrong), base_accuracy=0.98)
    assert not plan.clear and plan.trials == RULE.num_samples and "full search of 4 trials" in plan.reason, why


def test_clear_drop_zero_always_runs_the_full_search_and_says_so():
    plan = plan_search(TuneSettings(clear_drop=0.0), answers(0, 100), base_accuracy=0.99)
    assert not plan.clear and plan.trials == 4 and "clear_drop=0" in plan.reason


def test_the_focused_trial_trains_from_fresh_weights_only_when_fine_tuning_is_off():
    assert focused_space(TuneSettings(fine_tune="false"))["fine_tune"] is False
    assert focused_space(TuneSettings(fine_tune="search"))["fine_tune"] is True


def test_the_champion_is_scored_on_the_feedback_it_learns_from_never_on_the_gates_holdout(tmp_path):
    from PIL import Image

    from cluster.settings import DataSettings, load_settings
    from train.data import prepare
    from train.train import build_model
    from tune.gate import right_answers
    from tune.retrain import FeedbackSamples, champion_on_feedback

    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path / "data")})
    base = prepare(DataSettings(limit=300), tmp_path / "prepared")
    model = build_model(settings, base)
    images, labels = base.split("test")
    paths = []
    for i, image in enumerate(images[:30]):
        Image.fromarray(image[:, :, 0]).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    samples = FeedbackSamples([f"f{i}" for i in range(30)], paths, labels[:30])
    index = np.arange(30)
    parts = {"train": samples.take(index < 12), "val": samples.take((index >= 12) & (index < 20)),
             "holdout": samples.take(index >= 20)}

    right, own = champion_on_feedback(model, base, parts)

    expected = right_answers(model, [{"image": images[:20], "label": labels[:20]}])
    assert len(right) == 20 and (right == expected).all()  # train then val parts; the 10 holdout items left out
    val_x, val_y = base.split("val")
    assert own == pytest.approx(float(right_answers(model, [{"image": val_x, "label": val_y}]).mean()))
