"""A trained crack segmenter on each surface: its IoU, and whether the calibrated drift check fires.

    RAYLOOP_DATASET=segmentation-demo RAYLOOP_DATA_DIR=/tmp/seg .venv/bin/rayloop train
    .venv/bin/python -m bench.seg_drift --model /tmp/seg/model

The reference is built as `rayloop train` builds it (train.pipeline.finalize) from fresh concrete photos; each
window is 200 fresh photos of one texture (train/cracks.py) through the model's own drift features; the
thresholds are fitted as the monitor fits them (monitoring.calibration, false-alarm rate 0.0003 per check).
`--clean-windows` more concrete windows count false alarms. Recorded in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

from cluster import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.results import write_section  # noqa: E402
from monitoring.calibration import Calibration  # noqa: E402
from train.cracks import TEXTURES, render  # noqa: E402
from train.features import feature_frame  # noqa: E402
from train.pipeline import finalize  # noqa: E402
from train.seg_evaluate import evaluate_masks  # noqa: E402
from train.train import load_model  # noqa: E402

WINDOW, RATE = 200, 0.0003


def photos(seed: int, count: int, texture: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    shots = [render(seed, i, size, texture) for i in range(count)]
    return np.stack([np.asarray(p) for p, _ in shots]), np.stack([m for _, m in shots])


def batches(images: np.ndarray, masks: np.ndarray, size: int = 64) -> list[dict]:
    return [{"image": images[i:i + size], "mask": masks[i:i + size], "label": np.zeros(len(images[i:i + size]))}
            for i in range(0, len(images), size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "data" / "model")
    parser.add_argument("--reference", type=int, default=600)
    parser.add_argument("--clean-windows", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    model = load_model(args.model)
    if getattr(model, "task", "classification") != "segmentation":
        raise SystemExit(f"{args.model}: not a segmentation model")
    size = model.image_size
    reference = finalize(model, batches(*photos(1000, args.reference, "concrete", size)))
    calibration = Calibration.fit(reference, WINDOW, RATE, seed=0, null_samples=int(3 / RATE) + 1,
                                  comparison_rows=min(1000, args.reference // 2))
    rows, false_alarms = [], 0
    for k, texture in enumerate(["concrete"] * (1 + args.clean_windows) + [t for t in TEXTURES if t != "concrete"]):
        images, masks = photos(2000 + k, WINDOW, texture, size)
        scores = evaluate_masks(model, batches(images, masks)).scores
        window = feature_frame(model, torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255))
        decision = calibration.check(window)
        stats = {s.name: s for s in decision.statistics}
        if texture == "concrete" and k > 0:
            false_alarms += decision.drift
            continue
        rows.append(f"| {texture} | {scores['iou']:.3f} | {scores['miou']:.3f} | {scores['area_error_pct']:.2f} | "
                    f"{'**yes**' if decision.drift else 'no'} | "
                    + " | ".join(f"{stats[n].value:.3f} ({stats[n].threshold:.3f})"
                                 for n in ("embedding_mmd2", "class_tv", "confidence_ks")) + " |")
    seconds = time.perf_counter() - started
    body = "\n".join([
        "## Crack segmentation: IoU per surface and the calibrated drift check",
        "",
        f"`.venv/bin/python -m bench.seg_drift --model {args.model}` ({time.strftime('%Y-%m-%d %H:%M')}, "
        f"{seconds:.0f} s): {model.arch} at {size} px trained by `rayloop train` on the generated concrete set; "
        f"reference {args.reference} fresh concrete photos, windows of {WINDOW}, false-alarm rate {RATE} per check.",
        "",
        "| surface | IoU | mIoU | area error (% points) | drift | embedding MMD² (threshold) | class TV "
        "| confidence KS |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Clean concrete windows beyond the first: {false_alarms} false alarms in {args.clean_windows}.",
    ])
    print(body)
    if not args.no_record:
        write_section("bench/seg_drift.py", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
