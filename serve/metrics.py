"""Serving metrics, exported by Ray's metrics agent to Prometheus (names get a `ray_` prefix there)."""

from __future__ import annotations

from dataclasses import dataclass

import ray

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


@dataclass
class HttpMetrics:
    """What the ingress records: requests by route and status, their latency, feedback received."""

    requests: object
    latency: object
    feedback: object

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        tags = {"route": route, "method": method}
        self.requests.inc(1, tags={**tags, "status": str(status)})
        self.latency.observe(seconds, tags=tags)


@dataclass
class ModelMetrics:
    """What a classifier replica records: batch sizes, predictions by class, confidence, model version."""

    batch_size: object
    predictions: object
    confidence: object
    model_version: object

    def observe_batch(self, size: int, results: list[dict]) -> None:
        self.batch_size.observe(size)
        for result in results:
            self.predictions.inc(1, tags={"label": result["label"], "model_version": result["model_version"]})
            self.confidence.observe(result["confidence"])


def http_metrics() -> HttpMetrics | None:
    """Ingress metrics, or None outside Ray (unit tests of the HTTP layer)."""
    if not ray.is_initialized():
        return None
    from ray.serve.metrics import Counter, Histogram

    return HttpMetrics(
        requests=Counter("rayloop_requests_total", description="HTTP requests by route, method and status",
                         tag_keys=("route", "method", "status")),
        latency=Histogram("rayloop_request_seconds", description="HTTP request latency (seconds)",
                          boundaries=LATENCY_BUCKETS, tag_keys=("route", "method")),
        feedback=Counter("rayloop_feedback_total", description="Feedback labels received"),
    )


def model_metrics() -> ModelMetrics | None:
    """Classifier metrics, or None outside Ray."""
    if not ray.is_initialized():
        return None
    from ray.serve.metrics import Counter, Gauge, Histogram

    return ModelMetrics(
        batch_size=Histogram("rayloop_batch_size", description="Images per model forward pass",
                             boundaries=BATCH_BUCKETS),
        predictions=Counter("rayloop_predictions_total", description="Predictions by class and model version",
                            tag_keys=("label", "model_version")),
        confidence=Histogram("rayloop_prediction_confidence", description="Top-class probability",
                             boundaries=CONFIDENCE_BUCKETS),
        model_version=Gauge("rayloop_model_version", description="Registry version this replica serves"),
    )
