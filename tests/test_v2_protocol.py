"""The Open Inference Protocol v2 routes in-process (no Ray): JSON and binary tensor data, as the official
Triton and KServe clients encode them, and every refusal a 4xx `{"error": ...}` with the server still up."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cluster.settings import load_settings
from serve import images
from serve.http import create_app
from store import Store
from tests.support.paths import REPO
from tests.support.v2_tensors import (
    HEADER,
    assert_refused,
    b64,
    binary_outputs,
    binary_request,
    bytes_tensor,
    fp32,
    outputs,
    pixels,
)
from tests.support.v2_tensors import digit_png as png

MODEL = "rayloop-classifier"
INFER = f"/v2/models/{MODEL}/infer"
CLASSES = [str(i) for i in range(10)]
MAX_IMAGES = 8


class BrightnessModel:
    """A Backend (serve/http/context.py) whose label is an image's mean brightness in tenths: 0.55 -> "5"."""

    def __init__(self, settings):
        self.limits = settings.serve

    async def predict_image(self, data: bytes, route: float | None = None) -> dict:
        return self.predicted(images.prepare(data, 28, 1, self.limits.max_upload_bytes, self.limits.max_pixels))

    async def predict_pixels(self, pixels: np.ndarray, route: float | None = None) -> dict:
        return self.predicted(pixels)

    @staticmethod
    def predicted(pixels: np.ndarray) -> dict:
        best = min(9, int(float(np.mean(pixels)) * 10))
        probabilities = {c: 0.91 if i == best else 0.01 for i, c in enumerate(CLASSES)}
        return {"label": str(best), "confidence": 0.91, "probabilities": probabilities, "model_version": "3",
                "features": {"brightness": float(np.mean(pixels))}}

    async def info(self) -> dict:
        return {"name": MODEL, "model_version": "3", "classes": CLASSES, "input_shape": [1, 28, 28]}

    async def champion(self) -> dict | None:
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    settings = load_settings({"RAYLOOP_DATA_DIR": str(tmp_path_factory.mktemp("v2") / "data"),
                              "RAYLOOP_PARAMS": str(REPO / "params.yaml"),
                              "RAYLOOP_SERVE_MAX_BATCH_IMAGES": str(MAX_IMAGES),
                              "RAYLOOP_SERVE_MAX_UPLOAD_BYTES": "200000"})
    store = Store.from_settings(settings)
    app = create_app(BrightnessModel(settings), store, settings)
    with TestClient(app) as client:
        yield client, store, app
    store.close()


@pytest.fixture(scope="module")
def client(served):
    return served[0]


# -- server and model metadata, health -----------------------------------------------------------------
def test_server_metadata_lists_the_binary_tensor_data_extension(client):
    body = client.get("/v2").json()
    assert body["name"] == "rayloop" and body["extensions"] == ["binary_tensor_data"]


def test_health_says_live_and_ready(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_and_readiness_by_name_and_by_the_served_version(client):
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/3"):
        meta = client.get(path).json()
        assert meta["name"] == MODEL and meta["versions"] == ["3"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                                   {"name": "label", "datatype": "BYTES", "shape": [-1]}]
        assert client.get(f"{path}/ready").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/other", "/v2/models/other/ready", f"/v2/models/{MODEL}/versions/2",
                                  f"/v2/models/{MODEL}/versions/2/ready", "/v2/models/other/versions/3"])
def test_an_unknown_model_or_version_is_404(client, path):
    assert_refused(client.get(path), 404)


def test_infer_on_an_unknown_model_or_version_is_404(client):
    body = {"inputs": [fp32(1)]}
    assert_refused(client.post("/v2/models/other/infer", json=body), 404)
    assert_refused(client.post(f"/v2/models/{MODEL}/versions/9/infer", json=body), 404)
    assert client.post(f"/v2/models/{MODEL}/versions/3/infer", json=body).status_code == 200


