"""The label-budget benchmark's decisions (simulation/label_budget.py), on plain values: no training."""

import numpy as np
import pytest

from simulation.label_budget import (
    Ratio,
    candidates,
    curve_table,
    labels_needed,
    queue_picks,
    random_picks,
    ratio,
    summary,
    summary_table,
    target_accuracy,
)

BUDGETS = [10, 20, 40, 80]
CLASSES = ["0", "1", "2"]


def softmax_rows(*rows: tuple[float, float, float]) -> np.ndarray:
    return np.array(rows, dtype=np.float64)


def test_the_queue_picks_the_closest_calls_one_predicted_class_after_another():
    probabilities = softmax_rows(
        (0.98, 0.01, 0.01),  # 0: sure of "0"
        (0.50, 0.45, 0.05),  # 1: torn "0"/"1"
        (0.05, 0.90, 0.05),  # 2: sure of "1"
        (0.10, 0.50, 0.40),  # 3: torn "1"/"2"
        (0.34, 0.33, 0.33),  # 4: no idea, says "0"
    )
    pool = candidates(probabilities, CLASSES)

    assert [c.label for c in pool] == ["0", "0", "1", "1", "0"]
    assert pool[1].probabilities == {"0": 0.5, "1": 0.45, "2": 0.05}
    # Each predicted class's closest call in turn (least margin first within the turn), then the next best.
    assert queue_picks(pool, 3).tolist() == [4, 3, 1]
    assert queue_picks(pool, 5).tolist() == [4, 3, 1, 2, 0]
    assert queue_picks(pool, 2).tolist() == queue_picks(pool, 5)[:2].tolist()  # budgets are nested


def test_a_random_sample_is_seeded_nested_and_without_repeats():
    small, large = random_picks(100, 10, seed=3), random_picks(100, 40, seed=3)

    assert large[:10].tolist() == small.tolist()
    assert len(set(large.tolist())) == 40 and large.max() < 100
    assert random_picks(100, 10, seed=4).tolist() != small.tolist()


def test_the_target_is_most_of_the_gain_a_random_sample_made_at_the_largest_budget():
    assert target_accuracy(0.2, [0.3, 0.5, 0.7], share=0.9) == pytest.approx(0.65)
    assert target_accuracy(0.8, [0.79, 0.8]) is None  # labels recovered nothing: no target


@pytest.mark.parametrize("curve, target, needed", [
    ([0.5, 0.6, 0.7, 0.8], 0.70, 40.0),                    # on a grid point
    ([0.5, 0.6, 0.7, 0.8], 0.65, 2 ** 4.82192809488736),   # halfway in log2 between 20 and 40: 28.3
    ([0.7, 0.8, 0.8, 0.9], 0.60, 10.0),                    # at the smallest budget already: an upper bound
    ([0.5, 0.6, 0.6, 0.6], 0.70, None),                    # never
    ([0.5, 0.8, 0.6, 0.9], 0.75, 2 ** (np.log2(10) + 0.25 / 0.3)),  # the first crossing counts
])
def test_labels_needed_reads_the_first_crossing_off_the_curve(curve, target, needed):
    found = labels_needed(BUDGETS, curve, target)
    assert found == (None if needed is None else pytest.approx(needed))


@pytest.mark.parametrize("queue, random, value, bound, meets", [
    (20.0, 80.0, 0.25, "=", True),
    (40.0, 60.0, 40 / 60, "=", False),
    (10.0, 40.0, 0.25, "<=", True),     # the queue reached it at the smallest budget
    (10.0, 15.0, 10 / 15, "<=", None),  # at most 0.67: the grid cannot tell whether it is below 0.5
    (30.0, 10.0, 3.0, ">=", False),     # random at the smallest budget, the queue later
    (None, 40.0, 2.0, ">", False),      # the queue never reached it
    (None, 400.0, 0.2, ">", None),
    (10.0, 10.0, None, "=", None),      # both at the smallest budget
])
def test_the_ratio_keeps_what_the_grid_edges_leave_unknown(queue, random, value, bound, meets):
    found = ratio(queue, random, BUDGETS)
    assert (found.bound, found.meets_goal) == (bound, meets)
    assert found.value == (None if value is None else pytest.approx(value))


def test_a_shift_where_the_queue_halves_the_labels_meets_the_goal():
    queue_runs = [[0.70, 0.85, 0.87, 0.88], [0.72, 0.85, 0.89, 0.90]]
    random_runs = [[0.40, 0.55, 0.75, 0.90], [0.42, 0.57, 0.77, 0.88]]

    verdict = summary(BUDGETS, 0.3, queue_runs, random_runs)

    assert verdict["target"] == pytest.approx(0.3 + 0.9 * 0.59)
    assert 10 < verdict["queue_needed"] < 20 and 40 < verdict["random_needed"] < 80
    assert verdict["ratio"] == pytest.approx(verdict["queue_needed"] / verdict["random_needed"])
    assert verdict["meets_goal"] is True and verdict["ratio_bound"] == "="


def test_the_tables_show_the_verdict_and_both_curves():
    row = {"shift": "rotate:90", "budgets": BUDGETS, "before": {"shifted": 0.2, "clean": 0.98},
           "shifted": {"queue": [[0.2, 0.3, 0.4, 0.5]], "random": [[0.4, 0.6, 0.7, 0.8]]},
           "clean": {"queue": [[0.97, 0.96, 0.97, 0.97]], "random": [[0.95, 0.97, 0.97, 0.98]]}}
    row["summary"] = summary(BUDGETS, 0.2, row["shifted"]["queue"], row["shifted"]["random"])

    [header, _, line] = summary_table([row])
    assert header.count("|") == line.count("|")
    assert "| `rotate:90` | 0.200 | 0.800 | 0.740 | > 80 | 53 | > 1.52 | missed | 0.950 |" == line
    curves = curve_table([row])
    assert curves[2] == ("| `rotate:90` | queue | 0.200 (0.980) | 0.200 (0.970) | 0.300 (0.960) | 0.400 (0.970) "
                         "| 0.500 (0.970) |")
    assert Ratio(None, "=").text() == "- (both at the smallest budget)"
