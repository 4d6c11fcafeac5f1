"""The label-budget benchmark's decisions (simulation/label_budget.py), on plain values: no training."""

from dataclasses import replace

import numpy as np
import pytest

from simulation.label_budget import (
    T0,
    Ratio,
    candidates,
    curve_table,
    kept_runs,
    labels_needed,
    picks,
    random_picks,
    ratio,
    report,
    summary,
    summary_table,
    target_accuracy,
    verdict_line,
)
from simulation.label_orders import (
    ORDERS,
    QUEUE_ORDER,
    Embedded,
    alternate,
    by_chance,
    embedding_of,
    farthest_first,
    from_its_class,
    from_reference,
    reference_of,
)
from store.label_queue import rank

BUDGETS = [10, 20, 40, 80]
CLASSES = ["0", "1", "2"]


def features(*embeddings: tuple[float, float]) -> list[dict]:
    """Drift features as a replica logs them: only the embedding matters here."""
    return [{"confidence": 0.5, "predicted_class": "0", "emb_0": x, "emb_1": y} for x, y in embeddings]


PROBABILITIES = np.array([
    (0.98, 0.01, 0.01),  # 0: sure of "0"
    (0.50, 0.45, 0.05),  # 1: torn "0"/"1"
    (0.05, 0.90, 0.05),  # 2: sure of "1"
    (0.10, 0.50, 0.40),  # 3: torn "1"/"2"
    (0.34, 0.33, 0.33),  # 4: no idea, says "0"
])
# 0 and 2 far out on their own, the three unsure ones in a huddle.
POOL = candidates(PROBABILITIES, features((9.0, 0.0), (0.0, 0.1), (0.0, -9.0), (0.1, 0.0), (0.0, 0.0)), CLASSES)


def test_the_pool_is_read_back_as_the_store_holds_it():
    assert [c.label for c in POOL] == ["0", "0", "1", "1", "0"]
    assert POOL[1].probabilities == {"0": 0.5, "1": 0.45, "2": 0.05}
    assert POOL[3].embedding == (0.1, 0.0) and POOL[3].blob_key == "image-3"
    with pytest.raises(ValueError):
        candidates(PROBABILITIES, features((0.0, 0.0)), CLASSES)  # a prediction without its features


@pytest.mark.parametrize("features, embedding", [
    ({"confidence": 0.9, "emb_0": 1.5, "emb_1": -2}, (1.5, -2.0)),
    ({"emb_0": 1.0, "emb_2": 3.0}, (1.0,)),      # emb_0..emb_N while they last
    ({"emb_0": 1.0, "emb_1": float("nan")}, ()),  # not all finite: none
    ({"emb_0": "1.0"}, ()), ({"emb_0": True}, ()), ({}, ()), (None, ()),
], ids=["logged", "a gap", "not finite", "text", "a flag", "no features", "null"])
def test_the_embedding_is_read_back_from_the_drift_features(features, embedding):
    assert embedding_of(features) == embedding


@pytest.mark.parametrize("strategy, order", [
    ("least margin", [4, 3, 1, 2, 0]),  # the queue's: each predicted class's closest call in turn, then the next
    ("k-center", [4, 2, 0, 1, 3]),      # the closest call, the far ones (as far: the closer call first), the huddle
    ("uncertain k-center", [4, 1, 3, 2, 0]),  # the less sure half (4, 1, 3) first
])
def test_each_order_picks_nested_budgets_once_each(strategy, order):
    assert picks(POOL, strategy, 5).tolist() == order
    assert picks(POOL, strategy, 2).tolist() == order[:2]  # budgets are nested
    assert picks(POOL, strategy, 9).tolist() == order      # no more than the pool


@pytest.mark.parametrize("strategy, first", [("margin or chance", "least margin"), ("k-center or chance", "k-center")])
def test_a_mix_takes_every_other_pick_from_its_order_and_the_others_by_chance(strategy, first):
    mixed, ordered = picks(POOL, strategy, 5).tolist(), picks(POOL, first, 5).tolist()

    assert sorted(mixed) == [0, 1, 2, 3, 4] and mixed[0] == ordered[0]
    assert mixed[::2] == [i for i in ordered if i in mixed[::2]]  # its order's picks in its order
    assert picks(POOL, strategy, 3).tolist() == mixed[:3]
    assert picks(list(reversed(POOL)), strategy, 5).tolist() == mixed  # the same page however the rows came


