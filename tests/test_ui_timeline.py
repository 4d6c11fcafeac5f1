"""The Monitoring tab's picture: drift share and estimated accuracy over time, the loop's events on the same
axis, and the rollout in words."""

from __future__ import annotations

from matplotlib.lines import Line2D

from ui.client import ServeDown
from ui.timeline import MARKS, figure, picture, rollout_text


def check(minute: int, share: float, drifted: bool, accuracy: float | None = None) -> dict:
    details = {"share": share, "drifted": drifted}
    if accuracy is not None:
        details["estimated_accuracy"] = {"accuracy": accuracy, "low": accuracy - 0.05, "high": accuracy + 0.05}
    return {"at": f"2026-12-02T10:{minute:02d}:00+00:00", "event": "drift_check", "details": details}


def event(minute: int, name: str) -> dict:
    return {"at": f"2026-12-02T10:{minute:02d}:30+00:00", "event": name, "details": {}}


def test_the_figure_plots_each_check_and_marks_every_loop_event_once_in_the_legend():
    checks = [check(m, 0.1, False, 0.97) for m in range(5)] + [check(m, 0.6, True, 0.4) for m in range(5, 8)]
    events = [event(6, "retrain_triggered"), event(8, "gate_decision"), event(9, "rollout_stage"),
              event(9, "rollout_stage"), event(10, "promoted")]
    fig = figure(checks, events)
    ax, twin = fig.axes
    [share] = [line for line in ax.get_lines() if line.get_label() == "drift share"]
    assert list(share.get_ydata()) == [0.1] * 5 + [0.6] * 3
    assert len([line for line in ax.get_lines() if line is not share]) == len(events)  # one mark per event
    [accuracy] = twin.get_lines()
    assert list(accuracy.get_ydata()) == [0.97] * 5 + [0.4] * 3
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend.count("shadow / canary") == 1
    assert {"drift share", "drifted", "retrain", "gate", "promoted", "estimated accuracy"} <= set(legend)
    assert len(ax.collections[0].get_offsets()) == 3  # the drifted checks, in red


def test_an_empty_history_says_so_instead_of_an_empty_plot():
    fig = figure([], [])
    assert "no drift check or loop event yet" in [t.get_text() for t in fig.axes[0].texts]
    assert not any(isinstance(line, Line2D) and len(line.get_xdata()) for line in fig.axes[0].get_lines())


def test_every_marked_event_is_one_the_timeline_table_shows_too():
    from ui.app import TIMELINE_EVENTS

    assert set(MARKS) <= set(TIMELINE_EVENTS)


ROLLOUT = {"id": "r", "champion": "3", "challenger": "4", "canary_share": 0.1, "shadow_share": 0.5,
           "live": True, "stale": False, "stage": "canary", "reason": None,
           "figures": {"all": {"scored": 80, "canaried": 9, "errors": 0, "agreement": 0.9, "labelled": 12,
                               "champion_right": 7, "challenger_right": 11}}}


def test_the_rollout_in_words_names_the_stage_share_and_the_evidence():
    assert "No staged rollout yet" in rollout_text({"rollout": None})
    live = rollout_text({"rollout": ROLLOUT})
    assert "v4 in canary" in live and "10% of requests" in live and "agreement 90%" in live
    assert "champion was right 7 times, the challenger 11" in live
    shadow = rollout_text({"rollout": {**ROLLOUT, "stage": "shadow", "canary_share": 0.0}})
    assert "scoring 50% of batches unseen" in shadow
    assert "stopped" in rollout_text({"rollout": {**ROLLOUT, "stale": True}})
    ended = rollout_text({"rollout": {**ROLLOUT, "live": False, "stage": "rolled_back", "reason": "p99 latency"}})
    assert "rolled back" in ended and "p99 latency" in ended


class Down:
    def call(self, *args, **kwargs):
        raise ServeDown("Serve is not reachable")

    audit = call


def test_serve_down_is_a_message_and_no_figure():
    text, fig = picture(Down())
    assert "not reachable" in text and fig is None
