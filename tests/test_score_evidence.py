"""The gate's rules on a continuous per-image score (a segmentation model's IoU): train/score_evidence.py, and the
gate scoring two real segmentation models on masks (tune/gate.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.settings import GateSettings
from train.evidence import EvidenceRule
from train.score_evidence import Scored, decide_on_scores, mean_interval, required_items, signed_rank_p
from tune.gate import GateSet, _paired, right_answers, run_gate

RULE = EvidenceRule(alpha=0.05, margin=0.02, tolerance=0.03, min_holdout=20)


def scores(n: int, gain: float, noise: float = 0.05, seed: int = 0, base: float = 0.6) -> Scored:
    rng = np.random.default_rng(seed)
    champion = np.clip(base + rng.normal(0, 0.1, n), 0, 1)
    return Scored(champion, np.clip(champion + gain + rng.normal(0, noise, n), 0, 1))


def test_a_clear_gain_on_the_holdout_promotes():
    verdict = decide_on_scores(scores(60, 0.15), scores(200, 0.0, seed=1), RULE)
    assert verdict.outcome == "promote", verdict.reason
    assert "mean IoU" in verdict.reason and verdict.as_dict()["holdout_p_value"] < 0.05


def test_a_loss_on_the_base_test_split_rejects_whatever_the_holdout_shows():
    verdict = decide_on_scores(scores(60, 0.3), scores(200, -0.1, seed=1), RULE)
    assert (verdict.outcome, verdict.failed_rule) == ("reject", "test_split")


def test_a_small_holdout_cannot_decide_and_identical_models_show_nothing():
    assert decide_on_scores(scores(10, 0.3), scores(200, 0.0, seed=1), RULE).failed_rule == "holdout_size"
    same = scores(50, 0.0, noise=0.0)
    assert decide_on_scores(same, scores(200, 0.0, seed=1), RULE).failed_rule == "no_disagreement"


def test_no_gain_on_a_large_holdout_is_a_reject_and_on_a_small_one_a_wait():
    assert decide_on_scores(scores(2000, -0.005, noise=0.02), scores(200, 0.0, seed=1), RULE).outcome == "reject"
    unsure = decide_on_scores(scores(25, 0.005, noise=0.2), scores(200, 0.0, seed=1), RULE)
    assert unsure.outcome == "not_enough_evidence", unsure.reason


def test_the_pieces_behave_like_their_textbook_selves():
    assert signed_rank_p(np.zeros(30)) == 1.0
    assert signed_rank_p(np.full(30, 0.1)) < 1e-6 and signed_rank_p(np.full(30, -0.1)) > 0.99
    interval = mean_interval(np.r_[np.full(50, 0.1), np.full(50, -0.1)], 0.9)
    assert interval.low < 0 < interval.high and interval.estimate == pytest.approx(0)
    assert required_items(0.02, 0.1, 0.05, 0.8) == pytest.approx(155, abs=1)  # (2.486 * 0.1 / 0.02)^2
    assert required_items(0.02, 0.2, 0.05, 0.8) > 4 * 150


class Threshold(torch.nn.Module):
    """A stand-in segmentation model: pixels darker than `cut` are crack."""

    task = "segmentation"
    classes = ["background", "crack"]

    def __init__(self, cut: float):
        super().__init__()
        self.cut = cut

    def forward(self, x):
        gray = x.mean(1, keepdim=True)
        return torch.cat([gray - self.cut, self.cut - gray], 1) * 50


def dark_band_set(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = np.full((n, 24, 24, 3), 200, np.uint8)
    masks = np.zeros((n, 24, 24), np.uint8)
    for i in range(n):
        col = rng.integers(2, 20)
        images[i, :, col:col + 3] = rng.integers(60, 140)  # cracks of varying darkness
        masks[i, :, col:col + 3] = 1
    return {"image": images, "label": np.zeros(n, np.int64), "mask": masks}


def test_the_gate_scores_segmentations_by_per_image_iou_and_promotes_the_better_one():
    test, holdout = dark_band_set(80, 1), dark_band_set(40, 2)
    strict, right = Threshold(0.3), Threshold(0.65)  # the strict one misses the lighter cracks
    scored = _paired([strict, right], [test])
    assert isinstance(scored, Scored) and len(scored.champion) == 80
    assert scored.challenger.mean() == pytest.approx(1.0) and scored.champion.mean() < 0.7
    assert right_answers(right, [test]).all() and right_answers(strict, [test]).dtype == bool
    gate = run_gate(strict, "1", right, "2", GateSet(lambda: [test], lambda: [holdout], 40), GateSettings())
    assert gate.passed and gate.outcome == "promote", gate.reason
    assert gate.challenger_test == pytest.approx(1.0) and gate.holdout_size == 40
    assert "gate_holdout_p_value" in gate.metrics()
    back = run_gate(right, "2", strict, "3", GateSet(lambda: [test], lambda: [holdout], 40), GateSettings())
    assert not back.passed and back.evidence["failed_rule"] == "test_split"
