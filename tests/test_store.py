"""The durable store: predictions logged off the request path, feedback durable, blobs content-addressed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, inspect

from store import BlobStore, NotRecorded, Store, UnknownPrediction
from store.schema import utcnow
from store.store import audit_query, blob_use_query, page_query


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'db' / 'rayloop.db'}", tmp_path / "blobs", flush_interval_s=0.05)
    yield s
    s.close()


def log(store: Store, label: str = "3", image: bytes | None = None) -> str:
    return store.log_prediction(model_version="1", label=label, confidence=0.9,
                                probabilities={"3": 0.9, "5": 0.1}, features={"brightness": 0.2}, image=image)


def test_logged_predictions_are_readable_newest_first(store):
    ids = [log(store) for _ in range(5)]

    assert store.flush()
    page = store.list_predictions(limit=3)

    assert [p.id for p in page] == ids[::-1][:3]
    assert page[0].probabilities == {"3": 0.9, "5": 0.1} and page[0].features == {"brightness": 0.2}


def test_cursor_pages_cover_every_prediction_once(store):
    ids = {log(store) for _ in range(7)}
    store.flush()

    seen, cursor = [], None
    while True:
        page = store.list_predictions(limit=3, before=cursor)
        if not page:
            break
        seen += [p.id for p in page]
        cursor = (page[-1].created_at, page[-1].id)

    assert sorted(seen) == sorted(ids) and len(seen) == 7


def test_logging_a_prediction_does_not_wait_for_the_database(store):
    started = time.perf_counter()
    for _ in range(200):
        log(store, image=b"x" * 1000)
    queued = time.perf_counter() - started

    assert queued < 0.5
    assert store.flush()
    assert store.count_predictions() == 200


def test_feedback_is_durable_and_audited(tmp_path, store):
    prediction_id = log(store)
    feedback_id = store.add_feedback(prediction_id, "5", actor="key:abcd")
    store.close()

    reopened = Store(f"sqlite:///{tmp_path / 'db' / 'rayloop.db'}", tmp_path / "blobs")
    try:
        prediction = reopened.get_prediction(prediction_id)
        assert [(f.id, f.label) for f in prediction.feedback] == [(feedback_id, "5")]
        audit = reopened.list_audit()
        assert audit[0].event == "feedback" and audit[0].actor == "key:abcd"
        assert reopened.count_feedback() == 1
    finally:
        reopened.close()


def test_feedback_for_an_unknown_prediction_is_refused(store):
    with pytest.raises(UnknownPrediction):
        store.add_feedback("no-such-id", "5")
    assert store.count_feedback() == 0


def test_images_are_stored_by_content_hash(tmp_path, store):
    prediction_id = log(store, image=b"\x89PNG same bytes")
    log(store, image=b"\x89PNG same bytes")
    store.flush()

    key = store.get_prediction(prediction_id).blob_key
    assert store.blobs.get(key) == b"\x89PNG same bytes"
    assert (tmp_path / "blobs" / key[:2] / key[2:]).read_bytes() == b"\x89PNG same bytes"
    assert len([p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]) == 1


def test_blob_keys_cannot_escape_the_blob_dir(tmp_path):
    blobs = BlobStore(tmp_path)
    with pytest.raises(ValueError):
        blobs.get("../../etc/passwd")
    with pytest.raises(ValueError):
        blobs.put(b"x", "../" * 10 + "tmp/x")


def test_an_id_another_replica_just_answered_is_found_once_its_writer_catches_up(tmp_path):
    """Two serving replicas, one database: B is asked for an id A answered but has not written yet."""
    import threading
    import uuid

    url = f"sqlite:///{tmp_path / 'rayloop.db'}"
    a, b = Store(url, tmp_path / "blobs"), Store(url, tmp_path / "blobs")
    try:
        prediction_id = str(uuid.uuid4())
        late = threading.Timer(0.3, lambda: a.log_prediction(model_version="1", label="3", confidence=0.9,
                                                             probabilities={"3": 0.9}, prediction_id=prediction_id))
        late.start()
        assert b.get_prediction(prediction_id, wait_s=5).label == "3"

        started = time.monotonic()
        with pytest.raises(UnknownPrediction):
            b.get_prediction("not-a-uuid")  # not an id we hand out: no waiting
        assert time.monotonic() - started < 0.5
        with pytest.raises(UnknownPrediction):
            b.get_prediction(str(uuid.uuid4()), wait_s=0.2)  # ours in form, but nobody answered it
    finally:
        a.close()
        b.close()


def test_under_load_the_writer_gathers_rows_into_few_transactions(store):
    from sqlalchemy import event

    transactions = []
    event.listen(store.engine, "commit", lambda conn: transactions.append(time.monotonic()))
    for _ in range(200):
        log(store)
        time.sleep(0.001)
    assert store.flush()

    assert store.count_predictions() == 200
    assert len(transactions) < 50  # a transaction per row before


def test_a_retrain_reads_the_newest_labels_in_one_window(store):
    from tune.job import feedback_samples

    ids = [log(store, image=f"image {i}".encode()) for i in range(6)]
    no_image = log(store)
    assert store.flush()
    for i, prediction_id in enumerate(ids):
        store.add_feedback(prediction_id, "3" if i % 2 else "5")
        time.sleep(0.002)
    store.add_feedback(ids[0], "3")  # relabelled later: the latest label wins
    time.sleep(0.002)
    store.add_feedback(no_image, "3")  # no image kept: nothing to learn from

    newest = store.labelled_images(window=4)
    assert [row[0] for row in newest] == [ids[0], ids[5], ids[4]]  # newest first, no_image left out
    assert newest[0][1] == "3"
    samples = feedback_samples(store, ["3", "5"], window=100)
    assert sorted(samples.ids) == sorted(ids) and len(samples) == 6
    assert samples.labels[samples.ids.index(ids[0])] == 0  # class index of "3"
    assert all((Path(samples.root) / p).read_bytes().startswith(b"image ") for p in samples.paths)


def query_plan(store: Store, statement) -> str:
    """SQLite's plan for a statement, one line per step ("SEARCH ... USING INDEX ..." or "SCAN ...")."""
    compiled = statement.compile(store.engine)
    params = [str(v) if isinstance(v, datetime) else v for v in (compiled.params[k] for k in compiled.positiontup)]
    with store.engine.connect() as connection:
        rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", tuple(params)).all()
    return "\n".join(row[-1] for row in rows)