def test_the_queue_column_is_the_queues_own_ranking():
    assert QUEUE_ORDER in ORDERS
    assert picks(POOL, QUEUE_ORDER, 5).tolist() == [int(c.blob_key.removeprefix("image-")) for c in rank(POOL, 5)]


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


@pytest.mark.parametrize("queue, random, value, bound, meets, beats", [
    (20.0, 80.0, 0.25, "=", True, True),
    (40.0, 60.0, 40 / 60, "=", False, True),
    (60.0, 40.0, 1.5, "=", False, False),
    (10.0, 40.0, 0.25, "<=", True, True),     # the order reached it at the smallest budget
    (10.0, 15.0, 10 / 15, "<=", None, True),  # at most 0.67: the grid cannot tell whether it is below 0.5
    (30.0, 10.0, 3.0, ">=", False, False),    # random at the smallest budget, the order later
    (None, 40.0, 2.0, ">", False, False),     # the order never reached it
    (None, 400.0, 0.2, ">", None, False),
    (10.0, 10.0, None, "=", None, None),      # both at the smallest budget
])
def test_the_ratio_keeps_what_the_grid_edges_leave_unknown(queue, random, value, bound, meets, beats):
    found = ratio(queue, random, BUDGETS)
    assert (found.bound, found.meets_goal, found.beats_random) == (bound, meets, beats)
    assert found.value == (None if value is None else pytest.approx(value))


def test_a_shift_where_an_order_halves_the_labels_meets_the_goal():
    runs = {"random": [[0.40, 0.55, 0.75, 0.90], [0.42, 0.57, 0.77, 0.88]],
            "k-center": [[0.70, 0.85, 0.87, 0.88], [0.72, 0.85, 0.89, 0.90]]}

    verdict = summary(BUDGETS, 0.3, runs)

    assert verdict["target"] == pytest.approx(0.3 + 0.9 * 0.59)
    needed = verdict["needed"]
    assert 10 < needed["k-center"] < 20 and 40 < needed["random"] < 80
    assert verdict["ratios"]["k-center"] == {"value": pytest.approx(needed["k-center"] / needed["random"]),
                                             "bound": "=", "meets_goal": True, "beats_random": True}


def measured_row(others: dict[str, list[float]]) -> dict:
    """One shift's row as bench/label_queue.py writes it: a random sample's run and one run of each other order."""
    shifted = {"random": [[0.4, 0.6, 0.7, 0.8]], **{s: [curve] for s, curve in others.items()}}
    row = {"shift": "rotate:90", "budgets": BUDGETS, "before": {"shifted": 0.2, "clean": 0.98}, "shifted": shifted,
           "clean": {s: [[0.95, 0.97, 0.97, 0.98]] for s in shifted}, "confidently_wrong": 0.35,
           "picked_wrong": {s: [[0.5] * 4] for s in shifted}, "picked_classes": {s: [[3, 5, 9, 10]] for s in shifted}}
    return {**row, "summary": summary(BUDGETS, 0.2, shifted)}


def test_the_tables_show_every_order_against_the_random_sample():
    row = measured_row({"least margin": [0.2, 0.3, 0.4, 0.5], "k-center": [0.75, 0.8, 0.8, 0.8]})
    row["clean"]["least margin"] = [[0.97, 0.96, 0.97, 0.97]]

    [header, _, line] = summary_table([row])
    assert header.count("|") == line.count("|") and "least margin (/ random)" in header
    assert line == "| `rotate:90` | 0.200 | 0.800 | 0.740 | 53 | > 80 (> 1.52) | <= 10 (<= 0.19) | 0.950 |"
    curves = curve_table([row])
    assert curves[3] == ("| `rotate:90` | least margin | 0.200 (0.980) | 0.200 (0.970) | 0.300 (0.960) "
                         "| 0.400 (0.970) | 0.500 (0.970) |")
    assert verdict_line([row], "k-center") == ("- k-center: fewer labels than random on 1 of 1 shifts, more on 0, "
                                               "not readable off the grid on 0; goal (<= 0.5) met on 1; "
                                               "`rotate:90` <= 0.19")
    assert Ratio(None, "=").text() == "-"


# -- the orders' pieces ------------------------------------------------------------------------------------------
def candidate(name: str, margin: float = 0.5, at: tuple[float, float] | None = (0.0, 0.0),
              version: str = "1") -> Embedded:
    """A prediction of "0" with `margin` over "1", its embedding at `at` (None: logged without one)."""
    p = (1 + margin) / 2
    return Embedded(name, T0, version, "0", p, {"0": p, "1": 1 - p}, f"image-of-{name}",
                     () if at is None else tuple(float(v) for v in at))


