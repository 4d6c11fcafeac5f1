"""The tasks rayloop trains and serves, behind one interface (train/tasks/base.py).

    task_named("segmentation")   the task of that name (a ValueError naming the known ones otherwise)
    task_of(model)               the task a model was built for (a model pickled before tasks is a classifier)
"""

from __future__ import annotations

from train.tasks.base import FeedbackError, Sent, Task
from train.tasks.classification import Classification
from train.tasks.segmentation import Segmentation

TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Segmentation())}
CLASSIFICATION = TASKS["classification"]

__all__ = ["CLASSIFICATION", "TASKS", "FeedbackError", "Sent", "Task", "task_named", "task_of"]


def task_named(name: str | None) -> Task:
    """The task called `name`; None (a record from before tasks) is classification."""
    if name is None:
        return CLASSIFICATION
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task {name!r}: expected {' or '.join(TASKS)}") from None


def task_of(model) -> Task:
    return task_named(getattr(model, "task", None))