def test_every_lookup_the_api_makes_is_answered_by_an_index(store):
    for _ in range(50):
        log(store, image=b"png bytes")
    store.audit("test", "drift_check", {})
    assert store.flush()
    newest = store.list_predictions(limit=1)[0]

    plans = {"cursor page": query_plan(store, page_query((newest.created_at, newest.id)).limit(50)),
             "blob in use": query_plan(store, blob_use_query("abc")),
             "latest drift check": query_plan(store, audit_query("drift_check").limit(1))}

    for name, plan in plans.items():
        # SEARCH: a seek into the index. A SCAN, even one in index order, reads from the table's start
        # (the cursor's old OR predicate did: a page deep in the history read every row before it).
        assert all(line.startswith("SEARCH") and "INDEX" in line for line in plan.splitlines()), f"{name}: {plan}"
        assert "TEMP B-TREE" not in plan, f"{name} sorts every row: {plan}"


def test_an_existing_database_gets_the_indexes_added_since_it_was_made(tmp_path, store):
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_predictions_blob")
    store.close()

    again = Store(f"sqlite:///{tmp_path / 'db' / 'rayloop.db'}", tmp_path / "blobs")
    try:
        assert "ix_predictions_blob" in {i["name"] for i in inspect(again.engine).get_indexes("predictions")}
    finally:
        again.close()


