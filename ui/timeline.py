"""The Monitoring tab's picture: drift share and estimated accuracy over time, the loop's events marked on the
same time axis, and the rollout under way in words. Everything from the HTTP API (audit trail, /v1/rollout)."""

from __future__ import annotations

from datetime import datetime

from matplotlib.figure import Figure

from ui.client import Refused, ServeClient, ServeDown

CHECKS = 200  # drift checks plotted: the newest
EVENTS = 50   # of each marked kind
# Wire names of store.Event (the demo imports no store code) -> how the mark is drawn and named.
MARKS = {
    "retrain_triggered": ("tab:gray", ":", "retrain"),
    "gate_decision": ("tab:purple", "--", "gate"),
    "rollout_stage": ("tab:orange", "-.", "shadow / canary"),
    "promoted": ("tab:green", "-", "promoted"),
    "rollout_rolled_back": ("tab:red", "-", "canary rolled back"),
    "rollback": ("tab:red", "--", "rollback"),
}


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def figure(checks: list[dict], events: list[dict]) -> Figure:
    """Drift share (left axis) and estimated accuracy with its interval (right) per drift check, and one
    vertical line per loop event."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.add_subplot()
    checks = sorted(checks, key=lambda c: c["at"])
    times = [when(c["at"]) for c in checks]
    ax.plot(times, [c["details"].get("share") or 0.0 for c in checks], color="tab:blue", marker=".",
            label="drift share")
    drifted = [(t, c["details"].get("share") or 0.0) for t, c in zip(times, checks) if c["details"].get("drifted")]
    if drifted:
        ax.scatter(*zip(*drifted), color="tab:red", zorder=3, label="drifted")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("drift share")
    estimated = [(t, c["details"]["estimated_accuracy"]) for t, c in zip(times, checks)
                 if isinstance(c["details"].get("estimated_accuracy"), dict)]
    twin = ax.twinx()
    if estimated:
        at, values = zip(*estimated)
        twin.plot(at, [v["accuracy"] for v in values], color="tab:green", label="estimated accuracy")
        twin.fill_between(at, [v["low"] for v in values], [v["high"] for v in values], color="tab:green", alpha=0.15)
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("estimated accuracy")
    named = set()
    for event in sorted(events, key=lambda e: e["at"]):
        color, style, name = MARKS[event["event"]]
        ax.axvline(when(event["at"]), color=color, linestyle=style, linewidth=1.2,
                   label=None if name in named else name)
        named.add(name)
    if not checks and not events:
        ax.text(0.5, 0.5, "no drift check or loop event yet", ha="center", va="center", transform=ax.transAxes)
    handles = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    if handles[0] or more[0]:
        ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize="small", ncol=3)
    fig.autofmt_xdate()
    return fig


def rollout_text(status: dict) -> str:
    """The newest staged rollout in words (GET /v1/rollout)."""
    r = status.get("rollout")
    if r is None:
        return "No staged rollout yet: a challenger that passes its gate goes shadow -> canary -> champion here."
    figures = (r.get("figures") or {}).get("all") or {}
    scored = (f"{figures.get('scored', 0)} requests scored by both, {figures.get('canaried', 0)} answered by the "
              f"challenger, {figures.get('errors', 0)} challenger errors")
    if figures.get("agreement") is not None:
        scored += f", agreement {figures['agreement']:.0%}"
    if figures.get("labelled"):
        scored += (f"; on {figures['labelled']} with feedback the champion was right {figures['champion_right']} "
                   f"times, the challenger {figures['challenger_right']}")
    if r["live"] and r["stale"]:
        head = f"Rollout of v{r['challenger']} **stopped** (its driver is gone): the champion serves alone."
    elif r["live"]:
        share = f", answering {r['canary_share']:.0%} of requests" if r["stage"] == "canary" else \
            f", scoring {r['shadow_share']:.0%} of batches unseen"
        head = f"**v{r['challenger']} in {r['stage']}**{share} beside champion v{r['champion']}."
    else:
        head = f"Last rollout: v{r['challenger']} **{r['stage'].replace('_', ' ')}**: {r.get('reason') or ''}"
    return f"{head}\n\n{scored}."


def picture(api: ServeClient) -> tuple[str, Figure | None]:
    """(the rollout in words, the timeline figure); a problem in words and no figure when Serve cannot say."""
    try:
        rollout = rollout_text(api.call("GET", "/v1/rollout"))
        checks = api.audit("drift_check", CHECKS)
        events = [e for name in MARKS for e in api.audit(name, EVENTS)]
    except (ServeDown, Refused) as exc:
        return f"⚠ {exc}", None
    return rollout, figure(checks, events)


def retrain_now(api: ServeClient) -> str:
    """The Monitoring tab's Retrain now: a retrain job from the feedback so far, or why not, in words."""
    try:
        job = api.retrain()
    except ServeDown as exc:
        return f"⚠ {exc}"
    except Refused as exc:
        return f"⚠ Serve refused the retrain ({exc.status}): {exc}"
    return (f"Retrain job `{job.get('job_id', '?')}` started: Tune, then the gate; the timeline below shows "
            "how it went (Refresh monitoring).")
