"""The scenario benchmark's decisions (simulation/bench_loop.py), on plain values: no Ray, no HTTP."""

import numpy as np
import pytest

from simulation.bench_loop import (
    BACKGROUND_SIZE,
    COLUMNS,
    EVAL_SIZE,
    Mark,
    cells,
    default_scenarios,
    goal_lines,
    labels_in,
    loop_end,
    merged,
    misses,
    parse_scenarios,
    retrain_of,
    rollout_stages,
    round_indices,
    samples_to_drift,
    split_unseen,
    table,
    trap_finished,
)

ALL_TWELVE = ["rotate:30", "rotate:90", "noise:0.15", "noise:0.3", "invert:0.5", "invert:1", "blur:1", "blur:2",
              "contrast:0.4", "contrast:0.7", "trap:random-labels", "trap:clean-labels"]


def shift_row(**changes) -> dict:
    """A shift scenario that meets every goal, changed where a test says."""
    row = {"scenario": "rotate:90", "trap": False, "samples_to_drift": 150, "promoted": True, "outcome": "promoted",
           "champion_before": "1", "champion_after": "2", "accuracy_before": 0.2, "accuracy_after": 0.9,
           "clean_accuracy_after": 0.97, "labels_used": 480, "recovery_s": 170.0, "background_sent": 5000,
           "background_failed": 0, "user_failed": 0}
    return {**row, **changes}


def trap_row(**changes) -> dict:
    row = {"scenario": "trap:clean-labels", "trap": True, "false_alarms": 0, "drift_checks": 60, "promoted": False,
           "outcome": "not enough evidence", "clean_accuracy_after": 0.98, "labels_used": 410,
           "background_sent": 9000, "background_failed": 0, "user_failed": 0, "user_sent": 5000,
           "samples_target": 5000}
    return {**row, **changes}


# -- scenarios ------------------------------------------------------------------------------------------------

def test_the_default_is_every_shift_at_both_severities_then_both_traps():
    assert [s.name for s in default_scenarios()] == ALL_TWELVE


def test_a_scenario_list_is_read_in_order_once_each():
    chosen = parse_scenarios(" rotate:90, noise:0.15,trap:random-labels,invert:1.0,invert:1,")
    assert [s.name for s in chosen] == ["rotate:90", "noise:0.15", "trap:random-labels", "invert:1"]
    assert (chosen[0].shift, chosen[0].severity, chosen[0].trap) == ("rotate", 90.0, "")
    assert (chosen[2].shift, chosen[2].severity, chosen[2].trap) == ("none", None, "random-labels")


@pytest.mark.parametrize("text, says", [
    ("rotate", "<shift>:<severity>"), ("spin:3", "rotate, noise"), ("rotate:ninety", "not a number"),
    ("noise:-0.1", ">= 0"), ("blur:inf", "finite"), ("trap:wrong-labels", "trap:random-labels"), (" , ", "no scenario"),
])
def test_a_wrong_scenario_says_what_is_expected(text, says):
    with pytest.raises(ValueError, match=says):
        parse_scenarios(text)


# -- the digits -----------------------------------------------------------------------------------------------