def test_retention_deletes_old_unlabelled_predictions_and_images_no_longer_used(store):
    shared, alone, labelled_image = b"\x89PNG shared", b"\x89PNG alone", b"\x89PNG labelled"
    old_shared, old_alone = log(store, image=shared), log(store, image=alone)
    old_labelled = log(store, image=labelled_image)
    log(store, image=shared)  # ... and the same image in a recent prediction
    assert store.flush()
    feedback_id = store.add_feedback(old_labelled, "5")
    with store.engine.begin() as connection:  # the first three are 40 days old
        connection.exec_driver_sql(
            "UPDATE predictions SET created_at = datetime(created_at, '-40 days') WHERE id IN (?, ?, ?)",
            (old_shared, old_alone, old_labelled))
    audited = len(store.list_audit())

    rows, images = store.prune(utcnow() - timedelta(days=30), batch=1)  # one row per batch: the loop pages

    assert (rows, images) == (2, 1)  # only the image no prediction refers to any more
    remaining = {p.id for p in store.list_predictions(limit=10)}
    assert old_labelled in remaining and old_shared not in remaining and old_alone not in remaining
    assert not store.blobs.exists(BlobStore.key(alone))
    assert store.blobs.get(BlobStore.key(shared)) == shared and store.blobs.get(BlobStore.key(labelled_image))
    assert [f.id for f in store.get_prediction(old_labelled).feedback] == [feedback_id]
    assert len(store.list_audit()) == audited  # the audit trail is never pruned
    assert store.prune(utcnow() - timedelta(days=30)) == (0, 0)


def test_image_sampling_keeps_the_prediction_without_its_image(tmp_path):
    unsampled = Store(f"sqlite:///{tmp_path / 'rayloop.db'}", tmp_path / "blobs", image_sample_rate=0.0)
    try:
        prediction_id = log(unsampled, image=b"\x89PNG never kept")
        assert unsampled.flush()
        assert unsampled.get_prediction(prediction_id).blob_key is None
        assert not (tmp_path / "blobs").exists() or not any((tmp_path / "blobs").rglob("*"))
    finally:
        unsampled.close()
    with pytest.raises(ValueError, match="store.image_sample_rate"):
        Store(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "blobs", image_sample_rate=1.5)


def blocked_writes(store: Store, monkeypatch, label: str) -> tuple[threading.Event, threading.Event]:
    """(blocked, release): the writer stops before committing any batch holding a row with this label."""
    blocked, release = threading.Event(), threading.Event()
    insert = store.writer._insert_new

    def gated(rows, retry=False):
        if any(r["label"] == label for r in rows):
            blocked.set()
            release.wait(60)
        insert(rows, retry)

    monkeypatch.setattr(store.writer, "_insert_new", gated)
    return blocked, release


def test_erasure_waits_only_for_queued_rows_of_the_same_image_and_keeps_the_image_they_use(store, monkeypatch):
    shared, own = b"shared image", b"own image"
    erase_shared = store.add_feedback(log(store, image=shared), "7")
    erase_own = store.add_feedback(log(store, image=own), "7")
    held, release = blocked_writes(store, monkeypatch, "queued")
    try:
        log(store, label="queued", image=b"unrelated image")
        assert held.wait(30)  # its image is stored, its row not yet: the writer is stuck on it
        alone = threading.Thread(target=store.erase_feedback, args=(erase_own,))
        alone.start()
        alone.join(5)
        assert not alone.is_alive()  # no queued row holds that image: no wait for the stuck queue
        assert not store.blobs.exists(BlobStore.key(own))

        again = log(store, label="queued", image=shared)  # the same bytes, queued behind the stuck batch
        waiting = threading.Thread(target=store.erase_feedback, args=(erase_shared,))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()  # deleting now would leave the queued row pointing at nothing
        release.set()
        waiting.join(30)
        assert not waiting.is_alive()
        assert store.get_prediction(again).blob_key == BlobStore.key(shared)
        assert store.blobs.get(BlobStore.key(shared)) == shared
    finally:
        release.set()


def test_flush_waits_for_rows_queued_before_it_not_for_rows_queued_while_it_waits(store, monkeypatch):
    held_before, release_before = blocked_writes(store, monkeypatch, "before")
    held_during, release_during = blocked_writes(store, monkeypatch, "during")
    try:
        before = log(store, label="before")
        assert held_before.wait(30)
        flushed = []
        waiting = threading.Thread(target=lambda: flushed.append(store.flush(timeout=30)))
        waiting.start()
        during = log(store, label="during")  # queued while flush waits
        release_before.set()
        assert held_during.wait(30)  # the writer now holds the later row, uncommitted
        waiting.join(30)
        assert flushed == [True] and store.get_prediction(before).id == before
        assert store.writer.wait_for(during, timeout=0.2) is False
    finally:
        release_before.set()
        release_during.set()
    assert store.writer.wait_for(during, timeout=30)