def names(ranked: list[Embedded]) -> list[str]:
    return [c.prediction_id for c in ranked]


def test_each_next_pick_is_the_farthest_from_every_one_picked_before_it():
    torn, near = candidate("torn", margin=0.02, at=(0, 0)), candidate("near", margin=0.05, at=(0.1, 0))
    mid, far = candidate("mid", margin=0.5, at=(2, 2)), candidate("far", margin=0.9, at=(5, 0))
    ranked = [torn, near, mid, far]  # closest call first

    assert names(farthest_first(ranked, 4)) == ["torn", "far", "mid", "near"]
    assert names(farthest_first(ranked, 2)) == ["torn", "far"]
    assert names(farthest_first(ranked, 2, placed=[candidate("picked", at=(5, 0.1))])) == ["torn", "mid"]


def test_equally_far_goes_to_the_closer_call():
    ranked = [candidate("a", 0.1, at=(0, 0)), candidate("b", 0.2, at=(0, 3)), candidate("c", 0.3, at=(3, 0))]

    assert names(farthest_first(ranked, 3)) == ["a", "b", "c"]


def test_embeddings_of_two_model_versions_are_not_compared():
    old = [candidate("old-torn", margin=0.01, at=(0, 0)), candidate("old-far", margin=0.5, at=(9, 9))]
    new = [candidate("new-torn", margin=0.02, at=(9, 9), version="2"), candidate("new-sure", margin=0.9, at=(0, 0),
                                                                               version="2")]

    # Each version's closest call is infinitely far from the other version's picks: both come first.
    assert names(farthest_first([*old, *new], 4)) == ["old-torn", "new-torn", "old-far", "new-sure"]


def test_predictions_logged_without_an_embedding_keep_the_closeness_order():
    ranked = [candidate(n, margin=m, at=None) for n, m in [("a", 0.1), ("b", 0.2), ("c", 0.3)]]

    assert names(farthest_first(ranked, 3)) == ["a", "b", "c"]


def test_a_fixed_random_order_is_the_same_whatever_order_the_rows_came_in():
    pool = [candidate(f"p-{i}", margin=i / 20) for i in range(10)]

    shuffled = by_chance(pool)
    assert names(by_chance(pool[::-1])) == names(shuffled) and sorted(names(shuffled)) == names(pool)
    assert names(shuffled) != names(pool)


def test_two_orders_in_turn_take_each_prediction_once():
    a, b, c, d = (candidate(n) for n in "abcd")

    assert names(alternate([a, b, c], [b, d], 4)) == ["a", "b", "c", "d"]  # b taken already: then c
    assert names(alternate([a, b], [c, d], 3)) == ["a", "c", "b"]
    assert names(alternate([a], [b, c, d], 9)) == ["a", "b", "c", "d"]       # one order ends: the other goes on


# -- the orders by distance from the champion's drift reference --------------------------------------------------
# The reference images the champion called "0" lie around (2, 0), its "1"s around (-2, 0); all spread twice as far
# along the first axis as along the second (within a class, as far along both).
REFERENCE = reference_of(np.array([(1, 1), (3, -1), (-1, 1), (-3, -1)]), ["0", "0", "1", "1"])


def test_the_reference_is_where_its_images_lie_and_how_they_spread():
    assert REFERENCE.mean.tolist() == [0, 0]
    assert REFERENCE.inverse_covariance == pytest.approx(np.diag([3 / 20, 3 / 4]))
    assert {c: m.tolist() for c, m in REFERENCE.class_means.items()} == {"0": [2, 0], "1": [-2, 0]}
    assert REFERENCE.within_inverse_covariance == pytest.approx(np.diag([1 / 2, 1 / 2]))
    flat = reference_of(np.array([(1, 0), (-1, 0), (3, 0)]), ["0", "0", "0"])  # no spread along the second axis
    assert from_reference([candidate("off", at=(1, 5))], flat)[0] == pytest.approx(0.0)  # so it counts for nothing


