"""bench/store.py: the database it fills reads back like logged predictions, is kept between runs, and every
operation lands in its RESULTS section (SQLite, a few hundred rows)."""

from __future__ import annotations

import importlib.util
import sys
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect

from store.store import Store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_store", REPO / "bench" / "store.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture
def filled(bench, tmp_path):
    (tmp_path / "stamps").mkdir()
    url, stamp = bench.kept_database("sqlite", 300, tmp_path, None)
    store = Store(url, tmp_path / "blobs")
    yield store, stamp
    store.close()


def test_a_filled_database_reads_back_like_logged_predictions(filled):
    store, stamp = filled

    newest = store.list_predictions(50)
    middle_at, middle_id = stamp["marks"]["middle"]
    middle = store.list_predictions(50, before=(datetime.fromisoformat(middle_at), middle_id))
    oldest_at, oldest_id = stamp["marks"]["oldest"]
    oldest = store.list_predictions(50, before=(datetime.fromisoformat(oldest_at), oldest_id))

    assert len(newest) == len(middle) == len(oldest) == 50
    assert [p.created_at for p in newest] == sorted((p.created_at for p in newest), reverse=True)
    assert all(p.created_at < datetime.fromisoformat(middle_at) for p in middle)
    assert newest[0].features["emb_7"] is not None and len(newest[0].blob_key) == 64
    assert store.history_total() == (300, True)
    assert store.get_prediction(stamp["ids"][0], wait_s=0).id == stamp["ids"][0]
    assert store.list_audit(1, 0, "drift_check") and store.count_feedback() == 3
    assert {"ix_predictions_page", "ix_predictions_blob"} <= \
        {i["name"] for i in inspect(store.engine).get_indexes("predictions")}


def test_a_kept_database_is_reused_and_what_a_run_added_is_deleted(bench, filled, tmp_path):
    store, stamp = filled
    logged = store.log_prediction(model_version="1", label="positive", confidence=0.9, probabilities={})
    store.flush()
    store.add_feedback(logged, "negative")

    url, again = bench.kept_database("sqlite", 300, tmp_path, None)
    bench.reset(store, again)

    assert again["cached"] and again["ids"] == stamp["ids"]
    assert store.count_predictions() == 300 and store.count_feedback() == 3


def test_a_run_writes_one_section_with_every_operation(bench, tmp_path, monkeypatch, capsys):
    results = tmp_path / "RESULTS.md"
    argv = ["bench/store.py", "--rows", "200", "--backends", "sqlite", "--samples", "3", "--writer-rate", "200",
            "--image-kib", "1", "--work", str(tmp_path / "work"), "--out", str(results)]
    monkeypatch.setattr(sys, "argv", argv)

    assert bench.main() == 0

    text = results.read_text()
    assert text.count("## Store at scale (bench/store.py)") == 1 and "### SQLite" in text
    for op in ["insert 1", "insert batch of 50", "history page, newest", "history page, middle",
               "history page, oldest", "prediction by id", "feedback", "erasure", "latest drift",
               "feedback, writer at 200/s", "insert 1, writer at 200/s"]:
        assert f"| {op} |" in text
