"""Benchmark: the store (store/store.py) at N prediction rows on SQLite and PostgreSQL, p50/p99 per operation.

    .venv/bin/python bench/store.py [--rows 1000000,10000000] [--backends sqlite,postgresql] [--samples 200]
        [--batch 50] [--image-kib 8] [--writer-rate 1500] [--work /tmp/rayloop-bench-store] [--out -]

Each backend and size: a database of N predictions, filled once and kept (METHOD below says how), then
one Store in this process times each operation (CALLS below): 3 untimed calls, then --samples timed ones.
Goals (the issue): every API read <= 20 ms p99 at 10M rows; feedback <= 50 ms p99 while a writer logs 1,500
predictions/s. The tables go to bench/RESULTS.md, one section per --backends/--rows pair (--out - prints only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]  # bench/store.py is not `store`
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))

from results import RESULTS, write_section  # noqa: E402
from sqlalchemy import create_engine, delete, text  # noqa: E402
from sqlalchemy.schema import CreateTable  # noqa: E402

from store.events import Event  # noqa: E402
from store.schema import AuditRow, FeedbackRow, PredictionRow, make_engine, utcnow  # noqa: E402
from store.store import Store  # noqa: E402

RECIPE = 1  # what a fill writes: bump it when that changes, and kept databases are filled again
STEP, CHUNK = timedelta(milliseconds=10), 50_000  # rows 10 ms apart (100/s); written 50,000 a transaction
LABELLED_EVERY, DRIFT_EVERY = 100, 10_000  # a filled prediction in 100 has feedback; a drift_check per 10,000
SAMPLED_IDS = 1000  # ids at uniformly random positions, looked up by `prediction by id`
END_CURSOR_AT = 60  # the last page's cursor: 60 rows from the oldest, so its page of 50 is full
WARMUP, READ_GOAL_MS, LOADED_FEEDBACK_GOAL_MS = 3, 20.0, 50.0
IDLE_GAP_S, LOADED_GAP_S = (0.06, 0.06), (0.0, 0.02)  # idle: past the writer's gathering window (50 ms)
NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
LABELS, JSON_COLUMNS = ("positive", "negative"), ("probabilities", "features")
METHOD = (
    "Filled straight into the tables, not through log_prediction (executemany on SQLite, COPY on PostgreSQL): N "
    "predictions 10 ms apart up to the fill, each with a blob key (every image is kept by default) and the drift "
    "features the classifier logs; one in 100 labelled (feedback row and audit event); a drift_check event per "
    "10,000. Indexes after the rows, by Store()'s create_schema, then VACUUM on PostgreSQL. Kept between runs; a "
    "run first deletes what earlier runs added, then ANALYZE (store.analyze). One Store in the benchmark's "
    "process (flush_interval_s 0.5, as deployed); PostgreSQL at its default configuration.")
CALLS = {  # operation -> what one timed call runs
    "insert 1": "log_prediction (image) + await recorded([id]), 60 ms after the last: what /v1/predict waits on",
    "insert batch": "log_prediction x batch (images) + await recorded(ids), 60 ms apart: /v1/predict/batch",
    "history page, newest": "list_predictions(50, 0) + history_total(), as /v1/predictions",
    "history page, middle": "list_predictions(50, before=cursor of row N/2) + history_total()",
    "history page, oldest": "list_predictions(50, before=cursor 60 rows from the oldest) + history_total()",
    "history_total alone": "history_total(): a count bounded at 10,001 ids, else the planner's estimate",
    "prediction by id": "get_prediction(id, wait_s=0), ids at random positions",
    "feedback": "add_feedback(id, label) on a prediction logged above (with its image)",
    "erasure": "erase_feedback(feedback_id) of that feedback (deletes the image file too)",
    "latest drift": 'list_audit(1, 0, "drift_check")',
}


# ---------------------------------------------------------------- filling


def prediction_fields(rng: random.Random) -> dict:
    """model_version, label, confidence, probabilities and drift features, shaped as the classifier logs them."""
    confidence, label = round(0.5 + rng.random() / 2, 5), rng.randrange(2)
    features = {"confidence": confidence, "predicted_class": LABELS[label], "brightness": round(rng.random(), 5),
                "contrast": round(rng.random(), 5)} | {f"emb_{j}": round(rng.gauss(0, 1), 5) for j in range(8)}
    return {"model_version": "1", "label": LABELS[label], "confidence": confidence,
            "probabilities": {LABELS[label]: confidence, LABELS[1 - label]: round(1 - confidence, 5)},
            "features": features}


FIELDS = [prediction_fields(random.Random(k)) for k in range(997)]


def chunk_rows(start: int, count: int, base: datetime, rng: random.Random) -> tuple[list, list, list]:
    """Prediction, feedback and audit rows of positions start..start+count (0: the oldest)."""
    predictions, feedback, audit = [], [], []
    for i in range(start, start + count):  # fields from a pool: making them per row took 3/4 of the fill
        at, fields = base + i * STEP, FIELDS[i % len(FIELDS)]
        row = {"id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "created_at": at,
               "blob_key": f"{rng.getrandbits(256):064x}", **fields}
        predictions.append(row)
        if i % LABELLED_EVERY == 0:
            fid, when = str(uuid.UUID(int=rng.getrandbits(128), version=4)), at + STEP / 2
            feedback.append({"id": fid, "prediction_id": row["id"], "label": row["label"], "created_at": when,
                             "source": "api"})
            audit.append({"id": str(uuid.uuid4()), "at": when, "actor": "anonymous", "event": str(Event.FEEDBACK),
                          "details": {"feedback_id": fid, "prediction_id": row["id"], "label": row["label"],
                                      "source": "api"}})
        if i % DRIFT_EVERY == 0:
            audit.append({"id": str(uuid.uuid4()), "at": at, "actor": "monitor", "event": str(Event.DRIFT_CHECK),
                          "details": {"drifted": False, "share": 0.0, "rows": 1000}})
    return predictions, feedback, audit


def write_predictions(connection, rows: list[dict]) -> None:
    """Through the driver, each pooled JSON dumped once (SQLAlchemy's bind processing was most of the fill):
    COPY on PostgreSQL; executemany on SQLite, created_at as SQLAlchemy's own DateTime writes it."""
    columns = [c.name for c in PredictionRow.__table__.columns]
    dumped = {id(f[c]): json.dumps(f[c]) for f in FIELDS for c in JSON_COLUMNS}
    values = [[dumped[id(r[c])] if c in JSON_COLUMNS else r[c] for c in columns] for r in rows]
    if connection.dialect.name == "postgresql":
        with connection.connection.driver_connection.cursor() as cursor, \
                cursor.copy(f"COPY predictions ({', '.join(columns)}) FROM STDIN") as copy:
            for row in values:
                copy.write_row(row)
        return
    written = PredictionRow.created_at.type.dialect_impl(connection.dialect).bind_processor(connection.dialect)
    at = columns.index("created_at")
    for row in values:
        row[at] = written(row[at])
    connection.exec_driver_sql(f"INSERT INTO predictions ({', '.join(columns)}) VALUES "
                               f"({', '.join('?' * len(columns))})", [tuple(row) for row in values])


def fill(url: str, rows: int, label: str) -> dict:
    """Create the tables bare, write the rows, then let Store() build its indexes; the stamp to keep."""
    engine = make_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    with engine.begin() as connection:
        for table in (PredictionRow.__table__, FeedbackRow.__table__, AuditRow.__table__):
            connection.execute(CreateTable(table))
    rng, base = random.Random(rows), (utcnow() - rows * STEP).replace(microsecond=0)
    sampled = set(random.Random(1).sample(range(rows), min(SAMPLED_IDS, rows)))
    marks = {rows // 2: "middle", END_CURSOR_AT: "oldest"}
    stamp: dict = {"recipe": RECIPE, "rows": rows, "fill_end": (base + rows * STEP).isoformat(), "ids": [],
                   "marks": {}}
    started = time.perf_counter()
    with engine.connect() as connection:
        if sqlite:  # the primary key's random inserts stay in memory; a fill that dies leaves no stamp anyway
            connection.exec_driver_sql("PRAGMA cache_size=-1048576")
            connection.exec_driver_sql("PRAGMA synchronous=OFF")
        for start in range(0, rows, CHUNK):
            predictions, feedback, audit = chunk_rows(start, min(CHUNK, rows - start), base, rng)
            for i, row in enumerate(predictions, start):
                if i in sampled:
                    stamp["ids"].append(row["id"])
                if i in marks:
                    stamp["marks"][marks[i]] = [row["created_at"].isoformat(), row["id"]]
            write_predictions(connection, predictions)
            for table, extra in ((FeedbackRow.__table__, feedback), (AuditRow.__table__, audit)):
                if extra:  # an empty list would insert one row of defaults
                    connection.execute(table.insert(), extra)
            connection.commit()
            done, elapsed = start + len(predictions), time.perf_counter() - started
            print(f"[store] {label}: {done:,}/{rows:,} rows, {done / elapsed:,.0f} rows/s, "
                  f"eta {(rows - done) * elapsed / done:.0f}s", flush=True)
    stamp["fill_s"], started = time.perf_counter() - started, time.perf_counter()  # then the indexes
    with tempfile.TemporaryDirectory() as blobs:
        Store(url, blobs).close()  # create_schema: every index it makes
    if not sqlite:  # what autovacuum would do soon after a bulk load
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM predictions")
    engine.dispose()
    stamp["index_s"] = time.perf_counter() - started
    print(f"[store] {label}: {rows:,} rows in {stamp['fill_s']:.1f}s ({100_000 * stamp['fill_s'] / rows:.1f}s "
          f"per 100k), indexes{'' if sqlite else ' and VACUUM'} {stamp['index_s']:.1f}s", flush=True)
    return stamp


def kept_database(backend: str, rows: int, work: Path, server: str | None) -> tuple[str, dict]:
    """(URL, stamp) of a filled database (SQLite: a file; PostgreSQL: rows_N on the kept server), filled now
    unless one this RECIPE filled is kept."""
    name, stamp_path = f"{backend}-{rows}", work / "stamps" / f"{backend}-{rows}.json"
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    if backend == "sqlite":
        url = f"sqlite:///{work / name}.db"
        kept = stamp.get("recipe") == RECIPE and (work / f"{name}.db").is_file()
        for path in [] if kept else work.glob(f"{name}.db*"):
            path.unlink()
    else:
        url = server.replace("/postgres?", f"/rows_{rows}?", 1)
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            kept = stamp.get("recipe") == RECIPE and bool(connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": f"rows_{rows}"}))
            if not kept:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS rows_{rows}")
                connection.exec_driver_sql(f"CREATE DATABASE rows_{rows}")
        admin.dispose()
    if kept:
        return url, stamp | {"cached": True}
    stamp_path.unlink(missing_ok=True)
    stamp_path.write_text(json.dumps(stamp := fill(url, rows, name)))  # only once filled
    return url, stamp


@contextlib.contextmanager
def postgres_server(root: Path):
    """A PostgreSQL server as tests/support/postgres.py starts one, but on a data dir kept under `root` (the
    filled databases outlive the run); yields the URL of its `postgres` database."""
    bin_dir = Path(shutil.which("pg_ctl") or "/usr/lib/postgresql/15/bin/pg_ctl").resolve().parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    data, port = root / "data", 5432  # no TCP listener: the port only names the socket in `root`
    pg_ctl = [*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data)]
    if not (data / "PG_VERSION").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if as_postgres:
            shutil.chown(root, "postgres")
        subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "rayloop", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True, timeout=120)  # one a killed run left
    subprocess.run([*pg_ctl, "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses='' -c max_connections=200", "start"],
                   check=True, capture_output=True, timeout=300)
    try:
        yield f"postgresql+psycopg://rayloop@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "stop"], capture_output=True, timeout=300)


def reset(store: Store, stamp: dict) -> None:
    """Delete what earlier runs added (everything newer than the fill), then refresh the planner's statistics."""
    cut = datetime.fromisoformat(stamp["fill_end"])
    with store.engine.begin() as connection:
        connection.execute(delete(FeedbackRow).where(FeedbackRow.created_at > cut))
        connection.execute(delete(PredictionRow).where(PredictionRow.created_at > cut))
        connection.execute(delete(AuditRow).where(AuditRow.at > cut))
    store.analyze()


def timed(call, samples: int, prepare=lambda j: (), gap_s: tuple[float, float] = (0.0, 0.0)) -> list[float]:
    """Milliseconds of `samples` calls of call(*prepare(j)) after WARMUP untimed ones; prepare and gap_s are not."""
    ms = []
    for j in range(WARMUP + samples):
        args = prepare(j)
        time.sleep(random.uniform(*gap_s))
        started = time.perf_counter()
        call(*args)
        if j >= WARMUP:
            ms.append(1000 * (time.perf_counter() - started))
    return ms


def pct(ms: list[float], q: float) -> float:
    return sorted(ms)[max(0, math.ceil(q * len(ms)) - 1)]  # nearest rank


def log_steadily(store: Store, rate: float, image_bytes: int, stop: threading.Event, counts: dict) -> None:
    """log_prediction at `rate` per second into the measured Store until `stop`, as a loaded replica's requests do."""
    rng, started = random.Random(2), time.monotonic()
    while not stop.wait(0.005):
        for _ in range(int((time.monotonic() - started) * rate) - counts["logged"]):
            store.log_prediction(**prediction_fields(rng), image=os.urandom(image_bytes) or None)
            counts["logged"] += 1
    counts["elapsed"] = time.monotonic() - started


def measure(store: Store, stamp: dict, args: argparse.Namespace, label: str) -> tuple[list[dict], str]:
    """(one result per operation, a note on the loaded phase)."""
    results, rng, n, image_bytes, logged_ids = [], random.Random(3), args.samples, args.image_kib * 1024, []
    runner = asyncio.Runner()  # one event loop for every `recorded` wait

    def add(op: str, ms: list[float], goal: float | None = None, loaded: bool = False) -> None:
        op, p50, p99 = op + (f", writer at {args.writer_rate:,}/s" if loaded else ""), pct(ms, 0.5), pct(ms, 0.99)
        results.append({"op": op, "p50": p50, "p99": p99, "goal": goal})
        print(f"[store] {label}: {op}: p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)

    def logged(batch: list[tuple[dict, bytes | None]]) -> None:
        ids = [store.log_prediction(**fields, image=image) for fields, image in batch]
        runner.run(store.recorded(ids))
        logged_ids.extend(ids)

    def batch(size: int) -> tuple[list]:  # made before the clock starts
        return ([(prediction_fields(rng), os.urandom(image_bytes) or None) for _ in range(size)],)

    for size, op in ((1, "insert 1"), (args.batch, f"insert batch of {args.batch}")):
        add(op, timed(logged, n, lambda j, size=size: batch(size), IDLE_GAP_S))

    def page(before=None):
        return store.list_predictions(50, 0, before), store.history_total()

    marks = {k: (datetime.fromisoformat(at), pid) for k, (at, pid) in stamp["marks"].items()}
    for where, before in (("newest", None), ("middle", marks["middle"]), ("oldest", marks["oldest"])):
        add(f"history page, {where}", timed(page, n, lambda j, b=before: (b,)), READ_GOAL_MS)
    add("history_total alone", timed(store.history_total, n))
    ids, targets = stamp["ids"], logged_ids[::-1]  # targets: logged above, with their images
    add("prediction by id", timed(lambda pid: store.get_prediction(pid, wait_s=0), n,
                                  lambda j: (ids[j % len(ids)],)), READ_GOAL_MS)

    def feedback_then_erasure(loaded: bool) -> None:
        made, gap, goal = [], LOADED_GAP_S if loaded else (0.0, 0.0), LOADED_FEEDBACK_GOAL_MS if loaded else None
        add("feedback", timed(lambda pid: made.append(store.add_feedback(pid, "positive")), n,
                              lambda j: (targets[(j + loaded * (n + WARMUP)) % len(targets)],), gap), goal, loaded)
        add("erasure", timed(store.erase_feedback, n, lambda j: (made[j],), gap), loaded=loaded)

    feedback_then_erasure(loaded=False)
    for _ in range(20):
        store.audit("monitor", Event.DRIFT_CHECK, {"drifted": False, "share": 0.0, "rows": 1000})
    add("latest drift", timed(lambda: store.list_audit(1, 0, Event.DRIFT_CHECK), n), READ_GOAL_MS)

    stop, counts = threading.Event(), {"logged": 0, "elapsed": 0.0}
    writer = threading.Thread(target=log_steadily, args=(store, args.writer_rate, image_bytes, stop, counts))
    writer.start()
    time.sleep(1.0)  # the writer in its stride first
    add("insert 1", timed(logged, n, lambda j: batch(1), LOADED_GAP_S), loaded=True)
    feedback_then_erasure(loaded=True)
    add("history page, newest", timed(page, n, gap_s=LOADED_GAP_S), loaded=True)
    stop.set()
    writer.join()
    runner.close()
    started, drained = time.perf_counter(), store.flush(timeout=60)
    return results, (f"Writer thread: {counts['logged']:,} predictions in {counts['elapsed']:.1f}s "
                     f"({counts['logged'] / counts['elapsed']:,.0f}/s); once it stopped, the queue "
                     f"{'drained' if drained else 'had NOT drained'} in {time.perf_counter() - started:.2f}s.")


def run_one(backend: str, rows: int, url: str, stamp: dict, args: argparse.Namespace) -> dict:
    blobs = Path(tempfile.mkdtemp(prefix="blobs-", dir=args.work))
    store = Store(url, blobs, flush_interval_s=0.5)  # create_schema: every index it makes is there
    try:
        started = time.perf_counter()
        reset(store, stamp)
        print(f"[store] {backend}-{rows}: reset and ANALYZE in {time.perf_counter() - started:.1f}s", flush=True)
        results, note = measure(store, stamp, args, f"{backend}-{rows}")
        with store.engine.connect() as connection:
            size = os.path.getsize(url.removeprefix("sqlite:///")) if backend == "sqlite" else \
                connection.scalar(text("SELECT pg_database_size(current_database())"))
        version = ".".join(map(str, store.engine.dialect.server_version_info))
    finally:
        store.close()
        shutil.rmtree(blobs, ignore_errors=True)
    return {"name": f"{NAMES[backend]} {version}, {rows:,} rows", "rows": rows, "stamp": stamp, "results": results,
            "note": note, "size": size}


def section(runs: list[dict], args: argparse.Namespace, command: str, load: tuple[float, float]) -> str:
    lines = ["## Store at scale (bench/store.py)", "", f"Command: `{command}`  ",
             f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} ({os.cpu_count()} "
             f"cores); load average {load[0]:.1f} before, {load[1]:.1f} after. {METHOD}", "",
             f"What one timed call runs ({args.samples} samples each, images of {args.image_kib} KiB; the rows "
             f"marked with a writer run while a thread logs {args.writer_rate:,} predictions/s into the same Store, "
             "calls 0-20 ms apart):", "", *[f"- {op}: {calls}" for op, calls in CALLS.items()]]
    for run in runs:
        stamp, kept = run["stamp"], "kept from an earlier run, " if run["stamp"].get("cached") else ""
        lines += ["", f"### {run['name']}", "",
                  f"Database {run['size'] / 1024 ** 3:.2f} GiB ({kept}filled in {stamp['fill_s']:.0f}s, "
                  f"{100_000 * stamp['fill_s'] / run['rows']:.1f}s per 100k rows; indexes "
                  f"{stamp['index_s']:.0f}s after). {run['note']}", "",
                  "| operation | p50 ms | p99 ms | goal | met? |", "|---|---:|---:|---|---|"]
        for r in run["results"]:
            goal = f"p99 <= {r['goal']:.0f} ms" if r["goal"] else "-"
            met = "-" if not r["goal"] else "yes" if r["p99"] <= r["goal"] else "**no**"
            lines.append(f"| {r['op']} | {r['p50']:.2f} | {r['p99']:.2f} | {goal} | {met} |")
        missed = ", ".join(r["op"] for r in run["results"] if r["goal"] and r["p99"] > r["goal"])
        lines += ["", f"Goals met: {'not ' + missed if missed else 'all'}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,10000000", help="prediction rows, comma list")
    parser.add_argument("--backends", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--samples", type=int, default=200, help="timed calls per operation")
    parser.add_argument("--batch", type=int, default=50, help="predictions per `insert batch`")
    parser.add_argument("--image-kib", type=int, default=8, help="image bytes per logged prediction (0: none)")
    parser.add_argument("--writer-rate", type=int, default=1500, help="predictions/s logged during the loaded rows")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rayloop-bench-store"), help="kept databases")
    parser.add_argument("--out", default=str(RESULTS), help="results file, - to print only")
    args = parser.parse_args()
    command = ".venv/bin/python bench/store.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    backends, sizes = args.backends.split(","), [int(n) for n in args.rows.split(",")]
    if set(backends) - set(NAMES) or min(sizes) < 2 * END_CURSOR_AT:
        parser.error(f"--backends: sqlite and/or postgresql; --rows: at least {2 * END_CURSOR_AT} each")
    (args.work / "stamps").mkdir(parents=True, exist_ok=True)
    load_before, runs = os.getloadavg()[0], []
    for backend in backends:
        with postgres_server(args.work / "postgresql") if backend == "postgresql" else \
                contextlib.nullcontext() as server:
            for rows in sizes:
                runs.append(run_one(backend, rows, *kept_database(backend, rows, args.work, server), args))
    body = section(runs, args, command, (load_before, os.getloadavg()[0]))
    if args.out != "-":
        write_section(f"bench/store.py:{args.backends}:{args.rows}", body, Path(args.out))
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
