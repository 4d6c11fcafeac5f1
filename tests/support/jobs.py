"""A stand-in for Ray's JobSubmissionClient (the one Ray boundary of control.retrain), for in-process tests."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    submission_id: str
    status: str = "PENDING"
    metadata: dict = field(default_factory=dict)
    message: str = ""
    entrypoint: str = ""


class FakeJobs:
    """Jobs by submission id; submit_job adds a PENDING one, as Ray does."""

    def __init__(self, *jobs: Job):
        self.jobs = {job.submission_id: job for job in jobs}

    def list_jobs(self) -> list[Job]:
        return list(self.jobs.values())

    def submit_job(self, *, entrypoint: str, runtime_env: dict, metadata: dict, submission_id: str) -> str:
        assert submission_id not in self.jobs, f"{submission_id} submitted twice"
        self.jobs[submission_id] = Job(submission_id, "PENDING", metadata, "", entrypoint)
        return submission_id

    def get_job_status(self, submission_id: str) -> str:
        return self.jobs[submission_id].status

    def get_job_logs(self, submission_id: str) -> str:
        return ""
