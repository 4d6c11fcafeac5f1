"""The official Open Inference Protocol v2 clients, unchanged, against rayloop's real Serve application:
Triton's `tritonclient.http` and KServe's `InferenceRESTClient` get the right digits, in JSON and in binary,
and the same answers as /v1/predict. KServe's runs from its own venv (.venv-kserve, `make kserve-client`).

One Ray, one trained model (800 MNIST digits, 4 epochs), one Serve replica for the whole module.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.paths import REPO
from tests.support.serving import serving

pytestmark = pytest.mark.slow

DIGITS = 32
MIN_ACCURACY = 0.85


@dataclasses.dataclass
class ServedDigits:
    settings: object
    url: str
    pixels: np.ndarray      # DIGITS x 1 x 28 x 28 float32 in [0, 1]: test-split digits
    pngs: list[bytes]       # the same digits as PNG files
    truth: list[str]        # their labels
    v1_labels: list[str]    # what /v1/predict/batch answers for the PNGs

    @property
    def model(self) -> str:
        return self.settings.registry.model_name


def train_champion(settings) -> str:
    """A champion trained like `rayloop up` trains its first; its version."""
    from train.pipeline import run_train

    summary = run_train(settings)
    assert summary["champion"] is True
    return summary["model_version"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Ray, a champion trained like `rayloop up` trains its first, and Serve on a free port."""
    from train.data import load_prepared

    env = {"RAYLOOP_DATA_LIMIT": "800", "RAYLOOP_TRAIN_EPOCHS": "4", "RAYLOOP_TRAIN_NUM_WORKERS": "1"}
    with serving(tmp_path_factory.mktemp("v2clients") / "data", replicas=1, env=env, champion=None,
                 train=train_champion, num_cpus=4) as served:
        settings, url = served.settings, served.url
        x_test, y_test = load_prepared(settings.prepared_dir).split("test")
        # The split is ordered by class: a seeded draw brings every digit in (all zeros would prove little).
        chosen = np.random.default_rng(0).permutation(len(x_test))[:DIGITS]
        digits, truth = x_test[chosen], y_test[chosen]  # N x 28 x 28 x 1 uint8
        assert len(set(truth.tolist())) >= 8
        pngs = [png(d) for d in digits]
        with httpx.Client(base_url=url, timeout=120) as client:
            texts = [base64.b64encode(p).decode() for p in pngs]
            answer = client.post("/v1/predict/batch", json={"images_b64": texts})
        assert answer.status_code == 200, answer.text
        yield ServedDigits(settings, url, np.ascontiguousarray(digits.transpose(0, 3, 1, 2), dtype=np.float32) / 255,
                           pngs, [str(int(y)) for y in truth], [p["label"] for p in answer.json()["predictions"]])


def png(digit: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(digit[:, :, 0], "L").save(buf, "PNG")
    return buf.getvalue()


def labels(array) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(array).reshape(-1)]


def assert_right(served: ServedDigits, predicted: list[str]) -> None:
    """Right on real digits, and the same answer /v1/predict gives."""
    accuracy = np.mean(np.array(predicted) == np.array(served.truth))
    assert accuracy >= MIN_ACCURACY, (accuracy, predicted, served.truth)
    assert predicted == served.v1_labels


def test_the_model_is_a_trained_one(served):
    accuracy = np.mean(np.array(served.v1_labels) == np.array(served.truth))
    print(f"/v1/predict is right on {accuracy:.1%} of {DIGITS} test digits")
    assert accuracy >= MIN_ACCURACY


# -- Triton's client --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def triton(served):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=served.url.removeprefix("http://"), connection_timeout=60,
                                          network_timeout=120)
    yield client
    client.close()


def test_tritonclient_sees_a_live_ready_server_and_its_model(served, triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(served.model) and triton.is_model_ready(served.model, model_version="1")
    assert not triton.is_model_ready(served.model, model_version="2")
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata(served.model)
    assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]


def test_tritonclient_infers_fp32_in_json_and_in_binary(served, triton):
    import tritonclient.http as triton_http

    as_json = triton_http.InferInput("input", [DIGITS, 1, 28, 28], "FP32")
    as_json.set_data_from_numpy(served.pixels, binary_data=False)
    result = triton.infer(served.model, [as_json], request_id="json-1", outputs=[
        triton_http.InferRequestedOutput("label", binary_data=False),
        triton_http.InferRequestedOutput("probabilities", binary_data=False)])
    assert result.get_response()["id"] == "json-1" and result.get_response()["model_version"] == "1"
    assert_right(served, labels(result.as_numpy("label")))
    assert result.as_numpy("probabilities").shape == (DIGITS, 10)

    as_binary = triton_http.InferInput("input", [DIGITS, 1, 28, 28], "FP32")
    as_binary.set_data_from_numpy(served.pixels)  # binary by default; no outputs named: all, binary
    result = triton.infer(served.model, [as_binary], model_version="1")
    assert_right(served, labels(result.as_numpy("label")))
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and np.allclose(probabilities.sum(1), 1, atol=1e-3)


