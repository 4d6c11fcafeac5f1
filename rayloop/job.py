"""The retrain Ray Job's entry point (`python -m rayloop.job`, submitted by control.retrain).

Composes the job in tune/ with what lies above it: the one-at-a-time lease and, on promotion, the
Serve rollout, both from control/.
"""

from __future__ import annotations

from cluster import environment

environment.apply()  # before ray loads

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from cluster.settings import load_settings  # noqa: E402
from control import retrain as retrain_control  # noqa: E402
from control.rollout import roll_out, serve_running  # noqa: E402
from tune import job  # noqa: E402

# Where Ray's job supervisor hands a job's driver its config: {"metadata": {"job_submission_id": ...}, ...}.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def own_submission_id() -> str | None:
    """The submission id of the Ray Job this driver runs as, or None outside one.

    control.retrain passes it as --ray-job; a job submitted by something else (KubeRay's RayJob, `ray job
    submit`) gets it here, so its audit events and its lease name the job all the same.
    """
    try:
        return json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = job.parse(argv)
    job.stop_on_sigterm()
    ray_job = args.ray_job or own_submission_id()
    holder = retrain_control.job_holder(ray_job) if ray_job else f"{args.actor} (rayloop.job)"
    result = job.run_job(load_settings(), args.trigger, args.actor, on_promote=None if args.no_rollout else roll_out,
                         ray_job=ray_job, hold=lambda store: retrain_control.holding(store, holder),
                         serving=None if args.no_rollout else serve_running)
    print(job.report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
