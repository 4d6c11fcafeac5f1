"""The task interface (train/tasks): each task answers every question, and nothing outside it asks which task
it has. In process, no Ray."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from serve.http.context import Context
from train.evidence import Paired, Verdict
from train.factory import describe, rebuild
from train.score_evidence import Scored
from train.tasks import CLASSIFICATION, TASKS, FeedbackError, Task, task_named, task_of

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("cluster", "store", "train", "tune", "control", "serve", "monitoring", "simulation", "rayloop")
# Where naming a task is the point: the tasks themselves, and reading the task from a dataset's layout.
NAMES_TASKS = ("train/tasks/", "train/layout.py")
BRANCHES = [
    re.compile(r"""[=!]=\s*["'](classification|segmentation)["']"""),  # task == "segmentation"
    re.compile(r"""["'](classification|segmentation)["']\s*(==|!=|\bin\b)"""),
    re.compile(r"""isinstance\([^)]*\b(ImageClassifier|SegmentationModel|Evaluation|MaskEvaluation|Paired|"""
               r"""Scored|Classification|Segmentation)\b"""),
    re.compile(r"""\b(if|and|or|not|else)\s+[\w.]+\.segmentation\b"""),  # a "segmentation" flag on a meta
]
QUESTIONS = ["scan", "new_model", "fill_pretrained", "loss", "score", "augment", "evaluate", "evidence", "right",
             "answers", "truth"]
ATTRIBUTES = ["name", "target", "columns", "score_name", "score_metric", "eval_batch", "outputs",
              "learns_from_masks"]


def product_sources():
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if not relative.startswith(NAMES_TASKS):
                yield relative, path.read_text()


def test_nothing_outside_the_tasks_branches_on_which_task_it_has():
    """The issue's rule: one interface, two implementations, no other code asking "is this segmentation?".
    (ui/ is left out: the demo is an HTTP client that shows the view GET /v1/model's task calls for.)"""
    found = [f"{name}:{number}: {line.strip()}"
             for name, text in product_sources()
             for number, line in enumerate(text.splitlines(), 1)
             if not line.lstrip().startswith("#") and any(pattern.search(line) for pattern in BRANCHES)]
    assert not found, "branches on the task outside train/tasks:\n" + "\n".join(found)


def test_the_check_finds_a_branch_when_there_is_one():
    line = 'if meta.task == "segmentation":'
    assert any(pattern.search(line) for pattern in BRANCHES)
    assert any(pattern.search(line) for pattern in BRANCHES for line in ["isinstance(e, MaskEvaluation)",
                                                                          "if data.meta.segmentation:"])


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_every_task_answers_every_question(task):
    assert Task.__abstractmethods__ == set(QUESTIONS)  # what a task must answer (else it cannot be made)
    assert not type(task).__abstractmethods__
    for attribute in ATTRIBUTES:
        assert hasattr(task, attribute), f"{task.name} lacks {attribute}"
    assert task.target in task.dtypes and task_named(task.name) is task


def test_a_task_is_found_by_name_and_a_model_from_before_tasks_is_a_classifier():
    assert task_named(None) is CLASSIFICATION and task_of(SimpleNamespace()) is CLASSIFICATION
    with pytest.raises(ValueError, match="classification or segmentation"):
        task_named("detection")


@pytest.mark.parametrize("name,arch", [("classification", "cnn"), ("segmentation", "unet")])
def test_a_model_is_built_by_its_task_and_rebuilt_from_its_description(name, arch):
    task = task_named(name)
    model = task.new_model(arch, ["background", "crack"], 1, 32)
    assert task_of(model) is task
    again = rebuild(describe(model))
    assert task_of(again) is task and type(again) is type(model)