# -- JSON ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain", "application/octet-stream"])
def test_a_json_body_is_read_whatever_its_content_type_says(client, content_type):
    body = json.dumps({"id": "r1", "inputs": [fp32(2, 7)]})
    headers = {"content-type": content_type} if content_type else {}

    response = client.post(INFER, content=body, headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json" and HEADER not in response.headers
    answer = response.json()
    assert answer["id"] == "r1" and answer["model_name"] == MODEL and answer["model_version"] == "3"
    assert outputs(response)["label"] == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["2", "7"]}
    probabilities = outputs(response)["probabilities"]
    assert probabilities["shape"] == [2, 10]
    assert np.argmax(np.reshape(probabilities["data"], (2, 10)), 1).tolist() == [2, 7]


def test_fp32_data_may_be_nested_row_major(client):
    response = client.post(INFER, json={"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                    "data": pixels(4).tolist()}]})
    assert outputs(response)["label"]["data"] == ["4"]


def test_bytes_in_json_are_the_base64_text_of_image_files(client):
    response = client.post(INFER, json={"inputs": [{"name": "input", "shape": [3], "datatype": "BYTES",
                                                    "data": [b64(png(1)), b64(png(8)), b64(png(5, size=50))]}]})
    assert response.status_code == 200, response.text
    assert outputs(response)["label"]["data"] == ["1", "8", "5"]


def test_every_prediction_is_logged_with_its_image(served):
    client, store, _ = served
    client.post(INFER, json={"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64(png(6))]}]})
    client.post(INFER, json={"inputs": [fp32(1, 2)]})
    store.flush()
    logged = store.list_predictions(limit=3)  # the newest: these requests' predictions
    assert sorted(p.label for p in logged) == ["1", "2", "6"] and {p.model_version for p in logged} == {"3"}
    [from_file] = [p for p in logged if p.label == "6"]
    assert store.blobs.get(from_file.blob_key) == png(6)


def test_outputs_select_what_comes_back(client):
    body = {"inputs": [fp32(3)], "outputs": [{"name": "label"}]}
    assert [o["name"] for o in client.post(INFER, json=body).json()["outputs"]] == ["label"]


def test_a_gzip_compressed_request_is_inflated(client):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64(png(9))]}]})
    response = client.post(INFER, content=gzip.compress(body.encode()), headers={"content-encoding": "gzip"})
    assert outputs(response)["label"]["data"] == ["9"]


# -- binary tensor data -------------------------------------------------------------------------------
def test_binary_fp32_input_and_binary_outputs(client):
    batch = pixels(0, 9, 4)
    body, headers = binary_request({"id": "b1", "inputs": [
        {"name": "input", "shape": [3, 1, 28, 28], "datatype": "FP32",
         "parameters": {"binary_data_size": batch.nbytes}}],
        "parameters": {"binary_data_output": True}}, batch.astype("<f4").tobytes())

    response = client.post(INFER, content=body, headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, blobs = binary_outputs(response)
    assert header["id"] == "b1" and all("data" not in o for o in header["outputs"])
    assert blobs["label"] == bytes_tensor(b"0", b"9", b"4")
    probabilities = np.frombuffer(blobs["probabilities"], dtype="<f4").reshape(3, 10)
    assert probabilities.argmax(1).tolist() == [0, 9, 4] and probabilities[0, 0] == pytest.approx(0.91)


def test_binary_bytes_input_of_image_files_or_their_base64_text(client):
    elements = (png(2), png(6), b64(png(7)).encode())
    body, headers = binary_request({"inputs": [{"name": "input", "shape": [3], "datatype": "BYTES",
                                                "parameters": {"binary_data_size": len(bytes_tensor(*elements))}}]},
                                   bytes_tensor(*elements))
    response = client.post(INFER, content=body, headers={**headers, "content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert outputs(response)["label"]["data"] == ["2", "6", "7"]  # outputs in JSON unless asked for binary


def test_each_output_may_override_the_request_wide_binary_default(client):
    body = {"inputs": [fp32(5)], "parameters": {"binary_data_output": True},
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}, {"name": "label"}]}
    header, blobs = binary_outputs(client.post(INFER, json=body))
    assert [o["name"] for o in header["outputs"]] == ["probabilities", "label"]
    assert len(header["outputs"][0]["data"]) == 10 and blobs == {"label": bytes_tensor(b"5")}


# -- the official clients' own encoders and decoders ----------------------------------------------------
def test_tritonclient_requests_and_results_round_trip(client):
    from tritonclient.http import InferInput, InferRequestedOutput, InferResult

    # What InferenceServerClient.infer posts (no content-type), built by the client library's own code.
    from tritonclient.http._utils import _get_inference_request

    def infer(inputs, outputs=None):
        body, json_size = _get_inference_request(inputs=inputs, request_id="t1", outputs=outputs, sequence_id=0,
                                                 sequence_start=False, sequence_end=False, priority=0,
                                                 timeout=None, custom_parameters=None)
        response = client.post(INFER, content=body, headers={HEADER: str(json_size)} if json_size else {})
        assert response.status_code == 200, response.text
        return InferResult.from_response_body(response.content, header_length=response.headers.get(HEADER))

    as_json = InferInput("input", [2, 1, 28, 28], "FP32")
    as_json.set_data_from_numpy(pixels(3, 8), binary_data=False)
    result = infer([as_json], [InferRequestedOutput("label", binary_data=False)])
    assert result.as_numpy("label").tolist() == ["3", "8"] and result.get_response()["id"] == "t1"

    as_binary = InferInput("input", [2], "BYTES")
    as_binary.set_data_from_numpy(np.array([png(1), png(0)], dtype=np.object_))  # binary by default
    result = infer([as_binary])  # no outputs named: all of them, binary
    assert result.as_numpy("label").tolist() == [b"1", b"0"]
    assert result.as_numpy("probabilities").argmax(1).tolist() == [1, 0]


# -- refusals: 4xx {"error"}, and the server answers the next request ------------------------------------
FP32 = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}
GOOD = [0.5] * 784


