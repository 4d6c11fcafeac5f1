"""The staged rollout's driver: a challenger that passed its gate goes shadow -> canary steps -> champion.

At every poll the driver judges the challenger on live traffic (store/rollouts.py holds both models' answers,
serve/canary.py writes them): its error rate and p99 latency against the SLOs, and, on requests that got
feedback, the gate's paired test one-sided for "worse than the champion". A breach rolls it back at once: the
canary share drops to 0 and the champion, which never stopped being champion, answers everything. After the
last step's dwell the challenger is promoted (registry alias, rolling update). An operator's promote or
abort (a command in the rollouts table) is carried out at the next poll.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cluster.settings import RolloutSettings, Settings
from store import Event
from store.rollouts import Rollout, Rollouts, ScoreFigures
from train.evidence import mcnemar_exact

Audit = Callable[[str, dict], None]


@dataclass(frozen=True)
class Judgement:
    action: str   # hold | advance | roll_back
    reason: str


def worse_on_feedback(figures: ScoreFigures) -> float:
    """p-value of the exact McNemar test that the challenger is worse on the live requests with feedback."""
    b, c = figures.challenger_only_right, figures.champion_only_right
    champion = np.array([False] * b + [True] * c, dtype=bool)
    return mcnemar_exact(champion, ~champion, alternative="less").p_value


def judge(figures: ScoreFigures, stage: ScoreFigures, rule: RolloutSettings, dwelt_s: float,
          stage_s: float) -> Judgement:
    """Roll back on a breach (whole rollout so far), advance once the stage has dwelt its time, else hold.

    The SLOs are judged once min_scored requests back them; the feedback test whenever the models disagree
    on enough labelled items to reach `alpha` (an exact test: too few disagreements never reach it).
    """
    if figures.challenger_runs >= rule.min_scored and figures.error_rate > rule.max_error_rate:
        return Judgement("roll_back", f"error rate {figures.error_rate:.3f} > {rule.max_error_rate} "
                                      f"({figures.errors} of {figures.challenger_runs} runs failed)")
    champion_ms, challenger_ms = figures.champion_p99_ms, figures.challenger_p99_ms
    if (figures.latency_runs >= rule.min_scored and champion_ms and challenger_ms
            and challenger_ms > rule.max_latency_ratio * champion_ms + rule.latency_slack_ms):
        return Judgement("roll_back", f"p99 latency {challenger_ms:.1f} ms > {rule.max_latency_ratio} x the "
                                      f"champion's {champion_ms:.1f} ms + {rule.latency_slack_ms:g} ms "
                                      f"({figures.latency_runs} forward passes)")
    p = worse_on_feedback(figures)
    if p < rule.alpha:
        return Judgement("roll_back", f"worse than the champion on live feedback: right on "
                                      f"{figures.challenger_right} vs {figures.champion_right} of "
                                      f"{figures.labelled} labelled requests (paired test p={p:.4f} < {rule.alpha})")
    if dwelt_s >= stage_s:
        thin = "" if stage.scored >= rule.min_scored else f"; thin evidence: {stage.scored} requests scored"
        return Judgement("advance", f"held its SLOs for {dwelt_s:.0f} s ({stage.scored} requests scored, "
                                    f"{figures.labelled} with feedback){thin}")
    return Judgement("hold", "")


def summary(rollout: Rollout, figures: ScoreFigures, stage: ScoreFigures) -> dict:
    return {"steps": rollout.figures.get("steps"), "all": figures.as_dict(), "stage": stage.as_dict()}


def run_stages(settings: Settings, rollouts: Rollouts, champion: str, challenger: str, audit: Audit,
               promote: Callable[[], None], sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic) -> bool:
    """Take `challenger` through shadow and the canary steps; promote() at the end. True when promoted."""
    rule = settings.rollout
    plan = [("shadow", 0.0, rule.shadow_s)] + [("canary", share, rule.dwell_s) for share in rule.steps()]
    rollout = rollouts.start(champion, challenger, rule.shadow_share, {"steps": [share for _, share, _ in plan]})
    tag = {"rollout": rollout.id, "version": challenger, "champion": champion}
    try:
        return drive(settings, rollouts, rollout, plan, tag, audit, promote, sleep, clock)
    except BaseException as exc:  # the job failed or was stopped: the replicas go back to the champion alone now
        if rollouts.end(rollout.id, "abandoned", f"its driver stopped: {type(exc).__name__}: {exc}"[:1000]):
            audit(Event.ROLLOUT_ROLLED_BACK, {**tag, "reason": f"its driver stopped: {type(exc).__name__}"})
        raise


def drive(settings: Settings, rollouts: Rollouts, rollout: Rollout, plan: list, tag: dict, audit: Audit,
          promote: Callable[[], None], sleep: Callable[[float], None], clock: Callable[[], float]) -> bool:
    """run_stages' loop: judge at every poll, move the stages, end the rollout."""
    rule = settings.rollout
    audit(Event.ROLLOUT_STAGE, {**tag, "stage": "shadow", "canary_share": 0.0, "shadow_share": rule.shadow_share})
    index, entered = 0, clock()
    while True:
        sleep(rule.poll_s)
        current = rollouts.get(rollout.id)
        if current is None or not current.live:  # ended by someone else (an operator, when this driver stalled)
            return False
        figures, stage = rollouts.figures(rollout.id), rollouts.figures(rollout.id, since=current.stage_started_at)
        figures_now = summary(current, figures, stage)
        if current.command == "abort":
            return rolled_back(rollouts, current, f"aborted by {current.command_by}", figures_now, audit, tag)
        verdict = judge(figures, stage, rule, clock() - entered, plan[index][2])
        if current.command == "promote":
            verdict = Judgement("advance", f"promoted by {current.command_by}")
            index = len(plan) - 1
        if verdict.action == "roll_back":
            return rolled_back(rollouts, current, verdict.reason, figures_now, audit, tag)
        if verdict.action == "hold":
            rollouts.update(rollout.id, figures={**current.figures, **figures_now})  # the heartbeat
            continue
        index += 1
        if index == len(plan):
            # Everything to the challenger (already loaded everywhere) while the rolling update moves the champion.
            rollouts.update(rollout.id, stage="canary", canary_share=1.0, figures={**current.figures, **figures_now})
            promote()
            rollouts.end(rollout.id, "promoted", verdict.reason, {**current.figures, **figures_now})
            return True
        name, share, _ = plan[index]
        rollouts.update(rollout.id, stage=name, canary_share=share, figures={**current.figures, **figures_now})
        audit(Event.ROLLOUT_STAGE, {**tag, "stage": name, "canary_share": share, "because": verdict.reason,
                                    "figures": figures_now})
        entered = clock()


def rolled_back(rollouts: Rollouts, rollout: Rollout, reason: str, figures: dict, audit: Audit, tag: dict) -> bool:
    if rollouts.end(rollout.id, "rolled_back", reason, {**rollout.figures, **figures}):
        audit(Event.ROLLOUT_ROLLED_BACK, {**tag, "stage": rollout.stage, "canary_share": rollout.canary_share,
                                          "reason": reason, "figures": figures})
    return False
