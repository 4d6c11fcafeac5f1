"""Benchmark: peak memory and images/s of `rayloop train` on photo folders of 2k, 12k and 40k images, vs plain PyTorch.

    .venv/bin/python bench/ingest.py [--sizes 2000,12000,40000] [--image-size 128] [--arch resnet18]
                                     [--max-steps N] [--train-workers N] [--work /tmp/rayloop-ingest]
    .venv/bin/python bench/ingest.py --sizes 200 --baseline-only    # the plain baseline alone, no Ray

For each size N it writes (once; reused while the count matches) an ImageFolder of N synthetic 227-px
crack photos with simulation.photos, then, one after the other on the same machine:
  rayloop  `rayloop train --no-register --epochs 1` on that folder at --image-size px, in a fresh data
           dir with a fresh local Ray (RAYLOOP_* env only; no running head is joined);
  plain    this file in --plain-worker mode: a map-style Dataset reading the same files (PIL open, RGB,
           bilinear resize), DataLoader(num_workers=2, batch 64, shuffle), the same ImageClassifier,
           AdamW, one epoch over rayloop's train split, 2 torch threads.
A sampler thread reads /proc/meminfo every 0.1 s during each run: peak memory is the highest
MemTotal - MemAvailable minus its value just before the run (the whole machine, so run it on a quiet
one), and the same for AnonPages + Shmem (what processes hold, steadier); the PSS column sums the run's
own processes (every 2 s). Goals (the issue): rayloop's peak at 40k <= 1.3x its
peak at 2k, the 2k run within 3 GiB, and rayloop's train images/s >= 0.9x plain's at each size.
The table goes to bench/RESULTS.md (--out - prints it only; --baseline-only prints unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/ must not shadow packages
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))

import psutil  # noqa: E402
from results import write_section  # noqa: E402

from simulation.photos import make_photo_folder  # noqa: E402

RAYLOOP = str(Path(sys.executable).parent / "rayloop")
GIB = 1024 ** 3
PHOTO_SIZE = 227
PLAIN_THREADS = 2
PLAIN_LOADER_WORKERS = 2
RESULT_MARK = "PLAIN_RESULT "


# ---------------------------------------------------------------- photo folders


def photo_folder(work: Path, images: int, workers: int, seed: int = 0) -> Path:
    """work/photos-<images>: made once, reused while its recorded parameters and file count match."""
    folder = work / f"photos-{images}"
    recipe = {"per_class": images // 2, "size": PHOTO_SIZE, "seed": seed, "classes": ["negative", "positive"]}
    stamp = folder / "photos.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe and \
            sum(1 for _ in folder.glob("*/*.jpg")) == 2 * recipe["per_class"]:
        return folder
    started = time.perf_counter()
    stamp.unlink(missing_ok=True)
    make_photo_folder(folder, recipe["per_class"], PHOTO_SIZE, seed, workers=workers)
    stamp.write_text(json.dumps(recipe))
    print(f"[ingest] wrote {2 * recipe['per_class']} photos to {folder} in {time.perf_counter() - started:.1f}s",
          flush=True)
    return folder


# ---------------------------------------------------------------- memory while a command runs


def meminfo() -> dict[str, int]:
    fields = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields


def memory_now() -> tuple[int, int]:
    """(MemTotal - MemAvailable, AnonPages + Shmem). The first is memory in use on the whole machine (page
    cache that can go is not counted); the second is what processes hold (their heaps, Ray's
    object store), without the kernel's estimate of reclaimable cache, which on this VM moved the first by
    up to 1 GiB between two runs of the same command (1.94 and 3.09 GiB; anon + shmem 2.66 and 2.67)."""
    fields = meminfo()
    return fields["MemTotal"] - fields["MemAvailable"], fields["AnonPages"] + fields["Shmem"]


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of a process and all its descendants (shared pages split between them)."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # ended between listing and reading: it holds nothing any more
    return total


class Sampler(threading.Thread):
    """Every `interval` s the machine's memory (/proc/meminfo, cheap), every `pss_every` samples the run's PSS
    (every process's smaps: slow enough to slow the run if read often); keeps the peaks."""

    def __init__(self, process: subprocess.Popen, interval: float = 0.1, pss_every: int = 20):
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_every = psutil.Process(process.pid), interval, pss_every
        self.peak_used, self.peak_held, self.peak_pss = 0, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        count = 0
        while not self.done.is_set():
            used, held = memory_now()
            self.peak_used, self.peak_held = max(self.peak_used, used), max(self.peak_held, held)
            if count % self.pss_every == 0:
                try:
                    self.peak_pss = max(self.peak_pss, tree_pss(self.root))
                except psutil.NoSuchProcess:
                    break  # the run's process has exited: nothing of it is left to sample
            count += 1
            self.done.wait(self.interval)


def settle(seconds: float = 20.0) -> tuple[int, int]:
    """memory_now() once the previous run's processes are gone: three samples within 32 MiB, or after `seconds`."""
    samples, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples = (samples + [memory_now()])[-3:]
        if len(samples) == 3 and max(u for u, _ in samples) - min(u for u, _ in samples) < 32 * 1024 ** 2:
            break
        time.sleep(1)
    samples = samples or [memory_now()]
    return min(u for u, _ in samples), min(h for _, h in samples)


def measured_run(command: list[str], env: dict[str, str], log_path: Path, timeout: float) -> dict:
    """Run a command (its own session), logging its output; wall time and memory peaks over the before-value."""
    before, held_before = settle()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        sampler = Sampler(process)
        sampler.start()
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            rc = "timeout"
        finally:
            sampler.done.set()
            sampler.join()
    return {"rc": rc, "wall": time.perf_counter() - started, "peak": max(0, sampler.peak_used - before),
            "held": max(0, sampler.peak_held - held_before), "pss": sampler.peak_pss, "log": str(log_path),
            "output": log_path.read_text(errors="replace")}


# ---------------------------------------------------------------- the two targets


def run_env(folder: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, str]:
    """The environment of both targets: the same RAYLOOP_* settings, nothing inherited from the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_") and k != "RAY_ADDRESS"}
    env.update(RAYLOOP_DATASET=str(folder), RAYLOOP_DATA_IMAGE_SIZE=str(args.image_size), RAYLOOP_DATA_CHANNELS="3",
               RAYLOOP_TRAIN_EPOCHS="1", RAYLOOP_MODEL_ARCH=args.arch, RAYLOOP_DATA_DIR=str(run_dir / "data"),
               RAYLOOP_MLFLOW_URI=f"sqlite:///{run_dir / 'data' / 'mlflow.db'}",
               # empty: connect() finds no head in this fresh data dir and starts a local Ray of its own
               RAYLOOP_RAY_ADDRESS="", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    if args.device != "auto":
        env["RAYLOOP_TRAIN_USE_GPU"] = "true" if args.device == "cuda" else "false"
    if args.max_steps:
        env["RAYLOOP_TRAIN_MAX_STEPS"] = str(args.max_steps)
    return env


def run_rayloop(folder: Path, images: int, args: argparse.Namespace) -> dict:
    run_dir = new_run_dir(args.work, "rayloop", images)
    command = [RAYLOOP, "train", "--no-register", "--epochs", "1", "--json"]
    if args.train_workers:
        command += ["--workers", str(args.train_workers)]
    result = measured_run(command, run_env(folder, run_dir, args), run_dir / "train.log", args.timeout)
    out = result.pop("output")
    rates = re.findall(r"\[train\] epoch \d+/\d+ .*?([\d.]+) img/s", out)
    train_count = re.search(r"split \{[^}]*'train': (\d+)", out)
    workers = re.search(r"training with (\d+) Ray Train workers", out)
    return {**result, "target": "rayloop", "images": images, "img_s": float(rates[-1]) if rates else None,
            "train_images": int(train_count.group(1)) if train_count else None,
            "detail": f"{workers.group(1)} Ray Train workers" if workers else ""}


def run_plain(folder: Path, images: int, args: argparse.Namespace) -> dict:
    run_dir = new_run_dir(args.work, "plain", images)
    command = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", str(folder),
               "--image-size", str(args.image_size), "--arch", args.arch, "--max-steps", str(args.max_steps),
               "--device", args.device]
    result = measured_run(command, run_env(folder, run_dir, args), run_dir / "plain.log", args.timeout)
    out = result.pop("output")
    lines = [line[len(RESULT_MARK):] for line in out.splitlines() if line.startswith(RESULT_MARK)]
    report = json.loads(lines[-1]) if lines else {}
    return {**result, "target": "plain", "images": images, "img_s": report.get("images_per_s"),
            "train_images": report.get("train_images"), "detail": report.get("split", ""),
            "steps": report.get("steps"), "device": report.get("device")}


def new_run_dir(work: Path, target: str, images: int) -> Path:
    path = work / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{target}-{images}"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- plain PyTorch baseline (--plain-worker)


def train_split(folder: Path) -> tuple[list[str], list[tuple[Path, int]], str]:
    """(classes, train files with labels, how they were chosen): rayloop's own split when its manifest API is
    there (same RAYLOOP_* settings), else every file of the folder."""
    from cluster.settings import load_settings

    try:
        from train.data import build_manifest

        meta, manifest = build_manifest(load_settings().data)
        rows = manifest[manifest["split"] == "train"]
        return meta.classes, [(Path(meta.root) / p, int(label)) for p, label in zip(rows["path"], rows["label"])], \
            "rayloop's train split"
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        print(f"[plain] rayloop's split unavailable ({exc!r}): training on every file", flush=True)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = [(path, label) for label, name in enumerate(classes) for path in sorted((folder / name).glob("*.jpg"))]
    return classes, files, "all files (rayloop's split unknown)"


def plain_worker(folder: Path, image_size: int, arch: str, max_steps: int, device_name: str) -> dict:
    """One epoch with a plain DataLoader over the files; prints and returns the figures."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from cluster.settings import load_settings
    from train.model import ImageClassifier

    class Files(Dataset):
        def __init__(self, items: list[tuple[Path, int]]):
            self.items = items

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            path, label = self.items[index]
            with Image.open(path) as image:
                image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
            return pixels, label

    torch.set_num_threads(PLAIN_THREADS)
    settings = load_settings()
    hp = settings.train
    classes, files, how = train_split(folder)
    use_cuda = torch.cuda.is_available() if device_name == "auto" else device_name == "cuda"
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(hp.seed)
    model = ImageClassifier(arch, classes, 3, image_size, settings.model.drift_dims).to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    loader = DataLoader(Files(files), batch_size=hp.batch_size, shuffle=True, num_workers=PLAIN_LOADER_WORKERS,
                        drop_last=len(files) > hp.batch_size, pin_memory=use_cuda)
    model.train()
    seen, steps, total_loss = 0, 0, 0.0
    started = time.perf_counter()
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=True).float().div_(255.0)
        yb = yb.to(device, non_blocking=True)
        if use_cuda:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss) * len(yb)  # a sync per step, as rayloop's loop has
        seen, steps = seen + len(yb), steps + 1
        if max_steps and steps >= max_steps:
            break
    elapsed = time.perf_counter() - started
    report = {"images_per_s": seen / max(elapsed, 1e-9), "seconds": elapsed, "seen": seen, "steps": steps,
              "train_images": len(files), "split": how, "loss": total_loss / max(1, seen), "device": device.type,
              "classes": classes}
    print(RESULT_MARK + json.dumps(report), flush=True)
    return report