def test_scores_are_per_item_right_or_wrong_for_a_class_and_iou_for_a_mask():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert task_named("classification").score(logits, torch.tensor([0, 0, 0])).tolist() == [1.0, 0.0, 1.0]
    predicted = torch.zeros(2, 2, 4, 4)
    predicted[:, 1, :2, :] = 5.0  # the top half is crack, in both images
    truth = torch.zeros(2, 4, 4, dtype=torch.int64)
    truth[0, :2, :] = 1  # image 0: exactly the top half
    truth[1, :1, :] = 1  # image 1: the top quarter
    iou = task_named("segmentation").score(predicted, truth)
    assert iou.tolist() == pytest.approx([1.0, 0.5])
    assert task_named("segmentation").right(iou.numpy()).tolist() == [True, True]
    assert task_named("segmentation").right(np.array([0.49])).tolist() == [False]


def test_each_task_builds_its_own_evidence_and_the_evidence_decides_itself():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    paired = task_named("classification").evidence(rng.random(200) < 0.7, rng.random(200) < 0.9, labels)
    scored = task_named("segmentation").evidence(rng.random(200) * 0.5, rng.random(200) * 0.5 + 0.4, labels)
    assert isinstance(paired, Paired) and paired.labels is not None and isinstance(scored, Scored)
    from train.evidence import EvidenceRule

    for evidence in (paired, scored):
        verdict = evidence.decide(evidence, EvidenceRule(min_holdout=20), ["0", "1"])
        assert isinstance(verdict, Verdict) and verdict.outcome == "promote", verdict.reason


def test_the_replica_answer_and_the_http_fields_come_from_the_task():
    probabilities = torch.zeros(1, 2, 4, 4)
    probabilities[:, 0] = 1.0
    probabilities[0, :, 0, :] = torch.tensor([0.1, 0.9])[:, None]  # the top row is crack
    rows = [{"predicted_class": "crack", "confidence": 0.9}]
    [segmented] = task_named("segmentation").answers({"probabilities": probabilities}, rows,
                                                    ["background", "crack"], "3")
    assert segmented["mask"].shape == (4, 4) and segmented["mask"][0].tolist() == [1, 1, 1, 1]
    assert segmented["probabilities"] == {"background": 0.75, "crack": 0.25}
    upload = io.BytesIO()
    Image.new("L", (8, 12)).save(upload, format="PNG")
    fields = task_named("segmentation").response_fields(segmented, upload.getvalue())
    assert (fields["width"], fields["height"], fields["area_pixels"]) == (8, 12, 8 * 3)

    [classified] = CLASSIFICATION.answers({"probabilities": torch.tensor([[0.2, 0.8]])}, [{}], ["a", "b"], "3")
    assert classified["label"] == "b" and "mask" not in classified
    assert CLASSIFICATION.response_fields(classified, upload.getvalue()) == {}
    assert CLASSIFICATION.explain_refusal("3") is None and "segments" in task_named("segmentation").explain_refusal("3")


def test_feedback_of_the_wrong_kind_is_refused_by_the_task_with_the_reason():
    prediction = SimpleNamespace(id="p1", blob_key=None, probabilities={"background": 0.9, "crack": 0.1})
    with pytest.raises(FeedbackError, match="classifier: send label") as refused:
        CLASSIFICATION.truth(("png", b"\x89PNG"), prediction, None)
    assert refused.value.status == 422
    with pytest.raises(FeedbackError, match="send the corrected mask") as refused:
        task_named("segmentation").truth(("label", "crack"), prediction, None)
    assert refused.value.status == 422
    with pytest.raises(FeedbackError, match="no longer kept") as refused:
        task_named("segmentation").truth(("rle", {"size": [2, 2], "counts": [4]}), prediction, None)
    assert refused.value.status == 409
    assert CLASSIFICATION.truth(("label", "crack"), prediction, None) == ("crack", None)


def test_the_http_layer_asks_the_backend_for_its_task_once():
    asked = []

    class Backend:
        async def info(self) -> dict:
            asked.append(1)
            return {"task": "segmentation"}

    ctx = Context(Backend(), None, None, None, lambda: "actor")

    async def twice():
        return [await ctx.task(), await ctx.task()]

    assert asyncio.run(twice()) == [task_named("segmentation")] * 2 and len(asked) == 1