def digits(n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """n distinct images (pixel 0 and 1 hold the index), labels sorted by class like the embedded set."""
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    return images, np.repeat(np.arange(10), n // 10)


def test_traffic_is_only_unseen_digits_in_four_disjoint_seeded_sets():
    images, labels = digits()
    seen = {images[i].tobytes() for i in range(0, 1500, 3)}  # a third trained on
    sets = split_unseen(images, labels, seen)
    parts = [sets.user, sets.shifted_eval, sets.clean_eval, sets.background]
    keys = [{im.tobytes() for im in part[0]} for part in parts]

    assert [len(part[0]) for part in parts] == [1000 - 2 * EVAL_SIZE - BACKGROUND_SIZE, EVAL_SIZE, EVAL_SIZE,
                                                BACKGROUND_SIZE]
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == 1000  # disjoint, every unseen digit used
    assert not set().union(*keys) & seen
    index = {im.tobytes(): i for i, im in enumerate(images)}
    assert all(labels[index[im.tobytes()]] == y for im, y in zip(*sets.shifted_eval))  # labels stay with images
    assert len(set(sets.shifted_eval[1])) == 10  # shuffled: the set is sorted by class
    again = split_unseen(images, labels, seen)
    assert np.array_equal(again.user[0], sets.user[0])


def test_too_few_unseen_digits_is_an_error_naming_the_data_limit():
    images, labels = digits()
    with pytest.raises(ValueError, match="RAYLOOP_DATA_LIMIT"):
        split_unseen(images, labels, {images[i].tobytes() for i in range(700)})


def test_a_pool_is_sent_whole_before_any_digit_comes_again():
    rounds = [round_indices(60, sent, 25) for sent in (0, 25, 50)]
    first_pass = np.concatenate(rounds)[:60]
    assert sorted(first_pass) == list(range(60))
    assert np.array_equal(rounds[2][10:], round_indices(60, 0, 15))  # the 61st sent is the 1st again


# -- what the audit trail says --------------------------------------------------------------------------------

def test_samples_until_drift_is_the_count_at_the_end_of_the_round_that_saw_it():
    rounds = [(10.0, 25), (14.0, 50), (18.0, 75)]
    assert samples_to_drift(rounds, 12.5) == 50
    assert samples_to_drift(rounds, 14.0) == 50
    assert samples_to_drift(rounds, 3.0) == 25
    assert samples_to_drift(rounds, 30.0) is None
    assert samples_to_drift(rounds, None) is None


def gate(at: float, outcome: str, job: str = "") -> Mark:
    return Mark(at, {"outcome": outcome, "passed": outcome == "promote", "reason": outcome,
                     **({"ray_job": job} if job else {})})


def test_only_a_promotion_a_rejection_or_a_failure_ends_the_loop():
    waiting = [gate(10, "not_enough_evidence")]
    assert loop_end(waiting, [], []) is None
    assert loop_end([*waiting, gate(50, "promote")], [], []) is None  # the alias has not moved yet
    ended = loop_end([*waiting, gate(50, "promote")], [Mark(51, {"version": "2"})], [])
    assert (ended.outcome, ended.mark.details["version"]) == ("promoted", "2")
    assert loop_end([*waiting, gate(50, "reject")], [], []).outcome == "rejected"
    assert loop_end(waiting, [], [Mark(30, {"error": "boom"})]).outcome == "failed"
    assert loop_end([gate(20, "reject")], [], [Mark(30, {})]).outcome == "rejected"  # the first decides
    # a gate passed, then the staged rollout rolled the challenger back on live traffic
    assert loop_end([*waiting, gate(50, "promote")], [], [], [Mark(90, {"reason": "p99"})]).outcome == "rolled_back"


def test_a_staged_rollout_is_told_stage_by_stage_until_it_ended():
    stages = [Mark(100, {"stage": "shadow"}), Mark(121, {"stage": "canary", "canary_share": 0.1}),
              Mark(141, {"stage": "canary", "canary_share": 0.5})]
    assert rollout_stages(stages, Mark(175, {})) == "shadow 21 s, 10% 20 s, 50% 34 s"


def test_labels_used_are_those_of_the_retrain_the_gate_decided():
    started = [Mark(5, {"ray_job": "a", "feedback": {"train": 100, "val": 30, "holdout": 40}}),
               Mark(100, {"ray_job": "b", "feedback": {"train": 300, "val": 90, "holdout": 120}})]
    assert labels_in(retrain_of(gate(60, "reject", job="a"), started)) == 170
    assert labels_in(retrain_of(gate(160, "promote", job="b"), started)) == 510
    assert labels_in(retrain_of(gate(120, "reject", job="a"), started)) == 170  # its own job, not the latest
    untagged = [Mark(m.at, {"feedback": m.details["feedback"]}) for m in started]
    assert labels_in(retrain_of(gate(60, "reject"), untagged)) == 170  # else the latest started before it
    assert labels_in(None) is None


def test_a_trap_waits_for_its_first_retrain_or_for_a_check_after_its_last_digit():
    trigger, check = [Mark(10, {"trigger": "feedback"})], [Mark(100, {"drifted": False})]
    assert not trap_finished(trigger, [], check, now=200)
    assert trap_finished(trigger, [Mark(300, {})], [], now=301)
    assert not trap_finished([], [], check, now=102)  # a trigger is audited just after its check
    assert trap_finished([], [], check, now=106)
    assert not trap_finished([], [], [], now=500)


# -- goals and the table --------------------------------------------------------------------------------------

def test_rows_that_meet_every_goal_miss_nothing():
    assert misses(shift_row()) == []
    assert misses(trap_row()) == []


def test_each_missed_goal_of_a_shift_is_named_by_its_column():
    found = misses(shift_row(samples_to_drift=225, accuracy_after=0.45, labels_used=700, recovery_s=412.0,
                             clean_accuracy_after=0.85, background_failed=3, user_failed=1, eval_failed=2))
    assert [m.split(":")[0] for m in found] == ["shifted samples until drift", "accuracy on the shift",
                                                "labels used", "time to recovery", "clean accuracy after",
                                                "failed background requests",
                                                "failed user and evaluation requests (not a column)"]
    assert "+0.250" in found[1] and "412 s" in found[3] and found[-1].endswith(": 3 (goal 0)")
    assert misses(trap_row(clean_accuracy_after=None)) == ["clean accuracy after: not measured (goal >= 0.9)"]
    mild = misses(shift_row(accuracy_before=0.775, accuracy_after=0.93))  # +0.3 cannot be had from 0.775
    assert mild == ["accuracy on the shift: +0.155 (goal +0.3 or more, out of reach from 0.775: at most +0.225)"]


def test_a_shift_without_promotion_misses_the_gain_and_the_recovery():
    found = misses(shift_row(samples_to_drift=None, promoted=False, outcome="rejected", champion_after=None,
                             recovery_s=None))
    assert found == ["shifted samples until drift: never reported (goal <= 200)",
                     "accuracy on the shift: no new champion (rejected; goal +0.3 with <= 600 labels)",
                     "time to recovery: never (goal <= 180 s)"]


def test_a_trap_misses_on_a_false_alarm_or_a_promotion():
    found = misses(trap_row(false_alarms=2, promoted=True, champion_after="2", outcome="promoted"))
    assert found == ["false alarms: 2 (goal 0)", "promoted: v2 (goal: no promotion in a trap)"]
    assert misses(trap_row(user_sent=3200, samples_target=5000)) == [
        "false alarms: over 3,200 clean samples only, the timeout came first (goal: 5,000)"]


def test_a_scenario_that_did_not_finish_says_only_that():
    assert misses(shift_row(error="RuntimeError: `rayloop up` exited 1")) == [
        "did not finish: RuntimeError: `rayloop up` exited 1"]


def test_the_table_has_one_row_per_scenario_in_a_fixed_order_and_the_issues_columns():
    rows = {}
    for row in (trap_row(), shift_row(), shift_row(scenario="rotate:30", samples_to_drift=None, promoted=False,
                                                   outcome="timeout"), shift_row(scenario="noise:0.3")):
        rows = merged(rows, row)
    rows = merged(rows, shift_row(recovery_s=99.0))  # a newer rotate:90 replaces the older
    lines = table(rows)

    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["`rotate:30`", "`rotate:90`", "`noise:0.3`",
                                                                  "`trap:clean-labels`"]
    assert all(line.count("|") == len(COLUMNS) + 1 for line in lines)
    assert cells(rows["rotate:90"]) == ["`rotate:90`", "150", "-", "yes (v2)", "0.200 -> 0.900", "0.970", "480",
                                        "99", "0 of 5,000"]
    assert cells(rows["rotate:30"])[1:4] == ["not reported", "-", "no (timeout)"]
    assert cells(rows["trap:clean-labels"])[1:5] == ["-", "0 of 60", "no (not enough evidence)", "-"]
    assert cells(trap_row(decisions=281))[2] == "0 of 60 (~281 decisions)"
    estimated = shift_row(estimated_before=0.912, estimated_after=None)  # the confidence-based estimate beside
    assert cells(estimated)[4] == "0.200 -> 0.900 (estimated 0.91 -> -)"


def test_the_goal_lines_list_each_scenario_with_its_misses():
    rows = merged(merged({}, shift_row()), trap_row(false_alarms=1))
    lines = goal_lines(rows)
    assert lines[0].startswith("**Goals**: every real shift reported within 200 shifted samples")
    assert "- `rotate:90`: none, every goal met" in lines
    assert "- `trap:clean-labels`: false alarms: 1 (goal 0)" in lines