# ---------------------------------------------------------------- the table


def table(rows: list[dict], args: argparse.Namespace, command: str, load: tuple[float, float]) -> str:
    plain = {r["images"]: r for r in rows if r["target"] == "plain"}
    ours = {r["images"]: r for r in rows if r["target"] == "rayloop"}
    device = next((r.get("device") for r in rows if r.get("device")), "cpu")
    workers = next((r["detail"] for r in ours.values() if r["detail"]), "")
    how = next((r["detail"] for r in plain.values() if r["detail"]), "rayloop's train split")
    cap = f"capped at {args.max_steps} steps" if args.max_steps else "the whole epoch"
    lines = [
        "## Ingest: training on 227-px photo folders, rayloop vs a plain PyTorch DataLoader", "",
        f"Command: `{command}`  ",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / GIB:.0f} GiB RAM, {device}); load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after. Synthetic crack photos (simulation.photos, JPEG, two classes) trained at "
        f"{args.image_size} px, {args.arch}, 1 epoch, {cap}. rayloop: `rayloop train --no-register` in a fresh "
        f"data dir and local Ray{f' ({workers})' if workers else ''}; plain: one process, {PLAIN_THREADS} torch "
        f"threads, DataLoader(num_workers={PLAIN_LOADER_WORKERS}, batch 64, shuffle), same ImageClassifier, AdamW, "
        f"no augmentation, over {how}. Peak memory: the highest MemTotal - MemAvailable during the run minus its "
        "value just before (whole machine, sampled every 0.1 s); anon + shmem: the same for AnonPages + Shmem "
        "(what processes hold, the object store included, without the kernel's estimate of reclaimable cache); "
        "PSS: the peak over the run's own processes (every 2 s). "
        "Wall: the whole command (rayloop's includes Ray start, listing the folder and the test evaluation).", "",
        "| images | target | wall s | train img/s | peak memory GiB | peak anon + shmem GiB | peak PSS GiB "
        "| ratio vs plain |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['images']}" + (f" ({r['train_images']} train)" if r.get("train_images") else "")
        rate = f"{r['img_s']:.0f}" if r["img_s"] else f"failed ({r['rc']}, {r['log']})"
        base = plain.get(r["images"])
        ratio = "1.00" if r["target"] == "plain" else \
            f"{r['img_s'] / base['img_s']:.2f}" if base and base["img_s"] and r["img_s"] else "-"
        lines.append(f"| {size} | {r['target']} | {r['wall']:.1f} | {rate} | {r['peak'] / GIB:.2f} | "
                     f"{r['held'] / GIB:.2f} | {r['pss'] / GIB:.2f} | {ratio} |")
    if ours:
        small, large = ours[min(ours)], ours[max(ours)]
        lines += ["", f"rayloop peak memory {large['images']} / {small['images']} images: "
                      f"x{large['peak'] / max(small['peak'], 1):.2f} (goal <= 1.3); at {small['images']}: "
                      f"{small['peak'] / GIB:.2f} GiB (goal <= 3 GiB for 2,000); anon + shmem "
                      f"x{large['held'] / max(small['held'], 1):.2f}, {small['held'] / GIB:.2f} GiB at "
                      f"{small['images']}."]
        ratios = [f"{n}: x{ours[n]['img_s'] / plain[n]['img_s']:.2f}" for n in sorted(ours)
                  if n in plain and ours[n]["img_s"] and plain[n]["img_s"]]
        if ratios:
            lines.append(f"rayloop / plain train images/s: {', '.join(ratios)} (goal >= 0.9).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,12000,40000", help="images per folder, comma list")
    parser.add_argument("--image-size", type=int, default=128, help="training pixels (data.image_size)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--max-steps", type=int, default=0, help="cap each run's epoch at this many steps")
    parser.add_argument("--train-workers", type=int, default=0, help="rayloop's Ray Train workers (0: settings)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--baseline-only", action="store_true", help="generate and run the plain baseline only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayloop-ingest"))
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--out", default=None, help="results file, - to print only")
    parser.add_argument("--plain-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker, args.image_size, args.arch, args.max_steps, args.device)
        return 0

    command = ".venv/bin/python bench/ingest.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    args.work.mkdir(parents=True, exist_ok=True)
    load_before, rows = os.getloadavg()[0], []
    for images in [2 * (int(n) // 2) for n in args.sizes.split(",")]:  # two classes of n // 2
        folder = photo_folder(args.work, images, args.gen_workers)
        targets = [run_plain] if args.baseline_only else [run_rayloop, run_plain]
        for target in targets:
            row = target(folder, images, args)
            print(f"[ingest] {row['target']} {images}: {json.dumps({k: v for k, v in row.items()}, default=str)}",
                  flush=True)
            rows.append(row)
    section = table(rows, args, command, (load_before, os.getloadavg()[0]))
    out = args.out if args.out is not None else ("-" if args.baseline_only else "bench/RESULTS.md")
    if out != "-":
        write_section("bench/ingest.py", section, Path(out))
    print(section)
    return 0 if all(r["img_s"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
