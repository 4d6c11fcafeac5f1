"""Benchmark: labels needed to recover accuracy on a shift, labelling in a queue order's picks or a random sample.

    .venv/bin/python bench/label_queue.py                 # 5 shifts x 5 budgets x 10 strategies x 3 runs
    .venv/bin/python bench/label_queue.py --strategies 'random,least margin,far from its class'  # some of them
    .venv/bin/python bench/label_queue.py --shifts rotate:90 --budgets 10,40 --runs 1 --strategies random,k-center \
        --out /tmp/r.md --json /tmp/r.json
    .venv/bin/python bench/label_queue.py --report-only   # bench/RESULTS.md from bench/label_queue_results.json

Issue 17 item 3's figure: with the labelling queue (store/label_queue.py), half as many labels as a random sample to
recover accuracy on a shift. Offline and in one process: bench/loop.py runs the whole loop (rayloop up, HTTP
traffic, drift, a Tune retrain, the gate, a rollout) at 5-9 minutes a scenario on 2 cores, too slow for a sweep of
label budgets. What is the product's own code here: the data (prepared_or_new, the embedded digits), the model and
its initialisation (train.train.build_model), its drift axes and drift reference (train.pipeline.finalize on the
reference images: the orders by distance from the reference read its emb_ features), the drift features a replica
logs per prediction (model.infer, train.features.feature_rows), the shifts (simulation.shifts), the queue's ranking
(store.label_queue.rank, closest_first; simulation.label_orders builds the other orders on them, over Candidates as
the store holds predictions), the retrain's mix of feedback with base data (tune.retrain.feedback_repeats,
mixed_rows), its focused trial's hyperparameters (tune.plan.focused_space, tune.epochs), the training loop's parts
(AdamW over parameter_groups, one-cycle, random_shift augmentation, epoch_seed) and evaluation (train.evaluate).
What is not: the loop that runs those parts. The product trains only through Ray Train
(train.train.train_loop_per_worker reads its batches from Ray Data shards), and this benchmark starts no Ray;
`train` below is that loop for one worker with the batches from memory.

Setup, as bench/loop.py's: a champion trained on RAYLOOP_DATA_LIMIT=3000 digits (params.yaml otherwise). The
2,000 digits it never saw give a pool of 1,500 that users sent, shifted, and 500 shifted evaluation digits never
labelled; clean accuracy is the prepared test split's (the split the gate holds a challenger to). Per shift and
budget k: each order's first k picks (simulation.label_orders.ORDERS; one order, 3 fine-tune seeds) and 3 random
samples of k (each its own seed), each fine-tuned from the champion on its k true labels mixed with the base
training split.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/ must not shadow packages
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))

from cluster import environment  # noqa: E402

environment.apply()  # before ray is imported (tune.retrain imports it; nothing here starts it)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from results import write_section  # noqa: E402

from cluster.settings import Settings, load_settings  # noqa: E402
from simulation import label_budget, label_orders  # noqa: E402
from simulation.bench_loop import parse_scenarios  # noqa: E402
from simulation.label_orders import Reference  # noqa: E402
from simulation.shifts import shift_images  # noqa: E402
from train.data import SPLITS, load_mnist, prepared_or_new  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.features import feature_rows  # noqa: E402
from train.model import ImageClassifier, parameter_groups  # noqa: E402
from train.pipeline import finalize, reference_batches  # noqa: E402
from train.train import TrainConfig, build_model, epoch_seed, load_model, random_shift, save_model  # noqa: E402
from train.transforms import to_tensor  # noqa: E402
from tune.plan import focused_space  # noqa: E402
from tune.retrain import feedback_repeats, mixed_rows  # noqa: E402

RESULTS_JSON = REPO / "bench" / "label_queue_results.json"
Arrays = tuple[np.ndarray, np.ndarray]


def log(message: str) -> None:
    print(message, flush=True)


def train(model: ImageClassifier, base: Arrays, feedback: Arrays, hp: TrainConfig, *, share: float,
          max_steps: int, mix_seed: int) -> ImageClassifier:
    """train_loop_per_worker for one worker, in this process: the retrain's stream (base rows and each feedback
    row `repeat` times, one seeded shuffled order, its first max_steps x batch rows when capped as
    train.max_steps caps it), reshuffled every epoch (the workers' local shuffle buffer holds a capped epoch
    whole), AdamW + one-cycle, random shifts."""
    (base_x, base_y), (feedback_x, feedback_y) = base, feedback
    images = to_tensor(np.concatenate([base_x, feedback_x]))
    labels = torch.from_numpy(np.concatenate([base_y, feedback_y]).astype(np.int64))
    base_rows = pd.DataFrame({"path": np.arange(len(base_y)), "label": base_y})
    feedback_rows = pd.DataFrame({"path": len(base_y) + np.arange(len(feedback_y)), "label": feedback_y})
    repeat = feedback_repeats(len(base_rows), len(feedback_rows), share)
    rows = mixed_rows(base_rows, feedback_rows, repeat, mix_seed).iloc[:max_steps * hp.batch_size or None]
    index = torch.from_numpy(rows["path"].to_numpy(np.int64))
    steps = max(1, len(index) // hp.batch_size)  # drop_last, as the workers do when there is more than a batch
    optimizer = torch.optim.AdamW(parameter_groups(model, hp.lr), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                    epochs=hp.epochs, steps_per_epoch=steps)
    max_shift = max(1, model.image_size // 14)
    for epoch in range(hp.epochs):
        torch.manual_seed(epoch_seed(hp.seed, 0, epoch))
        model.train()
        order = index[torch.randperm(len(index))]
        for step in range(steps):
            batch = order[step * hp.batch_size:(step + 1) * hp.batch_size]
            xb = random_shift(images[batch], max_shift) if hp.augment else images[batch]
            loss = torch.nn.functional.cross_entropy(model(xb), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def bench_settings(data_dir: Path, data_limit: int) -> Settings:
    """params.yaml's settings but for the data dir and limit: none of the caller's RAYLOOP_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYLOOP_")}
    env.update(RAYLOOP_DATA_DIR=str(data_dir), RAYLOOP_DATA_LIMIT=str(data_limit),
               RAYLOOP_PARAMS=str(REPO / "params.yaml"))
    return load_settings(env)


