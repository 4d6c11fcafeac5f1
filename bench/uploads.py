"""What bench/serve.py uploads: test digits as PNGs, (--photos) a generated photo folder's JPEGs with the
default model trained for it, or (--segmentation) generated crack photos as PNGs with the U-Net trained on the
crack set; the wrk script that sends them; what one upload costs to decode, to run and to answer."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sample_pngs(count: int = 200) -> list[bytes]:
    """`count` different real test digits when the prepared data is there, else noise images of the same size.

    Varied traffic, as users send: a single image repeated is a shifted stream, which keeps the drift
    monitor in a drift episode (and its report building) for the whole run.
    """
    import numpy as np
    from PIL import Image

    from train.data import load_prepared

    prepared = REPO / "data" / "prepared"
    if (prepared / "manifest.csv").is_file() and load_prepared(prepared).meta.source == "mnist":
        images, _ = load_prepared(prepared).split("test", limit=count)
    else:
        images = np.random.default_rng(0).integers(0, 255, (count, 28, 28, 1), dtype=np.uint8)
    encoded = []
    for pixels in images:
        buf = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buf, "PNG")
        encoded.append(buf.getvalue())
    return encoded


BOUNDARY = "rayloopbenchboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(image: bytes, kind: str = "png") -> bytes:
    """A request body carrying the image as multipart field `file` (`kind`: png or jpeg), as a browser sends it."""
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.{kind}\"\r\n"
            f"Content-Type: image/{kind}\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()


def wrk_script(path: Path, images: list[bytes], kind: str = "png") -> Path:
    """A wrk Lua script POSTing the images in turn, each as multipart field `file` (`kind`: png or jpeg)."""
    def lua(image: bytes) -> str:
        return '"' + "".join(f"\\{b}" for b in multipart(image, kind)) + '"'  # Lua decimal escapes keep the bytes

    path.write_text(f'bodies = {{{", ".join(lua(image) for image in images)}}}\n'
                    f'headers = {{["Content-Type"] = "{CONTENT_TYPE}"}}\n'
                    'i = 0\n'
                    'request = function()\n'
                    '  i = i % #bodies + 1\n'
                    '  return wrk.format("POST", nil, headers, bodies[i])\n'
                    'end\n')
    return path


def train_champion(data_dir: Path, dataset: str, *args: str, **env: str) -> str:
    """`rayloop train` on `dataset` into a registry of its own in data_dir (RAYLOOP_* from this process left
    out, `env` added); returns its MLflow URI."""
    uri = f"sqlite:///{data_dir / 'mlflow.db'}"
    train_env = {key: value for key, value in os.environ.items() if not key.startswith("RAYLOOP_")}
    train_env.update({"RAYLOOP_DATA_DIR": str(data_dir), "RAYLOOP_MLFLOW_URI": uri, "RAYLOOP_DATASET": dataset,
                      "RAYLOOP_PARAMS": str(REPO / "params.yaml"), **env})
    done = subprocess.run([sys.executable, "-m", "rayloop.cli", "train", *args], env=train_env, cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"rayloop train on {dataset} failed:\n{done.stderr[-3000:]}")
    return uri


def photo_champion(workdir: Path, per_class: int) -> tuple[Path, str]:
    """A generated 227-px JPEG crack-photo folder and a registry whose champion is the default model for it
    (`model.arch: auto`, at the folder's own size), trained by `rayloop train` for one short epoch: this
    benchmark measures serving, not accuracy. Returns (folder, MLflow URI)."""
    from simulation.photos import make_photo_folder

    photos = workdir / "photos"
    make_photo_folder(photos, per_class=per_class, size=227, seed=0)
    print(f"training the default photo model on {photos} ({2 * per_class} images) ...", flush=True)
    return photos, train_champion(workdir / "photo-train", str(photos), "--epochs", "1", RAYLOOP_TRAIN_MAX_STEPS="4")


def crack_champion(workdir: Path) -> str:
    """A registry whose champion is the segmentation model for the generated crack set (`segmentation-demo`:
    800 concrete photos at 96 px, `model.arch: auto` -> the U-Net), trained by `rayloop train` at the
    default epochs, so that its masks look like a served model's. Returns its MLflow URI."""
    from train.layout import SEGMENTATION_DEMO

    print(f"training the segmentation model on the generated {SEGMENTATION_DEMO} set ...", flush=True)
    return train_champion(workdir / "crack-train", SEGMENTATION_DEMO)


def crack_uploads(count: int = 200, seed: int = 5) -> list[bytes]:
    """`count` different crack photos as PNGs, at the crack set's size, from a seed the training set does not use."""
    from train.cracks import render
    from train.data import DEMO_SIZE

    encoded = []
    for index in range(count):
        photo, _ = render(seed=seed, index=index, size=DEMO_SIZE)
        buf = io.BytesIO()
        photo.save(buf, "PNG")
        encoded.append(buf.getvalue())
    return encoded


def photo_uploads(photos: Path, count: int = 200) -> list[bytes]:
    """The folder's JPEG files as users would upload them, `count` of them, classes interleaved."""
    files = sorted(photos.rglob("*.jpg"))
    step = max(1, len(files) // count)
    return [path.read_bytes() for path in files[::step][:count]]


def decode_cost(uploads: list[bytes], mlflow_uri: str) -> dict:
    """Per request, in this process on one thread: decoding + resizing an upload to the champion's input, the
    champion's forward pass on one image (what each request costs the server before any batching) and, for a
    segmentation model, making the answer's mask fields (mask_ms)."""
    import numpy as np
    import torch

    from cluster.settings import load_settings
    from serve import images
    from serve.classifier import load, run

    torch.set_num_threads(1)
    settings = load_settings({**os.environ, "RAYLOOP_MLFLOW_URI": mlflow_uri})
    loaded = load(settings, "champion", torch.device("cpu"))
    channels, size, _ = loaded.input_shape
    started = time.perf_counter()
    pixels = [images.prepare(data, size, channels, settings.serve.max_upload_bytes, settings.serve.max_pixels)
              for data in uploads]
    decode_ms = (time.perf_counter() - started) * 1000 / len(uploads)
    run(loaded, pixels[0][np.newaxis])  # warm-up
    started = time.perf_counter()
    answers = [run(loaded, item[np.newaxis])[0] for item in pixels[:20]]
    forward_ms = (time.perf_counter() - started) * 1000 / len(answers)
    cost = {"decode_ms": decode_ms, "forward_ms": forward_ms, "arch": loaded.model.arch, "size": size,
            "upload_kb": sum(map(len, uploads)) / len(uploads) / 1024}
    if "mask" in answers[0]:  # a segmentation answer: the mask scaled to the upload's size, as PNG, and its area
        from train.tasks.segmentation import mask_fields

        started = time.perf_counter()
        for data, answer in zip(uploads, answers):
            mask_fields(answer["mask"], data)
        cost["mask_ms"] = (time.perf_counter() - started) * 1000 / len(answers)
    return cost
