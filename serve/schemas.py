"""Request and response bodies of the HTTP API (ours and the Open Inference Protocol v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: a readable reason (validation errors add the list of `errors`)."""

    detail: str


class ImageB64(BaseModel):
    image_b64: str = Field(description="base64 of a PNG/JPEG/... file (a data: URL is fine)")


class ImagesB64(BaseModel):
    images_b64: list[str] = Field(description="base64 images, one prediction each")


class Prediction(BaseModel):
    prediction_id: str
    label: str
    confidence: float
    probabilities: dict[str, float]  # segmentation: the share of the image's pixels given to each class
    model_version: str
    # Segmentation models only (absent for a classifier): the mask at the image's size, a PNG of class ids
    # (0/255 for one class), and the foreground's area.
    mask_png_b64: str | None = None
    area_pixels: int | None = None
    area_percent: float | None = None
    width: int | None = None
    height: int | None = None


class PredictionBatch(BaseModel):
    predictions: list[Prediction]


class FeedbackIn(BaseModel):
    """A prediction's truth: its class (classification), or its corrected mask (segmentation) as a PNG of the
    image's size (base64: 0/255, or class ids) or COCO run-length encoding ({"size": [h, w], "counts": ...})."""

    prediction_id: str
    label: str | None = None
    mask_png_b64: str | None = None
    mask_rle: dict | None = None


class FeedbackCreated(BaseModel):
    feedback_id: str


class FeedbackOut(BaseModel):
    feedback_id: str
    label: str
    created_at: datetime
    source: str


class PredictionRecord(Prediction):
    created_at: datetime
    features: dict[str, Any] = {}
    image_sha256: str | None = None
    feedback: list[FeedbackOut] = []


class PredictionPage(BaseModel):
    items: list[PredictionRecord]
    limit: int
    offset: int
    total: int = Field(description="predictions in the history: exact up to 10,000, beyond that the database's "
                                   "estimate (no page scans the table)")
    total_exact: bool = True
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next (older) page")


class ModelInfo(BaseModel):
    name: str
    version: str | None = Field(description="champion version in the registry")
    served_version: str | None = Field(description="version the serving replica answers with")
    metrics: dict[str, float] = {}
    trained_at: str | None = None
    data_version: str | None = None
    arch: str | None = None
    classes: list[str] = []
    run_id: str | None = None
    task: str = Field("classification", description="classification, or segmentation (predictions carry masks)")


class DriftStatus(BaseModel):
    status: str = Field(description="'checked', 'no check yet', 'check failed: <error>' (the monitor's latest "
                                    "check raised; checked_at says when), or why no check could run now "
                                    "(too few predictions, no champion, no drift monitor running)")
    checked_at: datetime | None = None
    drifted: bool | None = None
    share: float | None = Field(None, description="share of drifted features")
    features: dict[str, float] = Field({}, description="per-feature drift test p-value (lower = more drift)")
    drifted_features: list[str] = []
    embedding_score: float | None = Field(None, description="MMD^2 of the embedding components vs reference")
    model_version: str | None = None
    window_size: int | None = None
    report_url: str | None = None
    decided_by: str | None = Field(None, description="what decided `drifted`: 'calibrated' (thresholds with a known "
                                                     "false-alarm rate, `calibrated`) or 'evidently' (its rule)")
    evidently_drifted: bool | None = Field(None, description="Evidently's own verdict on the window")
    calibrated: dict | None = Field(None, description="the calibrated tests: per statistic its value, threshold, "
                                                      "p-value and whether it fired; the false-alarm rate per check")
    estimated_accuracy: dict | None = Field(
        None, description="the serving model's accuracy on the window estimated from its confidence, before any "
                          "label: {accuracy, low, high (a 90% interval), predictions}; blind to a shift that "
                          "leaves the model confidently wrong")
    estimate_error: str | None = Field(None, description="why there is no accuracy estimate")


class JobStarted(BaseModel):
    job_id: str
    status: str


class RolledBack(BaseModel):
    previous: str
    champion: str
    status: str