def unseen_sets(seen: set[bytes], pool_size: int, eval_size: int) -> tuple[Arrays, Arrays]:
    """(pool, shifted evaluation digits): disjoint, seeded, from the digits the champion never saw."""
    images, labels, _ = load_mnist()
    unseen = np.array([i for i in range(len(images)) if images[i].tobytes() not in seen], dtype=np.int64)
    if len(unseen) < pool_size + eval_size:
        raise SystemExit(f"only {len(unseen)} unseen digits for a pool of {pool_size} and {eval_size} to evaluate: "
                         "lower --data-limit or the sizes")
    order = np.random.default_rng(0).permutation(unseen)
    pool, held = order[:pool_size], order[pool_size:pool_size + eval_size]
    return (images[pool], labels[pool]), (images[held], labels[held])


def champion_model(settings: Settings, data, base: Arrays, saved: str) -> tuple[ImageClassifier, Reference]:
    """The first champion, as `rayloop train` trains it (train.* settings) and then fits its drift axes on the
    reference images (train.pipeline.finalize over reference_batches), and where those images lie along the
    axes (the drift reference's emb_ features, as logged with the model); kept in `saved` when given."""
    if saved and (Path(saved) / "model.json").is_file():
        log(f"[label-queue] champion loaded from {saved}")
        model = load_model(Path(saved))
        return model, reference_statistics(finalize(model, reference_batches(settings, data)))
    started = time.perf_counter()
    hp = TrainConfig.from_settings(settings)
    model = train(build_model(settings, data), base, (base[0][:0], base[1][:0]), hp, share=settings.tune.feedback_share,
                  max_steps=settings.train.max_steps, mix_seed=settings.tune.seed)
    reference = reference_statistics(finalize(model, reference_batches(settings, data)))
    log(f"[label-queue] champion trained: {hp.epochs} epochs on {len(base[1])} digits, "
        f"{time.perf_counter() - started:.0f} s; drift axes fitted on its reference images")
    if saved:
        save_model(model, Path(saved))
    return model, reference


