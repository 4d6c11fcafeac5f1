"""bench/serve.py --segmentation: its uploads, and the check that refuses to time a target answering without the
mask at the upload's size (so a benchmark cannot compare a baseline that skips the mask with rayloop). No Ray."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from bench.serve_workloads import Workload, check_answer, notes
from bench.uploads import crack_uploads
from train.tasks.segmentation import mask_fields

CLASSIFIED = {"label": "crack", "confidence": 0.9, "probabilities": {"background": 0.1, "crack": 0.9},
              "model_version": "1"}


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.fixture
def target():
    """A stand-in target on a free port answering /v1/predict with `answer["body"]`; yields (url, answer, seen)."""
    answer, seen = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps(answer["body"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            """Quiet: the stdlib server would print every request to stderr."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/predict", answer, seen
    finally:
        server.shutdown()
        server.server_close()


def workload(probe: bytes) -> Workload:
    return Workload("bench/serve.py:segmentation", "## t", "t", "g", script=None, probe=probe, kind="png",
                    mlflow_uri="sqlite:///x", segmentation=True)


def test_uploads_are_different_crack_photos_at_the_crack_sets_size():
    uploads = crack_uploads(count=3)
    assert len(set(uploads)) == 3
    assert [png_size(data) for data in uploads] == [(96, 96)] * 3


def test_an_answer_with_the_mask_at_the_uploads_size_passes_and_is_kept_for_comparison(target):
    url, answer, seen = target
    [probe] = crack_uploads(count=1)
    mask = np.zeros((96, 96), dtype=np.uint8)
    mask[40:50, :] = 1
    answer["body"] = {**CLASSIFIED, **mask_fields(mask, probe)}
    job = workload(probe)
    check_answer("baseline", url, job)
    [(content_type, body)] = seen
    assert content_type.startswith("multipart/form-data") and probe in body
    assert job.masks["baseline"].shape == (96, 96) and job.masks["baseline"].any()
    mask[0, 0] = 1  # one pixel differs in rayloop's mask: the record says so
    answer["body"] = {**CLASSIFIED, **mask_fields(mask, probe)}
    check_answer("rayloop", url, job)
    job.cost = {"decode_ms": 0.1, "forward_ms": 2.0, "mask_ms": 0.3}
    assert notes(job)[-1].endswith("pixels differing from the baseline's mask: baseline 0, rayloop 1.")


def test_an_answer_without_the_mask_is_refused(target):
    url, answer, _ = target
    [probe] = crack_uploads(count=1)
    answer["body"] = CLASSIFIED  # a baseline doing only the forward pass
    with pytest.raises(RuntimeError, match="mask_png_b64"):
        check_answer("baseline", url, workload(probe))


def test_a_mask_at_the_models_size_instead_of_the_uploads_is_refused(target):
    url, answer, _ = target
    [probe] = crack_uploads(count=1)
    small = Image.new("RGB", (48, 48))
    buf = io.BytesIO()
    small.save(buf, "PNG")
    answer["body"] = {**CLASSIFIED, **mask_fields(np.zeros((48, 48), dtype=np.uint8), buf.getvalue())}
    with pytest.raises(RuntimeError, match="for an upload of 96x96"):
        check_answer("rayloop", url, workload(probe))
    answer["body"]["mask_png_b64"] = base64.b64encode(b"not a png").decode()
    with pytest.raises(RuntimeError, match="not a PNG"):
        check_answer("rayloop", url, workload(probe))