def png_claiming(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("body,codes", [
    (b"{not json", (400,)),
    (b"\xff\xfe\x00garbage", (400,)),
    (b"[1, 2, 3]", (400,)),
    (b"[" * 100_000, (400,)),
    (json.dumps({"inputs": []}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": GOOD}, {**FP32, "data": GOOD}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "datatype": "INT64", "data": [1] * 784}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "shape": [1, 3, 28, 28], "data": [0.5] * 3 * 784}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "shape": [0, 1, 28, 28], "data": []}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": [0.5] * 10}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": [7.0] * 784}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": [float("nan")] * 784}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": ["a"] * 784}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": [[0.5] * 2, [0.5]] * 392}]}), (400,)),
    (json.dumps({"inputs": [FP32]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "shape": "big", "data": GOOD}]}), (400,)),
    (json.dumps({"inputs": [fp32(*[1] * (MAX_IMAGES + 1))]}), (413,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}), (400,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [12]}]}), (400,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [0], "datatype": "BYTES", "data": []}]}), (400,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES", "data": [b64(png(1))]}]}), (400,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [b64(b"text")]}]}), (400,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": [""]}]}), (400,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                             "data": [b64(b"\x89PNG" + b"\0" * 200_001)]}]}), (413,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                             "data": [b64(png_claiming(30_000, 30_000))]}]}), (413,)),
    (json.dumps({"inputs": [{"name": "input", "shape": [MAX_IMAGES + 1], "datatype": "BYTES",
                             "data": [b64(png(1))] * (MAX_IMAGES + 1)}]}), (413,)),
    (json.dumps({"inputs": [{**FP32, "data": GOOD}], "outputs": [{"name": "embedding"}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": GOOD}],
                 "outputs": [{"name": "label", "parameters": {"classification": 3}}]}), (400,)),
    (json.dumps({"inputs": [{**FP32, "data": GOOD}], "parameters": {"binary_data_output": "yes"}}), (400,)),
    (json.dumps({"id": 7, "inputs": [{**FP32, "data": GOOD}]}), (400,)),
], ids=[
    "not JSON", "not UTF-8", "a JSON array", "JSON nested past the parser depth", "no inputs", "two inputs",
    "INT64", "three channels for a gray model", "zero images", "values short of the shape", "pixels past 1",
    "NaN pixels", "strings for FP32", "ragged nesting", "no data", "shape not a list",
    "more images than the limit", "BYTES not base64", "BYTES not a string", "no BYTES elements",
    "fewer elements than the shape", "base64 of text", "an empty image", "an image over the byte limit",
    "a decompression bomb", "more BYTES images than the limit", "an unknown output",
    "the classification extension", "binary_data_output not a bool", "a numeric id"])