@pytest.mark.parametrize("label, at, overall, own_class", [
    ("0", (0, 0), 0.0, 2 ** 0.5),
    ("0", (2, 0), (4 * 3 / 20) ** 0.5, 0.0),           # a typical "0"
    ("1", (2, 0), (4 * 3 / 20) ** 0.5, 8 ** 0.5),      # called "1" where the reference's "0"s lie
    ("0", (0, 2), 3 ** 0.5, 2.0),                      # off along the axis the reference spreads least on
    ("7", (0, 2), 3 ** 0.5, 2 ** 0.5),                 # a class the reference never had: from its mean
    ("0", (1, 2, 3), -np.inf, -np.inf),                # another model's embedding
    ("0", None, -np.inf, -np.inf),                     # logged without one
], ids=["middle", "typical", "wrong class", "off-axis", "unseen class", "other size", "none"])
def test_the_distance_from_the_reference_is_mahalanobis(label, at, overall, own_class):
    c = replace(candidate("p", at=at), label=label)

    assert from_reference([c], REFERENCE)[0] == pytest.approx(overall)
    assert from_its_class([c], REFERENCE)[0] == pytest.approx(own_class)


def sample(name: str, label: str, margin: float, at: tuple[float, float] | None) -> Embedded:
    return replace(candidate(name, margin=margin, at=at), label=label)


SHIFTED = [
    sample("typical", "0", 0.9, (2, 0)),         # where the reference's "0"s lie, and sure of it
    sample("mistaken", "1", 0.8, (2, 0)),        # as sure, but calls it "1"
    sample("torn", "0", 0.05, (0, 0)),           # the closest call, amid the reference
    sample("off", "1", 0.6, (0, 3)),             # off the reference's spread
    sample("unplaced", "0", 0.3, None),          # logged without an embedding
]


@pytest.mark.parametrize("strategy, order", [
    ("farthest from reference", ["off", "mistaken", "typical", "torn", "unplaced"]),  # equally far: the closer call
    ("far by class", ["off", "typical", "mistaken", "torn", "unplaced"]),
    ("far from its class", ["mistaken", "torn", "off", "typical", "unplaced"]),
    ("far and unsure", ["off", "torn", "mistaken", "unplaced", "typical"]),  # ranks 1x3, 4x1, 2x4, 5x2, 3x5
], ids=["farthest", "by class", "from its class", "far and unsure"])
def test_the_orders_by_distance_from_the_reference(strategy, order):
    assert names(ORDERS[strategy](SHIFTED, 5, REFERENCE)) == order
    assert names(ORDERS[strategy](SHIFTED[::-1], 3, REFERENCE)) == order[:3]  # nested, whatever the rows' order


# -- the RESULTS.md section: the latest run and the earlier runs it keeps ----------------------------------------
def measured_run(when: str, *orders: str) -> dict:
    meta = {"command": f"bench/label_queue.py --at '{when}'", "measured": when, "machine": "vm (2 cores, CPU only)",
            "seconds": 900.0, "workers": 2, "threads": 1, "notes": ["- the notes"]}
    return {"meta": meta, "rows": [measured_row({o: [0.5, 0.6, 0.7, 0.8] for o in orders})]}


def test_a_new_run_keeps_the_earlier_runs_while_they_hold_orders_it_did_not_measure():
    oldest = measured_run("1", "least margin", "k-center")
    previous = {**measured_run("2", "least margin", "far by class"), "earlier": [oldest]}

    assert kept_runs(previous, ["random", "least margin", "farthest from reference"]) == [
        {k: v for k, v in previous.items() if k != "earlier"}, oldest]
    assert kept_runs(previous, ["random", "least margin", "far by class"]) == [oldest]  # the same orders: replaced
    assert kept_runs(previous, ["random", "least margin", "far by class", "k-center"]) == []
    assert kept_runs(None, ["random"]) == []


def test_the_section_says_which_run_measured_what_and_keeps_its_reading():
    earlier = measured_run("2026-12-01", "least margin", "k-center")
    earlier["meta"]["reading"] = ["Reading of this run (written by hand):", "- none beats random"]
    latest = {**measured_run("2026-12-02", "least margin", "far by class"), "earlier": [earlier]}

    section = report(latest).splitlines()

    runs = [line for line in section if line.startswith("### ")]
    assert runs == ["### Latest run, 2026-12-02: random, least margin, far by class",
                    "### Earlier run, 2026-12-01: random, least margin, k-center"]
    commands = [f"Command: `bench/label_queue.py --at '{when}'`  " for when in ("2026-12-02", "2026-12-01")]
    assert section.index(runs[0]) < section.index(commands[0]) < section.index(runs[1]) < section.index(commands[1])
    assert section[-2:] == ["Reading of this run (written by hand):", "- none beats random"]
    assert sum(line.startswith("| `rotate:90` | 0.200 |") for line in section) == 2  # each run's summary table
