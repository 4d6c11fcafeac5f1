"""The demo's only way to Serve: its HTTP API (README "Serving"); failures become messages people act on."""

from __future__ import annotations

import base64
import mimetypes
from typing import Any

import httpx


class ServeDown(Exception):
    """Serve did not answer usefully: not running, unreachable, too slow, or failing (5xx)."""


class Refused(Exception):
    """Serve refused the request (4xx); the message is its `detail`."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status


class ServeClient:
    """Calls to rayloop's HTTP API at one base URL, with the API key when one is configured."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of one request; ServeDown or Refused when there is none to give."""
        return self.send(method, path, **kwargs).json()

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The successful answer of one request; ServeDown or Refused when there is none to give."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ServeDown(f"Serve is not reachable at {self.url}. Is rayloop running? "
                            "Start it with `make up` (`make status` shows what runs).") from None
        except httpx.TimeoutException:
            raise ServeDown(f"Serve at {self.url} did not answer within {self.timeout:g} s "
                            "(busy or restarting); try again in a moment.") from None
        except httpx.HTTPError as exc:
            raise ServeDown(f"Serve at {self.url} could not be reached: {exc}") from None
        if response.status_code >= 500:
            raise ServeDown(f"Serve at {self.url} failed ({response.status_code}): {self.detail(response)}. "
                            "Try again in a moment.")
        if response.status_code >= 400:
            raise Refused(response.status_code, self.detail(response))
        return response

    @staticmethod
    def detail(response: httpx.Response) -> str:
        try:
            return str(response.json().get("detail") or response.reason_phrase)
        except (ValueError, AttributeError):
            return response.text[:200] or response.reason_phrase

    def predict(self, image: bytes, filename: str = "image.png") -> dict:
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return self.call("POST", "/v1/predict", files={"file": (filename, image, kind)})

    def explain(self, image: bytes, filename: str = "image.png", target: str | None = None) -> dict:
        """Grad-CAM of the served model for one image: label, target, saliency, overlay_png_b64 (not logged)."""
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        params = {"target": target} if target else {}
        return self.call("POST", "/v1/explain", params=params, files={"file": (filename, image, kind)})

    def feedback(self, prediction_id: str, label: str) -> dict:
        return self.call("POST", "/v1/feedback", json={"prediction_id": prediction_id, "label": label})

    def mask_feedback(self, prediction_id: str, mask_png: bytes) -> dict:
        """A corrected segmentation mask (PNG of the image's size: 0 background, 255 crack) as feedback."""
        return self.call("POST", "/v1/feedback", json={"prediction_id": prediction_id,
                                                       "mask_png_b64": base64.b64encode(mask_png).decode("ascii")})

    def retrain(self) -> dict:
        """Start a retrain job now (POST /v1/admin/retrain): {"job_id", "status"}; Refused 409 while one runs."""
        return self.call("POST", "/v1/admin/retrain")

    def predictions(self, limit: int = 50) -> dict:
        return self.call("GET", "/v1/predictions", params={"limit": limit})

    def prediction(self, prediction_id: str) -> dict:
        return self.call("GET", f"/v1/predictions/{prediction_id}")

    def label_queue(self, limit: int = 20) -> dict:
        """The predictions most worth a label, best first, and the classes they may be given."""
        return self.call("GET", "/v1/label-queue", params={"limit": limit})

    def image(self, prediction_id: str) -> bytes:
        """The image a prediction was made on."""
        return self.send("GET", f"/v1/predictions/{prediction_id}/image").content

    def model(self) -> dict:
        return self.call("GET", "/v1/model")

    def drift(self, report: bool = False) -> dict:
        """The latest drift check; with report=True a check made now, with Evidently's report saved."""
        if not report:
            return self.call("GET", "/v1/drift")
        # Building Evidently's report takes the monitor a few seconds (more on a busy box).
        return self.call("GET", "/v1/drift", params={"report": "true"}, timeout=max(self.timeout, 150.0))

    def audit(self, event: str, limit: int = 20) -> list[dict]:
        return self.call("GET", "/v1/audit", params={"event": event, "limit": limit})["items"]

    def close(self) -> None:
        self.http.close()
