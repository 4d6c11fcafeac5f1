"""The promotion rule and the feedback split, without Ray."""

import numpy as np
import pytest

from cluster.settings import GateSettings, TuneSettings
from train.evidence import Paired
from tune.gate import GateResult, decide
from tune.retrain import FeedbackSamples, feedback_repeats, split_feedback

RULE = GateSettings(margin=0.02, tolerance=0.02, min_holdout=20)


def paired(n: int, champion: float, challenger: float, seed: int, classes: int = 10) -> Paired:
    """Independent errors at the given accuracies on n items."""
    rng = np.random.default_rng(seed)
    return Paired(rng.random(n) < champion, rng.random(n) < challenger, np.arange(n) % classes)


def test_shown_better_on_the_holdout_and_within_tolerance_on_test_promotes():
    verdict = decide(paired(500, 0.99, 0.99, 1), paired(300, 0.40, 0.85, 2), RULE)
    assert verdict.outcome == "promote" and "feedback holdout" in verdict.reason


def test_worse_on_test_beyond_tolerance_rejects_even_if_better_on_the_holdout():
    verdict = decide(paired(500, 0.99, 0.90, 3), paired(300, 0.40, 0.90, 4), RULE)
    assert verdict.outcome == "reject" and "base test split" in verdict.reason


def test_a_holdout_showing_no_gain_never_promotes():
    verdict = decide(paired(500, 0.99, 0.99, 5), paired(60, 0.80, 0.80, 6), RULE)
    assert verdict.outcome in {"reject", "not_enough_evidence"}


def test_without_enough_holdout_the_gain_must_show_on_the_test_split():
    empty = Paired(np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, np.int64))
    clearly = decide(paired(500, 0.80, 0.95, 7), empty, RULE)
    assert clearly.outcome == "promote" and "base test split" in clearly.reason
    assert decide(paired(500, 0.95, 0.95, 8), paired(5, 0.5, 0.9, 9), RULE).outcome != "promote"


def test_the_gate_records_every_number_for_mlflow():
    verdict = decide(paired(500, 0.99, 0.99, 1), paired(300, 0.40, 0.85, 2), RULE)
    result = GateResult(verdict.promoted, verdict.reason, "1", "2", 0.99, 0.99, 0.40, 0.85, 300, 0.02, 0.02,
                        verdict.outcome, verdict.as_dict())
    metrics = result.metrics()
    assert metrics["challenger_holdout"] == 0.85 and metrics["gate_holdout_p_value"] < 0.05
    assert all(isinstance(v, float) for v in metrics.values())


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


def test_feedback_is_spread_through_the_training_stream_at_its_share():
    import pandas as pd

    from tune.retrain import mixed_rows

    base = pd.DataFrame({"path": [f"mnist/{i}" for i in range(3000)], "label": np.arange(3000) % 10})
    rows = mixed_rows(base, feedback(100).rows(), repeat=3, seed=7)
    assert len(rows) == 3300 and (rows["source"] == 1).sum() == 300
    assert rows.equals(mixed_rows(base, feedback(100).rows(), repeat=3, seed=7))  # seeded
    for part in np.array_split(rows["source"].to_numpy(), 6):  # every sixth of an epoch holds its share
        assert 0.05 < part.mean() < 0.14
    capped = rows.iloc[:640]  # an epoch capped at 10 steps of 64 still learns from feedback
    assert 30 < (capped["source"] == 1).sum() < 90
    assert (mixed_rows(base, feedback(0).rows(), repeat=3, seed=7)["source"] == 0).all()


def test_one_stream_decodes_each_row_from_its_own_root(tmp_path):
    from PIL import Image

    from train.decode import Decoder, decode_rows

    Image.new("L", (40, 30), 200).save(tmp_path / "fb.png")
    decoders = [Decoder("mnist", 28, 1), Decoder("", 28, 1)]
    batch = {"path": np.array(["mnist/0", str(tmp_path / "fb.png"), "mnist/1", str(tmp_path / "gone.png")]),
             "label": np.array([5, 7, 0, 1]), "source": np.array([0, 1, 0, 1])}
    out = decode_rows(batch, decoders)
    assert out["image"].shape == (3, 28, 28, 1) and out["label"].tolist() == [5, 7, 0]  # the missing file skipped
    assert (out["image"][1] == 200).all() and not (out["image"][0] == 200).all()