def test_bad_json_requests_are_refused_with_an_error(client, body, codes):
    assert_refused(client.post(INFER, content=body), *codes)
    assert client.post(INFER, json={"inputs": [{**FP32, "data": GOOD}]}).status_code == 200


def binary_fp32(size: int, sent: int, **extra) -> tuple[bytes, dict]:
    return binary_request({"inputs": [{**FP32, "parameters": {"binary_data_size": size}, **extra}]}, b"\0" * sent)


@pytest.mark.parametrize("body_headers", [
    binary_fp32(4 * 784, 4 * 784 - 1),                                   # fewer bytes than it says
    binary_fp32(4 * 784, 4 * 784 + 3),                                   # more bytes than it says
    binary_fp32(4 * 784 - 4, 4 * 784 - 4),                               # does not fill the shape
    binary_fp32(4 * 784, 4 * 784, data=GOOD),                            # both data and binary
    binary_fp32("3136", 4 * 784),                                        # size not a number
    binary_request({"inputs": [{**FP32, "data": GOOD}]}, b"\0" * 8),     # bytes no input claims
    (b'{"inputs": []}', {HEADER: "999"}),                                # header longer than the body
    (b'{"inputs": []}', {HEADER: "abc"}),
    (b'{"inputs": []}', {HEADER: "-1"}),
    binary_request({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 99) + b"ab"),
    binary_request({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                "parameters": {"binary_data_size": 2}}]}, b"ab"),
    binary_request({"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES",
                                "parameters": {"binary_data_size": 12}}]}, bytes_tensor(b"not an image")),
])
def test_bad_binary_requests_are_refused_with_an_error(client, body_headers):
    body, headers = body_headers
    assert_refused(client.post(INFER, content=body, headers=headers), 400)


def test_too_many_binary_images_and_too_large_bodies_are_413(client):
    many = bytes_tensor(*[png(1)] * (MAX_IMAGES + 1))
    body, headers = binary_request({"inputs": [{"name": "input", "shape": [MAX_IMAGES + 1], "datatype": "BYTES",
                                                "parameters": {"binary_data_size": len(many)}}]}, many)
    assert_refused(client.post(INFER, content=body, headers=headers), 413)
    zeros = bytes_tensor(*[b""] * 100_000)  # empty elements: counted, not looped over to the end
    body, headers = binary_request({"inputs": [{"name": "input", "shape": [100_000], "datatype": "BYTES",
                                                "parameters": {"binary_data_size": len(zeros)}}]}, zeros)
    assert_refused(client.post(INFER, content=body, headers=headers), 413)
    bomb = gzip.compress(b" " * 30_000_000)  # 30 KB that inflate past the body limit
    assert "inflates" in assert_refused(client.post(INFER, content=bomb, headers={"content-encoding": "gzip"}), 413)


def test_bad_compression_is_refused(client):
    assert_refused(client.post(INFER, content=b"not gzip", headers={"content-encoding": "gzip"}), 400)
    assert_refused(client.post(INFER, content=b"{}", headers={"content-encoding": "br"}), 415)


def test_a_refused_image_is_named_by_its_position(client):
    response = client.post(INFER, json={"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES",
                                                    "data": [b64(png(1)), b64(b"GIF89a not really")]}]})
    assert assert_refused(response, 400).startswith("image 1:")


def test_a_body_streaming_past_the_limit_is_413_with_an_error(client):
    def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(100):
            yield b"\0" * 65536

    assert_refused(client.post(INFER, content=chunks()), 413)


def test_a_body_declared_past_the_limit_is_413_with_an_error(client):
    # Refused before any route runs (BodyLimit): the answer still carries the protocol's `error`.
    big = b"\0" * (MAX_IMAGES * (200_000 * 4 // 3 + 65536) + 1)
    assert "the limit is" in assert_refused(client.post(INFER, content=big), 413)