def test_tritonclient_infers_png_files_as_bytes_and_they_are_logged(served, triton):
    import tritonclient.http as triton_http

    with httpx.Client(base_url=served.url, timeout=60) as client:
        before = client.get("/v1/predictions", params={"limit": 1}).json()["total"]
        files = triton_http.InferInput("input", [DIGITS], "BYTES")
        files.set_data_from_numpy(np.array(served.pngs, dtype=np.object_))
        result = triton.infer(served.model, [files], outputs=[triton_http.InferRequestedOutput("label")])
        assert_right(served, labels(result.as_numpy("label")))
        assert client.get("/v1/predictions", params={"limit": 1}).json()["total"] == before + DIGITS

    texts = triton_http.InferInput("input", [2], "BYTES")  # in JSON: each file's base64 text
    texts.set_data_from_numpy(np.array([base64.b64encode(p) for p in served.pngs[:2]], dtype=np.object_),
                              binary_data=False)
    in_json = [triton_http.InferRequestedOutput("label", binary_data=False)]
    result = triton.infer(served.model, [texts], outputs=in_json)
    assert labels(result.as_numpy("label")) == served.v1_labels[:2]


def test_tritonclient_gets_a_readable_4xx_for_bad_input_and_the_server_stays_up(served, triton):
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    wrong = triton_http.InferInput("input", [1, 3, 28, 28], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 28, 28), dtype=np.float32))
    with pytest.raises(InferenceServerException) as refused:
        triton.infer(served.model, [wrong])
    assert refused.value.status() == "400" and "must be [N, 1, 28, 28]" in refused.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        triton.get_model_metadata("no-such-model")
    assert unknown.value.status() == "404" and "no-such-model" in unknown.value.message()
    assert triton.is_server_ready()


# -- KServe's client, from its own venv ---------------------------------------------------------------
# Every kserve release caps psutil<6 and protobuf<7, below Ray's pins, so the SDK lives in .venv-kserve
# (requirements-kserve.lock) and drives the server from there, as a client program would.
KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"
KSERVE_PROBE = REPO / "tests" / "support" / "kserve_probe.py"


@pytest.fixture(scope="module")
def kserve_python() -> str:
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: run `make kserve-client` (KServe's SDK has its own venv)")
    return str(KSERVE_PYTHON)


@pytest.fixture(scope="module")
def kserve_sees(kserve_python, served, tmp_path_factory) -> dict:
    """What tests/support/kserve_probe.py, run with KServe's SDK, reports of the served model."""
    digits = tmp_path_factory.mktemp("kserve") / "digits.npz"
    sizes = np.array([len(p) for p in served.pngs])
    np.savez(digits, pixels=served.pixels, png_data=np.frombuffer(b"".join(served.pngs), dtype=np.uint8),
             png_offsets=np.concatenate([[0], np.cumsum(sizes)]))
    # -I: only .venv-kserve's packages, whatever PYTHONPATH the test run has.
    probe = subprocess.run([kserve_python, "-I", str(KSERVE_PROBE), served.url, served.model, str(digits)],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-4000:]
    return json.loads(probe.stdout.strip().splitlines()[-1])


def test_kserve_client_sees_a_live_ready_server_and_its_model(served, kserve_sees):
    assert kserve_sees["live"] and kserve_sees["ready"] and kserve_sees["model_ready"]
    assert kserve_sees["unknown_model_ready"] is False
    server, model = kserve_sees["metadata"]["server"], kserve_sees["metadata"]["model"]
    assert "binary_tensor_data" in server["extensions"]
    assert model["name"] == served.model and model["versions"] == ["1"]
    assert model["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert {o["name"] for o in model["outputs"]} == {"label", "probabilities"}


def test_kserve_client_infers_fp32_in_json_and_in_binary(served, kserve_sees):
    as_json, as_binary = kserve_sees["fp32_json"], kserve_sees["fp32_binary"]
    assert as_json["id"] == "fp32-json" and as_json["model_name"] == served.model
    assert_right(served, as_json["label"])
    assert as_binary["outputs"] == ["label", "probabilities"]
    assert_right(served, as_binary["label"])
    assert as_binary["probabilities_shape"] == [DIGITS, 10] and as_binary["probabilities_dtype"] == "float32"


def test_kserve_client_infers_png_files_as_bytes(served, kserve_sees):
    files = kserve_sees["png_binary"]
    assert files["outputs"] == ["label"]
    assert_right(served, files["label"])


def test_kserve_client_gets_a_readable_4xx_for_bad_input_and_the_server_stays_up(kserve_sees):
    wrong_shape, unknown = kserve_sees["wrong_shape"], kserve_sees["unknown_model"]
    assert wrong_shape["status"] == 400 and "must be [N, 1, 28, 28]" in wrong_shape["message"]
    assert unknown["status"] == 404 and "no-such-model" in unknown["message"]
    assert kserve_sees["ready_after_refusals"]