class AuditEventOut(BaseModel):
    id: str
    at: datetime
    actor: str
    event: str
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventOut]
    limit: int
    offset: int


# -- Open Inference Protocol v2 (serve/http/v2.py) -----------------------------------------------------
class V2ErrorOut(BaseModel):
    """A refused v2 request: `error` is what the v2 clients read; `detail` is rayloop's usual key."""

    error: str
    detail: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = []


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(None, description="row-major values (absent when sent as binary data)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: bytes of this tensor after "
                                                                "the JSON header (binary tensor data extension)")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true to get it as raw bytes")


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="binary_data_output: the default for every output")
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


# -- the labelling queue (serve/http/label_queue.py) ---------------------------------------------------
class LabelQueueItem(BaseModel):
    prediction_id: str = Field(description="label it with POST /v1/feedback")
    created_at: datetime
    label: str = Field(description="the model's answer")
    runner_up: str | None = Field(None, description="the class the model found next most likely")
    confidence: float
    margin: float = Field(description="top-1 minus top-2 probability: the lower, the closer the call")
    entropy: float = Field(description="of the probabilities, over its maximum: 0 certain, 1 every class as likely")
    model_version: str
    drifted: bool = Field(description="made during the latest drift episode (`drifted_since`..`drifted_until`)")
    image_url: str = Field(description="the image as uploaded (GET it with the same API key)")


class LabelQueue(BaseModel):
    items: list[LabelQueueItem] = Field(description="most worth a label first: the latest drift episode's "
                                                    "predictions, then the least margin, one predicted class "
                                                    "after another, each image once")
    classes: list[str] = Field(description="the labels these items may be given, in the model's order")
    limit: int
    window: int = Field(description="how many of the newest predictions were considered")
    candidates: int = Field(description="of those, how many have an image and no label")
    drifted_since: datetime | None = Field(None, description="the latest drift episode began after this drift "
                                                             "check (null: before every check read, or no drift)")
    drifted_until: datetime | None = Field(None, description="its last drifted check (null while it lasts)")
    drift_episode: bool = Field(description="whether a drift episode was found among the latest drift checks")


# -- staged rollouts (serve/http/rollout.py) --------------------------------------------------------
class RolloutOut(BaseModel):
    id: str
    stage: str = Field(description="shadow | canary (live); promoted | rolled_back | abandoned (ended)")
    live: bool
    stale: bool = Field(description="live, but its driver stopped: the champion serves alone")
    champion: str
    challenger: str
    canary_share: float = Field(description="of requests the challenger answers now")
    shadow_share: float = Field(description="of batches the challenger also scores in the background")
    steps: list[float] | None = Field(None, description="the canary shares in order (0 = shadow)")
    started_at: datetime
    stage_started_at: datetime
    ended_at: datetime | None = None
    reason: str | None = Field(None, description="why it ended (a breach, an operator's command, the last step)")
    command: str | None = Field(None, description="an operator's promote | abort, carried out within a poll")
    command_by: str | None = None
    figures: dict = Field(default_factory=dict, description="`all` (the rollout so far) and `stage`: requests "
                          "scored, answered by the challenger, its runs and errors, agreement, p99 ms of each "
                          "model, and right answers of each on requests with feedback")


class RolloutStatus(BaseModel):
    rollout: RolloutOut | None = Field(description="the newest staged rollout; null before the first")


# -- explanations (serve/http/explain.py) ------------------------------------------------------------
class Explanation(BaseModel):
    label: str = Field(description="the predicted class")
    confidence: float
    model_version: str
    target: str = Field(description="the class explained: `target` when given, else the predicted class")
    method: str = Field(description="grad-cam")
    layer: str = Field(description="the convolution whose feature maps are weighted")
    saliency: list[list[float]] = Field(description="HxW in [0, 1] at the model's input size: how much each "
                                                    "pixel's region raised the target's score")
    overlay_png_b64: str = Field(description="base64 PNG: the image as the model saw it, the saliency over it")