def reference_statistics(table: pd.DataFrame) -> Reference:
    rows = table.to_dict("records")
    return label_orders.reference_of(np.array([label_orders.embedding_of(r) for r in rows]),
                                     [str(r["predicted_class"]) for r in rows])


def fine_tune_config(settings: Settings, seed: int) -> TrainConfig:
    """The focused trial a retrain runs on a clear shift (tune/plan.py), from the champion's weights."""
    point = focused_space(settings.tune)
    return TrainConfig(epochs=settings.tune.epochs, batch_size=int(point["batch_size"]), lr=float(point["lr"]),
                       weight_decay=float(point["weight_decay"]), augment=True, seed=seed)


def accuracy(model: ImageClassifier, sets: Arrays) -> float:
    return evaluate(model, *sets).accuracy


def served(model: ImageClassifier, images: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, list[dict]]:
    """(probabilities, drift features) per image, as a serving replica computes and logs them (serve.classifier.run:
    model.infer, then train.features.feature_rows)."""
    probabilities, features = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            outputs = model.eval().infer(to_tensor(images[start:start + batch_size]))
            probabilities.append(outputs["probabilities"].float().numpy())
            features += feature_rows(outputs, model.classes)
    return np.concatenate(probabilities), features


def prepare_shift(name: str, kind: str, severity: float, champion: ImageClassifier, pool: Arrays,
                  shifted_eval: Arrays, clean: Arrays, budgets: list[int], runs: int, strategies: list[str],
                  reference: Reference) -> tuple[dict, list[dict]]:
    """One shift's row so far (the champion on it, what each strategy picks) and its fine-tunes to run: one job
    per strategy and run, each a fine-tune per budget on the picked images with their true labels."""
    pool_x = shift_images(pool[0], kind, severity, seed=1)
    eval_set = (shift_images(shifted_eval[0], kind, severity, seed=2), shifted_eval[1])
    probabilities, features = served(champion, pool_x)
    predicted = probabilities.argmax(1)
    candidates = label_budget.candidates(probabilities, features, champion.classes)
    before = {"shifted": accuracy(champion, eval_set), "clean": accuracy(champion, clean),
              "pool": float((predicted == pool[1]).mean())}
    wrong = predicted != pool[1]
    margins = np.array([c.margin for c in candidates])
    confidently_wrong = float((margins[wrong] > 0.5).mean()) if wrong.any() else 0.0
    log(f"[label-queue] {name}: champion {before['shifted']:.3f} on the shift, {before['clean']:.3f} clean; "
        f"{confidently_wrong:.0%} of its mistakes on the pool have a margin above 0.5")
    row = {"shift": name, "budgets": budgets, "before": before, "confidently_wrong": confidently_wrong,
           **{part: {s: [] for s in strategies} for part in ("shifted", "clean", "picked_wrong", "picked_classes")}}
    jobs = []
    for run in range(runs):
        for strategy in strategies:
            picks = [label_budget.picks(candidates, strategy, b, reference) if strategy != "random"
                     else label_budget.random_picks(len(pool[1]), b, seed=run) for b in budgets]
            row["picked_wrong"][strategy].append([label_budget.picked_wrong(p, predicted, pool[1]) for p in picks])
            row["picked_classes"][strategy].append([len(set(pool[1][p].tolist())) for p in picks])
            jobs.append({"shift": name, "strategy": strategy, "run": run, "eval": eval_set,
                         "feedback": [(pool_x[p], pool[1][p]) for p in picks]})
    return row, jobs


def fine_tune_curve(champion: ImageClassifier, base: Arrays, clean: Arrays, job: dict, settings: Settings,
                    max_steps: int) -> tuple[list[float], list[float]]:
    """A job's fine-tunes from the champion, one per budget: (accuracies on the shift, clean accuracies)."""
    shifted, clean_curve = [], []
    for feedback in job["feedback"]:
        model = train(copy.deepcopy(champion), base, feedback, fine_tune_config(settings, seed=job["run"]),
                      share=settings.tune.feedback_share, max_steps=max_steps, mix_seed=settings.tune.seed)
        shifted.append(accuracy(model, job["eval"]))
        clean_curve.append(accuracy(model, clean))
    return shifted, clean_curve


