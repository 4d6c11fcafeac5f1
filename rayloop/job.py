"""The retrain Ray Job's entry point (`python -m rayloop.job`, submitted by control.retrain).

Composes the job in tune/ with what lies above it: the one-at-a-time lease and, on promotion, the
Serve rollout, both from control/.
"""

from __future__ import annotations

from cluster import environment

environment.apply()  # before ray loads

import sys  # noqa: E402

from cluster.settings import load_settings  # noqa: E402
from control import retrain as retrain_control  # noqa: E402
from control.rollout import roll_out  # noqa: E402
from tune import job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = job.parse(argv)
    job.stop_on_sigterm()
    holder = retrain_control.job_holder(args.ray_job) if args.ray_job else f"{args.actor} (rayloop.job)"
    result = job.run_job(load_settings(), args.trigger, args.actor, on_promote=None if args.no_rollout else roll_out,
                         ray_job=args.ray_job, hold=lambda store: retrain_control.holding(store, holder))
    print(job.report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
