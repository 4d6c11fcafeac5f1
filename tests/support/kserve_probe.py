"""What KServe's SDK sees of an Open Inference Protocol v2 server, printed as one JSON object.

Runs in .venv-kserve (requirements-kserve.lock, `make kserve-client`), not in the project's venv: every kserve
release caps psutil<6 and protobuf<7, below Ray's pins. So it imports only the SDK, what the SDK installs
(httpx, the transport of its REST client and the error it raises) and numpy: never rayloop's code.

    .venv-kserve/bin/python tests/support/kserve_probe.py URL MODEL DIGITS.npz

DIGITS.npz (no pickles): `pixels` N x 1 x 28 x 28 float32 in [0, 1]; `png_data` uint8, the N PNG files one
after another, file i at png_data[png_offsets[i]:png_offsets[i + 1]].
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import kserve
import numpy as np
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ServerMetadataResponse

UNKNOWN_MODEL = "no-such-model"


def load_digits(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as digits:
        pixels, data, offsets = digits["pixels"], digits["png_data"], digits["png_offsets"]
    files = np.empty(len(offsets) - 1, dtype=np.object_)
    files[:] = [data[start:end].tobytes() for start, end in zip(offsets[:-1], offsets[1:])]
    return pixels, files


def answer(response: kserve.InferResponse) -> dict:
    outputs = {o.name: o.as_numpy() for o in response.outputs}
    # No model_version: the SDK's InferResponse.from_bytes drops it from a REST response.
    return {"id": response.id, "model_name": response.model_name, "outputs": sorted(outputs),
            "label": [v.decode() if isinstance(v, bytes) else str(v) for v in outputs["label"].reshape(-1)],
            "probabilities_shape": list(outputs["probabilities"].shape) if "probabilities" in outputs else None,
            "probabilities_dtype": str(outputs["probabilities"].dtype) if "probabilities" in outputs else None}


async def refusal(call) -> dict:
    """The status and message a KServe program gets when the server refuses its request."""
    try:
        await call
    except httpx.HTTPStatusError as refused:
        return {"status": refused.response.status_code, "message": str(refused)}
    return {"status": None, "message": "accepted"}


async def metadata(url: str, model: str) -> dict:
    """The v2 REST client has no metadata calls: read them as KServe's own v2 data models."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        server = (await http.get("/v2")).raise_for_status()
        about_model = (await http.get(f"/v2/models/{model}")).raise_for_status()
    return {"server": ServerMetadataResponse.model_validate_json(server.content).model_dump(),
            "model": ModelMetadataResponse.model_validate_json(about_model.content).model_dump()}


async def probe(url: str, model: str, pixels: np.ndarray, files: np.ndarray) -> dict:
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=120))
    binary_outputs = [RequestedOutput("label", {"binary_data": True}),
                      RequestedOutput("probabilities", {"binary_data": True})]
    try:
        fp32_json = kserve.InferInput("input", list(pixels.shape), "FP32", data=pixels)
        fp32_binary = kserve.InferInput("input", list(pixels.shape), "FP32")
        fp32_binary.set_data_from_numpy(pixels, binary_data=True)
        png_binary = kserve.InferInput("input", [len(files)], "BYTES")
        png_binary.set_data_from_numpy(files, binary_data=True)
        wrong_shape = kserve.InferInput("input", [1, 3, 28, 28], "FP32")
        wrong_shape.set_data_from_numpy(np.zeros((1, 3, 28, 28), dtype=np.float32), binary_data=True)
        return {
            "live": await client.is_server_live(url),
            "ready": await client.is_server_ready(url),
            "model_ready": await client.is_model_ready(url, model),
            "unknown_model_ready": await client.is_model_ready(url, UNKNOWN_MODEL),
            "metadata": await metadata(url, model),
            "fp32_json": answer(await client.infer(
                url, kserve.InferRequest(model, [fp32_json], request_id="fp32-json"), model)),
            "fp32_binary": answer(await client.infer(
                url, kserve.InferRequest(model, [fp32_binary], request_outputs=binary_outputs), model)),
            "png_binary": answer(await client.infer(
                url, kserve.InferRequest(model, [png_binary], request_outputs=binary_outputs[:1]), model)),
            "wrong_shape": await refusal(client.infer(url, kserve.InferRequest(model, [wrong_shape]), model)),
            "unknown_model": await refusal(client.infer(
                url, kserve.InferRequest(UNKNOWN_MODEL, [fp32_json]), UNKNOWN_MODEL)),
            "ready_after_refusals": await client.is_server_ready(url)}
    finally:
        await client.close()


def main(argv: list[str]) -> None:
    url, model, digits = argv
    print(json.dumps(asyncio.run(probe(url, model, *load_digits(digits)))))


if __name__ == "__main__":
    main(sys.argv[1:])