def run_jobs(jobs: list[dict], champion: ImageClassifier, base: Arrays, clean: Arrays, settings: Settings,
             args) -> list[tuple[list[float], list[float]]]:
    """Every job's curves, in the jobs' order: in `args.workers` processes (spawned: each imports torch afresh,
    with `args.threads` threads), or here with one worker."""
    call = partial(fine_tune_curve, champion, base, clean, settings=settings, max_steps=args.max_steps)
    done = 0

    def progress(job: dict, curves: tuple[list[float], list[float]]) -> None:
        nonlocal done
        done += 1
        log(f"[label-queue]   {done}/{len(jobs)} {job['shift']} {job['strategy']} run {job['run']}: on the shift "
            + " ".join(f"{len(y)}:{a:.3f}" for (_, y), a in zip(job["feedback"], curves[0]))
            + f"; clean min {min(curves[1]):.3f}")

    if args.workers <= 1:
        results = []
        for job in jobs:
            results.append(call(job))
            progress(job, results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(args.threads,)) as pool:
        futures = {pool.submit(call, job): i for i, job in enumerate(jobs)}
        results = [None] * len(jobs)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            progress(jobs[futures[future]], results[futures[future]])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shifts", default=label_budget.SHIFTS, help="shift:severity, comma separated")
    parser.add_argument("--budgets", default=",".join(map(str, label_budget.BUDGETS)))
    parser.add_argument("--strategies", default=",".join(["random", *label_orders.ORDERS]),
                        help="comma separated, random among them: " + ", ".join(label_orders.ORDERS))
    parser.add_argument("--runs", type=int, default=3, help="fine-tune seeds for each order, random samples")
    parser.add_argument("--max-steps", type=int, default=10,
                        help="batches per fine-tune epoch (train.max_steps; 0: the whole stream, ~53)")
    parser.add_argument("--data-limit", type=int, default=3000)
    parser.add_argument("--pool", type=int, default=1500)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2, help="processes running the fine-tunes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--champion", default="", help="a folder: load the champion there, or train and save it")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--json", default=str(RESULTS_JSON))
    parser.add_argument("--report-only", action="store_true", help="the RESULTS section from --json, no run")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads(Path(args.json).read_text())
        write_section("bench/label_queue.py", label_budget.report(saved), Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-label-queue-") as work:
        settings = bench_settings(Path(work) / "data", args.data_limit)
        data = prepared_or_new(settings.data, settings.prepared_dir)
        base, clean = data.split("train"), data.split("test")
        seen = {image.tobytes() for split in SPLITS for image in data.split(split)[0]}
        pool, shifted_eval = unseen_sets(seen, args.pool, args.eval)
        champion, reference = champion_model(settings, data, base, args.champion)
        budgets = [int(b) for b in args.budgets.split(",")]
        strategies = args.strategies.split(",")
        if "random" not in strategies or not set(strategies) <= {"random", *label_orders.ORDERS}:
            raise SystemExit(f"--strategies {args.strategies}: random and any of {', '.join(label_orders.ORDERS)}")
        prepared = [prepare_shift(s.name, s.shift, s.severity, champion, pool, shifted_eval, clean, budgets, args.runs,
                                  strategies, reference) for s in parse_scenarios(args.shifts) if not s.trap]
        jobs = [job for _, shift_jobs in prepared for job in shift_jobs]
        rows = {row["shift"]: row for row, _ in prepared}
        for job, (shifted, clean_curve) in zip(jobs, run_jobs(jobs, champion, base, clean, settings, args)):
            rows[job["shift"]]["shifted"][job["strategy"]].append(shifted)
            rows[job["shift"]]["clean"][job["strategy"]].append(clean_curve)
        rows = list(rows.values())
        for row in rows:
            row["summary"] = label_budget.summary(budgets, row["before"]["shifted"], row["shifted"])
    seconds = time.perf_counter() - started
    hp = fine_tune_config(settings, 0)
    meta = {
        "command": ".venv/bin/python bench/label_queue.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:]),
        "measured": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.node()} ({os.cpu_count()} cores, CPU only)",
        "threads": args.threads, "workers": args.workers, "queue_order": label_orders.QUEUE_ORDER,
        "seconds": seconds, "settings": {"data_limit": args.data_limit, "pool": args.pool, "eval": args.eval,
                                         "clean_eval": len(clean[1]), "runs": args.runs, "max_steps": args.max_steps,
                                         "fine_tune": {"epochs": hp.epochs, "batch_size": hp.batch_size, "lr": hp.lr,
                                                       "weight_decay": hp.weight_decay,
                                                       "feedback_share": settings.tune.feedback_share}},
        "notes": notes(args, hp, settings),
    }
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else None
    results = {"meta": meta, "rows": rows, "earlier": label_budget.kept_runs(previous, strategies)}
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    section = label_budget.report(results)
    write_section("bench/label_queue.py", section, Path(args.out))
    print(section)
    return 0


