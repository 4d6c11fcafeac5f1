"""What bench/serve.py uploads: test digits as PNGs, or (--photos) a generated photo folder's JPEGs with the
default model trained for it; the wrk script that sends them; what one upload costs to decode and to run."""

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


def wrk_script(path: Path, images: list[bytes], kind: str = "png") -> Path:
    """A wrk Lua script POSTing the images in turn, each as multipart field `file` (`kind`: png or jpeg)."""
    boundary = "rayloopbenchboundary"

    def lua(image: bytes) -> str:
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.{kind}\"\r\n"
                f"Content-Type: image/{kind}\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        return '"' + "".join(f"\\{b}" for b in body) + '"'  # Lua decimal escapes keep the PNG bytes intact

    path.write_text(f'bodies = {{{", ".join(lua(image) for image in images)}}}\n'
                    f'headers = {{["Content-Type"] = "multipart/form-data; boundary={boundary}"}}\n'
                    'i = 0\n'
                    'request = function()\n'
                    '  i = i % #bodies + 1\n'
                    '  return wrk.format("POST", nil, headers, bodies[i])\n'
                    'end\n')
    return path


def photo_champion(workdir: Path, per_class: int) -> tuple[Path, str]:
    """A generated 227-px JPEG crack-photo folder and a registry whose champion is the default model for it
    (`model.arch: auto`, at the folder's own size), trained by `rayloop train` for one short epoch: this
    benchmark measures serving, not accuracy. Returns (folder, MLflow URI)."""
    from simulation.photos import make_photo_folder

    photos, data_dir = workdir / "photos", workdir / "photo-train"
    make_photo_folder(photos, per_class=per_class, size=227, seed=0)
    uri = f"sqlite:///{data_dir / 'mlflow.db'}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAYLOOP_")}
    env.update({"RAYLOOP_DATA_DIR": str(data_dir), "RAYLOOP_MLFLOW_URI": uri, "RAYLOOP_DATASET": str(photos),
                "RAYLOOP_PARAMS": str(REPO / "params.yaml"), "RAYLOOP_TRAIN_MAX_STEPS": "4"})
    print(f"training the default photo model on {photos} ({2 * per_class} images) ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "rayloop.cli", "train", "--epochs", "1"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"rayloop train on the photos failed:\n{done.stderr[-3000:]}")
    return photos, uri


def photo_uploads(photos: Path, count: int = 200) -> list[bytes]:
    """The folder's JPEG files as users would upload them, `count` of them, classes interleaved."""
    files = sorted(photos.rglob("*.jpg"))
    step = max(1, len(files) // count)
    return [path.read_bytes() for path in files[::step][:count]]


def decode_cost(uploads: list[bytes], mlflow_uri: str) -> dict:
    """Per request, in this process on one thread: decoding + resizing an upload to the champion's input, and
    the champion's forward pass on one image (what each request costs the server before any batching)."""
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
    for item in pixels[:20]:
        run(loaded, item[np.newaxis])
    forward_ms = (time.perf_counter() - started) * 1000 / min(20, len(pixels))
    return {"decode_ms": decode_ms, "forward_ms": forward_ms, "arch": loaded.model.arch, "size": size,
            "upload_kb": sum(map(len, uploads)) / len(uploads) / 1024}