def test_reads_and_feedback_wait_for_their_own_row_only(store, monkeypatch):
    held, release = blocked_writes(store, monkeypatch, "blocked")
    try:
        first = log(store, label="3")
        assert store.flush(timeout=30)
        later = log(store, label="blocked")
        assert held.wait(30)  # another request's row, held uncommitted by the writer
        assert store.flush(timeout=0.2) is False  # flush does wait for it: it was queued before the call
        monkeypatch.setattr(store.writer, "flush", lambda *a, **k: pytest.fail("waited for the whole queue"))
        assert store.writer.wait_for(first, timeout=0)  # written already: no wait
        assert store.get_prediction(first).id == first
        feedback = store.add_feedback(first, "5")
        assert store.get_prediction(first).feedback[0].id == feedback
    finally:
        release.set()
    assert store.writer.wait_for(later, timeout=30) and store.get_prediction(later).id == later


def test_predictions_waiting_together_are_committed_together_before_the_wait_ends(tmp_path, store):
    commits = []
    event.listen(store.engine, "commit", lambda connection: commits.append(1))

    async def requests(n: int) -> list[str]:
        async def one(i: int) -> str:
            prediction_id = log(store, image=f"image {i}".encode())
            await store.recorded([prediction_id])
            return prediction_id

        return await asyncio.gather(*(one(i) for i in range(n)))

    ids = asyncio.run(requests(60))

    other = Store(f"sqlite:///{tmp_path / 'db' / 'rayloop.db'}", tmp_path / "blobs")  # no flush: already there
    try:
        assert all(other.get_prediction(i, wait_s=0).blob_key for i in ids)
    finally:
        other.close()
    assert len(commits) <= 3  # group commit: one transaction per gathering, not per request


def test_a_prediction_the_writer_gave_up_on_is_reported_to_its_waiter(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'rayloop.db'}", tmp_path / "blobs", busy_timeout_s=0.1, retry_s=0.3)
    holder = sqlite3.connect(tmp_path / "rayloop.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the retry window
    try:
        prediction_id = log(store)
        with pytest.raises(NotRecorded):
            asyncio.run(store.recorded([prediction_id]))
        with pytest.raises(NotRecorded):  # asked again later, it still says so
            asyncio.run(store.recorded([prediction_id]))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        store.close()


def test_history_totals_are_exact_for_a_small_store_and_estimated_past_the_bound(store, monkeypatch):
    ids = [log(store) for _ in range(30)]
    assert store.flush()
    assert store.history_total() == (30, True)

    monkeypatch.setattr("store.store.EXACT_TOTAL_UP_TO", 10)
    total, exact = store.history_total()  # never analyzed: max(rowid), an upper bound
    assert not exact and total >= 30
    store.analyze()
    assert store.history_total() == (30, False)  # ANALYZE's count, read without scanning the table
    assert len(ids) == 30


def test_images_past_the_cap_go_oldest_unlabelled_first_and_their_rows_stay(store):
    images = [bytes([i]) * 1000 for i in range(6)]  # 1,000 bytes each, oldest first
    ids = []
    for image in images:
        ids.append(log(store, image=image))
        time.sleep(0.002)  # distinct created_at
    assert store.flush()
    store.add_feedback(ids[0], "3")  # the oldest is labelled: a retrain needs its image

    assert store.cap_images(max_bytes=3500) == 3  # 6,000 -> 3,000 bytes: the three oldest unlabelled go

    kept = {i: store.get_prediction(i).blob_key for i in ids}
    assert kept[ids[0]] and all(kept[i] is None for i in ids[1:4]) and all(kept[i] for i in ids[4:])
    assert sum(store.blobs.sizes().values()) == 3000
    assert store.cap_images(max_bytes=500) == 2  # the labelled image stays whatever the cap
    assert set(store.blobs.sizes()) == {BlobStore.key(images[0])}