def notes(args, hp: TrainConfig, settings: Settings) -> list[str]:
    """What the figures mean and where they stop."""
    return [
        f"- Labels needed: the smallest budget whose mean accuracy on the shift reaches the target, the champion's "
        f"accuracy plus {label_budget.RECOVERY_SHARE:.0%} of the gain the random sample made at the largest budget; "
        "interpolated in log2(budget) between grid points; `<= k` reached at the smallest budget, `> k` never. "
        "Means over the runs: each order's picks are one order (the champion's predictions), its runs differ in the "
        "fine-tune's seed; each random run draws its own sample and seed. Budgets are nested.",
        "- The orders (simulation/label_orders.py, over store.label_queue's Candidates): `least margin` the queue's "
        "order (least margin first, one predicted class after another); `k-center` the least-margin image, then each "
        "next the farthest in embedding space from every one picked (greedy k-center); `uncertain k-center` k-center "
        "over the less sure half by margin, then over the rest; `margin or chance` every other pick the next "
        "least-margin one, the others in a fixed random order (a hash of the prediction id); `k-center or chance` "
        "the same with k-center's picks; `farthest from reference` the farthest from the champion's reference images "
        "first (Mahalanobis distance from their mean, their covariance: the drift reference's emb_ features as "
        "logged with the model), the closer call first among equals; `far by class` that order one predicted class "
        "after another; `far from its class` farthest from the reference images the champion gave the same class "
        "(their mean, the covariance pooled within the classes), one class after another; `far and unsure` the "
        "least product of the rank by that distance and the rank by margin, one class after another. The embedding "
        "is what a replica logs per prediction: the drift features emb_0..emb_N (train.features.feature_rows) along "
        "the champion's drift axes, fitted on its reference images by train.pipeline.finalize as `rayloop train` "
        "fits them.",
        f"- Each fine-tune: the retrain's focused trial (tune/plan.py: lr {hp.lr:.2g}, weight decay {hp.weight_decay}, "
        f"batch {hp.batch_size}, {hp.epochs} epochs, from the champion's weights), feedback "
        f"{settings.tune.feedback_share:.0%} of the stream, each epoch capped at {args.max_steps} batches as "
        "train.max_steps caps one (the loop benchmark's retrains ran uncapped, about 53 batches an epoch), to fit "
        "the sweep on 2 cores. Every fine-tune sees the same number of images whatever the budget.",
        "- All k labels are trained on. A retrain in the product keeps 25% of them for the gate's holdout and 20% "
        "for validation (tune.feedback_*_fraction), so the loop needs about 1.8x these counts for the same "
        "training labels; the ratio between the strategies is what this measures.",
        f"- The pool is {args.pool} digits the champion never saw, all shifted: the whole pool is the drift episode, "
        "so each order is its within-episode order. "
        f"Shifted evaluation: {args.eval} other unseen digits, shifted, never labelled.",
    ]


if __name__ == "__main__":
    sys.exit(main())
