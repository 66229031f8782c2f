"""service/records/reviews.py on real SQLite in tmp_path: decisions and their boxes filled and checked from the record,
history, current decision, undo, the review queue (filters, keyset pages, the unreviewed total), current_reviews,
retention, decisions written beside a busy records writer thread (WAL, two write connections), and the queue over
10,000 records (a printed figure)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from benchmarks.bench_forward import write_journal
from service.core.errors import InvalidReview, NotFound
from service.records.query import QueryFilters, RecordReader
from service.records.reviews import (
    archived_image,
    current_decisions,
    current_reviews,
    decide,
    fill_boxes,
    history,
    review_queue,
    undo,
)
from service.records.schema import DB_NAME, open_reader, open_side_writer, open_writer
from service.records.store import RecordStore
from service.records.writer import GroupWriter
from service.settings import RecordsSettings
from tests.service.records_helpers import PITTED, SCRATCH, make_image, make_record

pytestmark = pytest.mark.anyio
CLASSES = ["scratches", "inclusion", "patches", "pitted_surface"]
T0 = 1_767_225_600.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def opened(data_dir: Path, registry: CollectorRegistry | None = None, **kw: Any) -> AsyncIterator[RecordStore]:
    store = RecordStore(RecordsSettings(**kw), data_dir, registry, sweep_interval_s=3600.0)
    store.start()
    try:
        yield store
    finally:
        await store.close(5.0)


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A journal with: r-ng (scratch + pit, cam-1), r-ok (no detection, cam-2), r-two (two images) and a repeated id."""
    records = [
        make_record("r-ng", b"a", detections=[SCRATCH, PITTED], received_at=T0),
        make_record("r-ok", b"b", verdict="OK", camera_id="cam-2", received_at=T0 + 1),
        make_record("r-two", b"c", received_at=T0 + 2),
        make_record("r-two", b"d", index=1, detections=[PITTED], received_at=T0 + 2),
    ]
    write_journal(tmp_path, records, archive_ng=True)
    c = open_side_writer(tmp_path / DB_NAME)
    yield c
    c.close()


def _box(**kw: Any) -> dict[str, Any]:
    return kw


def test_confirmed_and_false_call_take_the_models_boxes(conn: sqlite3.Connection) -> None:
    row, record = decide(conn, "r-ng", 0, "confirmed", [], "ana", CLASSES, now=T0 + 10)
    assert record["camera_id"] == "cam-1"
    assert (row.decision, row.reviewer, row.decided_at, row.model_version, row.undoes) == (
        "confirmed", "ana", T0 + 10, "1.4.0", None,
    )  # fmt: skip
    assert [(b.status, b.class_name, b.detection_ordinal, b.score) for b in row.boxes] == [
        ("confirmed", "scratches", 0, 0.91), ("confirmed", "pitted_surface", 1, 0.55),
    ]  # fmt: skip
    assert row.boxes[0].box_xyxy == (4.0, 6.0, 20.0, 22.0) and row.boxes[0].original_class_id is None
    row2, _ = decide(conn, "r-ng", 0, "false_call", [], "bo", CLASSES)
    assert [b.status for b in row2.boxes] == ["false_call", "false_call"]
    skipped, _ = decide(conn, "r-ok", 0, "skipped", [], "bo", CLASSES)
    assert skipped.boxes == ()
    ok, _ = decide(conn, "r-ok", 0, "confirmed", [], "bo", CLASSES)  # an OK image confirmed OK: nothing missed
    assert ok.boxes == ()


def test_corrected_lists_every_detection_once_plus_added_boxes(conn: sqlite3.Connection) -> None:
    boxes = [
        _box(status="added", class_id=2, box_xyxy=[1, 2, 30, 40]),
        _box(status="relabelled", detection_ordinal=1, class_id=1),
        _box(status="false_call", detection_ordinal=0, class_name="ignored", score=0.1),
    ]
    row, _ = decide(conn, "r-ng", 0, "corrected", boxes, "ana", CLASSES)
    by_status = {b.status: b for b in row.boxes}
    assert [b.detection_ordinal for b in row.boxes] == [0, 1, None]  # model boxes by ordinal, then the added
    assert by_status["false_call"].class_name == "scratches" and by_status["false_call"].score == 0.91
    relabelled = by_status["relabelled"]
    assert (relabelled.class_id, relabelled.class_name, relabelled.original_class_id) == (1, "inclusion", 3)
    assert relabelled.box_xyxy == (30.0, 30.0, 40.0, 44.0) and relabelled.score == 0.55
    added = by_status["added"]
    assert (added.class_name, added.score, added.detection_ordinal, added.box_xyxy) == (
        "patches", None, None, (1.0, 2.0, 30.0, 40.0),
    )  # fmt: skip
    escape, _ = decide(
        conn, "r-ok", 0, "corrected", [_box(status="added", class_id=0, box_xyxy=[0, 0, 48, 48])], "a", CLASSES
    )
    assert [b.status for b in escape.boxes] == ["added"]  # an OK image with an added box: an escape found


@pytest.mark.parametrize(
    ("decision", "boxes", "detections", "match"),
    [
        ("approve", [], [SCRATCH], "not one of"),
        ("confirmed", [_box(status="confirmed", detection_ordinal=0)], [SCRATCH], "takes no boxes"),
        ("false_call", [], [], "no detection to call false"),
        ("corrected", [_box(status="confirmed", detection_ordinal=1)], [SCRATCH], "not one of the record's 1"),
        ("corrected", [_box(status="confirmed", detection_ordinal=0)] * 2, [SCRATCH], r"twice: \[0\]"),
        ("corrected", [], [SCRATCH], r"missing: \[0\]"),
        ("corrected", [_box(status="confirmed", detection_ordinal=0, class_id=2)], [SCRATCH], "use relabelled"),
        ("corrected", [_box(status="relabelled", detection_ordinal=0, class_id=0)], [SCRATCH], "that is confirmed"),
        ("corrected", [_box(status="relabelled", detection_ordinal=0, class_id=9)], [SCRATCH], "not a class"),
        ("corrected", [_box(status="added", class_id=0, box_xyxy=[0, 0, 49, 10])], [], "inside the 48x48"),
        ("corrected", [_box(status="added", class_id=0, box_xyxy=[5, 5, 5, 10])], [], "inside"),
        ("corrected", [_box(status="added", class_id=0, box_xyxy=[0, 0, float("nan"), 1])], [], "inside"),
        ("corrected", [_box(status="added", class_id=0)], [], r"\[x1, y1, x2, y2\]"),
        ("corrected", [_box(status="added", class_id=True, box_xyxy=[0, 0, 1, 1])], [], "not a class"),
        ("corrected", [_box(status="confirmed", class_id=0, box_xyxy=[0, 0, 1, 1])], [], "status added"),
        ("corrected", [_box(status="added", detection_ordinal=0, class_id=0)], [SCRATCH], "has no detection_ordinal"),
        ("corrected", [_box(status="maybe", detection_ordinal=0)], [SCRATCH], "status 'maybe'"),
    ],
)
def test_a_decision_that_does_not_fit_the_record_is_refused(
    decision: str, boxes: list[dict[str, Any]], detections: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(InvalidReview, match=match):
        fill_boxes(decision, boxes, detections, CLASSES, (48, 48))


def test_history_current_and_undo(conn: sqlite3.Connection) -> None:
    first, _ = decide(conn, "r-ng", 0, "confirmed", [], "ana", CLASSES)
    second, _ = decide(conn, "r-ng", 0, "false_call", [], "bo", CLASSES)
    seq = second.inspection_seq
    assert current_decisions(conn, [seq])[seq] == second  # last write wins
    undo_row, now_current, _ = undo(conn, "r-ng", 0, "cy")
    assert (undo_row.decision, undo_row.undoes, undo_row.reviewer, undo_row.boxes) == ("undo", second.review_seq,
                                                                                       "cy", ())  # fmt: skip
    assert now_current == first and current_decisions(conn, [seq])[seq] == first
    _, after, _ = undo(conn, "r-ng", 0, "cy")
    assert after is None and current_decisions(conn, [seq]) == {}
    with pytest.raises(NotFound, match="no review decision to undo"):
        undo(conn, "r-ng", 0, "cy")
    assert [r.decision for r in history(conn, "r-ng", 0)] == ["undo", "undo", "false_call", "confirmed"]
    third, _ = decide(conn, "r-ng", 0, "skipped", [], "ana", CLASSES)  # decide again after undoing everything
    assert current_decisions(conn, [seq])[seq] == third
    assert history(conn, "r-ok", 0) == []
    for call in (lambda: history(conn, "nope", 0), lambda: decide(conn, "r-ng", 5, "confirmed", [], "a", CLASSES)):
        with pytest.raises(NotFound, match="no image"):
            call()


def test_a_reused_request_id_is_decided_on_its_newest_record(tmp_path: Path) -> None:
    write_journal(tmp_path, [make_record("dup", b"1", received_at=T0), make_record("dup", b"2", received_at=T0 + 5)])
    conn = open_side_writer(tmp_path / DB_NAME)
    row, record = decide(conn, "dup", 0, "confirmed", [], "ana", CLASSES)
    assert row.inspection_seq == record["seq"] == 2
    conn.close()


def test_current_reviews_joins_each_images_current_decision_to_its_record(conn: sqlite3.Connection) -> None:
    decide(conn, "r-ng", 0, "confirmed", [], "ana", CLASSES, now=T0 + 100)
    decide(conn, "r-ng", 0, "false_call", [], "bo", CLASSES, now=T0 + 101)
    decide(conn, "r-two", 1, "confirmed", [], "ana", CLASSES)
    undo(conn, "r-two", 1, "ana")
    decide(conn, "r-ok", 0, "skipped", [], "ana", CLASSES)
    images = list(current_reviews(conn))
    assert [(i.request_id, i.decision) for i in images] == [("r-ng", "false_call"), ("r-ok", "skipped")]
    ng = images[0]
    assert (ng.camera_id, ng.verdict, ng.model_name, ng.width, ng.height, ng.reviewer, ng.decided_at) == (
        "cam-1", "NG", "yolo11s.neu-det.fp32", 48, 48, "bo", T0 + 101,
    )  # fmt: skip
    assert len(ng.image_sha256) == 64 and ng.received_at == T0 and len(ng.boxes) == 2


def test_queue_filters_status_and_keyset_pages(tmp_path: Path) -> None:
    records = [
        make_record(f"q{i}", f"q{i}".encode(), verdict="OK" if i % 4 == 3 else "NG", camera_id=f"cam-{i % 2}",
                    part_id=f"part-{i // 10}", detections=[PITTED] if i % 5 == 0 else None, received_at=T0 + i)
        for i in range(40)
    ]  # fmt: skip
    records[7] = make_record("q7", b"v2", camera_id="cam-1", received_at=T0 + 7)
    write_journal(tmp_path, records)
    conn = open_side_writer(tmp_path / DB_NAME)
    with conn:
        conn.execute("UPDATE inspections SET model_version = '2.0.0' WHERE request_id IN ('q7', 'q9')")
    reader = RecordReader(open_reader(tmp_path / DB_NAME), tmp_path)
    ng = QueryFilters(verdict="NG", reviewed=False)
    page = review_queue(reader, ng, 100, None)
    ng_ids = {f"q{i}" for i in range(40) if i % 4 != 3} | {"q7"}
    assert len(page.items) == page.total_unreviewed == len(ng_ids) == 31 and page.next_before_seq is None
    assert [d["seq"] for d in page.items] == sorted((d["seq"] for d in page.items), reverse=True)
    decide(conn, "q38", 0, "confirmed", [], "ana", CLASSES)
    decide(conn, "q37", 0, "skipped", [], "ana", CLASSES)
    decide(conn, "q36", 0, "confirmed", [], "ana", CLASSES)
    undo(conn, "q36", 0, "ana")  # undone: unreviewed again
    seen, before = [], None
    while True:
        page = review_queue(reader, ng, 7, before)
        seen += [d["request_id"] for d in page.items]
        assert page.total_unreviewed == 29
        before = page.next_before_seq
        if before is None:
            break
    assert len(seen) == len(set(seen)) == 29 and "q38" not in seen and "q37" not in seen and "q36" in seen
    reviewed = review_queue(reader, QueryFilters(verdict="NG", reviewed=True), 100, None)
    assert [d["request_id"] for d in reviewed.items] == ["q38", "q37"]
    assert reviewed.current[reviewed.items[0]["seq"]].decision == "confirmed"
    everything = review_queue(reader, QueryFilters(), 100, None)
    assert len(everything.items) == 40 and everything.total_unreviewed == 38
    cases = {
        QueryFilters(verdict="NG", camera_id="cam-1"): {f"q{i}" for i in range(1, 40, 2)} & ng_ids,
        QueryFilters(verdict="NG", model_version="2.0.0"): {"q7", "q9"},
        QueryFilters(verdict="NG", class_name="pitted_surface"): {f"q{i}" for i in range(0, 40, 5)} & ng_ids,
        QueryFilters(verdict="OK", part_id="part-1"): {"q11", "q15", "q19"},
        QueryFilters(verdict="NG", since=T0 + 30, until=T0 + 33): {"q30", "q32"},
    }
    for filters, expected in cases.items():
        assert {d["request_id"] for d in review_queue(reader, filters, 100, None).items} == expected, filters
    reader.conn.close()
    conn.close()


def test_retention_deletes_the_reviews_of_the_records_it_deletes(tmp_path: Path) -> None:
    write_journal(tmp_path, [make_record(f"old{i}", b"x", received_at=T0 + i) for i in range(3)])
    conn = open_side_writer(tmp_path / DB_NAME)
    for i in range(3):
        decide(conn, f"old{i}", 0, "confirmed", [], "ana", CLASSES)
    undo(conn, "old0", 0, "ana")
    writer = GroupWriter(open_writer(tmp_path / DB_NAME, "NORMAL"), tmp_path, RecordsSettings(), _metrics(), _rng())
    writer._delete_records(T0 + 10)  # every record but the newest
    assert [r[0] for r in conn.execute("SELECT request_id FROM reviews")] == ["old2"]
    writer.close()
    conn.close()


def _metrics() -> Any:
    from service.records.metrics import RecordsMetrics

    return RecordsMetrics(CollectorRegistry())


def _rng() -> Any:
    import random

    return random.Random(0)


async def test_the_store_counts_decisions_and_finds_archived_images(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    image = make_image(3)
    async with opened(tmp_path, registry) as store:
        await store.add([(make_record("s1", image, detections=[SCRATCH, PITTED]), image)])
        assert store.reviews is not None
        await store.reviews.decide("s1", 0, "corrected", [
            _box(status="confirmed", detection_ordinal=0), _box(status="false_call", detection_ordinal=1),
            _box(status="added", class_id=2, box_xyxy=[1, 1, 9, 9]),
        ], "ana", CLASSES)  # fmt: skip
        assert await store.reviews.undo("s1", 0, "ana") is None
        assert [r.decision for r in await store.reviews.history("s1", 0)] == ["undo", "corrected"]
        page = await store.reviews.queue(QueryFilters(verdict="NG", reviewed=False), 10, None)
        assert [d["request_id"] for d in page.items] == ["s1"]
    path = archived_image(tmp_path, "s1", 0)
    assert path is not None and path.read_bytes() == image
    assert archived_image(tmp_path, "s1", 1) is None

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    assert sample("aoi_review_decisions_total", decision="corrected", camera_id="cam-1") == 1
    assert sample("aoi_review_decisions_total", decision="undo", camera_id="cam-1") == 1
    assert sample("aoi_review_boxes_total", status="confirmed", class_name="scratches", camera_id="cam-1") == 1
    assert sample("aoi_review_boxes_total", status="false_call", class_name="pitted_surface", camera_id="cam-1") == 1
    assert sample("aoi_review_boxes_total", status="added", class_name="patches", camera_id="cam-1") == 1
    assert sample("aoi_review_escapes_total", class_name="patches", camera_id="cam-1") == 1


async def test_decisions_and_the_records_writer_share_the_database(tmp_path: Path) -> None:
    """Two write connections under WAL: the records writer thread commits groups (durable, fsync each) while
    threads write decisions on the side connection; every record and every decision lands, none is lost, and the
    queue reads consistently meanwhile."""
    registry = CollectorRegistry()
    async with opened(tmp_path, registry) as store:
        reviews = store.reviews
        assert reviews is not None
        await store.add([(make_record(f"w{i}", b"", received_at=T0 + i), None) for i in range(20)])
        errors: list[BaseException] = []

        def reviewer(name: str) -> None:
            conn = open_side_writer(tmp_path / DB_NAME)
            try:
                for i in range(60):
                    decide(conn, f"w{i % 20}", 0, "confirmed" if i % 2 else "false_call", [], name, CLASSES)
            except BaseException as exc:
                errors.append(exc)
            finally:
                conn.close()

        threads = [threading.Thread(target=reviewer, args=(f"r{k}",)) for k in range(3)]
        for t in threads:
            t.start()
        added = 0
        while any(t.is_alive() for t in threads) or added < 200:
            await store.add([(make_record(f"n{added + j}", b""), None) for j in range(5)])
            added += 5
            page = await reviews.queue(QueryFilters(verdict="NG", reviewed=True), 500, None)
            assert all(page.current[d["seq"]].decision in ("confirmed", "false_call") for d in page.items)
        for t in threads:
            t.join()
        assert not errors, errors
        side = await reviews.decide("w0", 0, "skipped", [], "store", CLASSES)  # the store's own side connection
        assert side.decision == "skipped"
    assert registry.get_sample_value("aoi_records_written_total") == 20 + added
    assert (
        sum(registry.get_sample_value("aoi_records_lost_total", {"reason": r}) or 0 for r in ("timeout", "db_error"))
        == 0
    )
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 3 * 60 + 1
        assert conn.execute("SELECT COUNT(*) FROM inspections").fetchone()[0] == 20 + added


def test_queue_over_10000_records_is_fast(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The page's first request (and a filtered and a deep one) over 10,000 records, 30 % NG, 1,000 of them
    reviewed: printed, not asserted against a time (shared CI cores); docs/review.md quotes the figure."""
    n = 10_000
    records = [
        make_record(f"b{i}", f"b{i}".encode(), verdict="NG" if i % 10 < 3 else "OK", camera_id=f"cam-{i % 3}",
                    part_id=f"p{i // 8}", detections=[SCRATCH, PITTED] if i % 10 == 0 else None,
                    received_at=T0 + i)
        for i in range(n)
    ]  # fmt: skip
    write_journal(tmp_path, records, archive_ng=True)
    conn = open_side_writer(tmp_path / DB_NAME)
    for i in range(1, n, 10):
        decide(conn, f"b{i}", 0, "confirmed", [], "ana", CLASSES)
    reader = RecordReader(open_reader(tmp_path / DB_NAME), tmp_path)
    cases = {
        "NG unreviewed, first page of 100": (QueryFilters(verdict="NG", reviewed=False), None),
        "NG unreviewed, camera cam-1": (QueryFilters(verdict="NG", reviewed=False, camera_id="cam-1"), None),
        "NG unreviewed, class pitted_surface": (
            QueryFilters(verdict="NG", reviewed=False, class_name="pitted_surface"),
            None,
        ),
        "NG reviewed": (QueryFilters(verdict="NG", reviewed=True), None),
        "NG unreviewed, page at seq 2000": (QueryFilters(verdict="NG", reviewed=False), 2000),
    }
    lines = []
    for name, (filters, before) in cases.items():
        start = time.perf_counter()
        for _ in range(5):
            page = review_queue(reader, filters, 100, before)
        ms = (time.perf_counter() - start) / 5 * 1000
        assert page.items, name
        lines.append(f"  {ms:7.2f} ms  {name} ({len(page.items)} items, {page.total_unreviewed} unreviewed)")
    with capsys.disabled():
        print(f"\nreview queue over {n} records (mean of 5):\n" + "\n".join(lines))
    assert review_queue(reader, QueryFilters(verdict="NG", reviewed=False), 100, None).total_unreviewed == 2000
    plan = " ".join(str(r[3]) for r in reader.conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM inspections i WHERE i.verdict = 'NG' AND i.camera_id = 'c' "
        "ORDER BY i.seq DESC"
    ))  # fmt: skip
    assert "inspections_verdict_camera" in plan, plan
    reader.conn.close()
    conn.close()


def test_review_stats_per_model_version_and_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from aoi.cli import main
    from service.records.stats import review_stats

    def rec(rid: str, version: str, verdict: str = "NG", **kw: Any) -> Any:
        return replace(make_record(rid, rid.encode(), verdict=verdict, received_at=T0, **kw), model_version=version)

    write_journal(tmp_path, [
        rec("a", "1.0"), rec("b", "1.0"), rec("c", "1.0", detections=[SCRATCH, PITTED]), rec("d", "2.0"),
        rec("e", "1.0", "OK", camera_id="cam-2"), rec("f", "1.0", "OK"), rec("g", "2.0"),
    ])  # fmt: skip
    conn = open_side_writer(tmp_path / DB_NAME)
    decide(conn, "a", 0, "confirmed", [], "ana", CLASSES)
    decide(conn, "b", 0, "false_call", [], "ana", CLASSES)
    fixed = [_box(status="false_call", detection_ordinal=0), _box(status="relabelled", detection_ordinal=1, class_id=2)]
    decide(conn, "c", 0, "corrected", fixed, "ana", CLASSES)
    decide(conn, "d", 0, "false_call", [], "ana", CLASSES)
    undo(conn, "d", 0, "ana")
    decide(conn, "e", 0, "corrected", [_box(status="added", class_id=0, box_xyxy=[1, 1, 4, 4])], "ana", CLASSES)
    decide(conn, "f", 0, "skipped", [], "ana", CLASSES)
    decide(conn, "g", 0, "false_call", [], "ana", CLASSES)
    rows = review_stats(conn)
    assert rows == [
        {"model_version": "1.0", "reviewed": 4, "reviewed_ng": 3, "confirmed": 2, "false_calls": 1, "escapes": 1,
         "false_call_rate": pytest.approx(1 / 3)},
        {"model_version": "2.0", "reviewed": 1, "reviewed_ng": 1, "confirmed": 0, "false_calls": 1, "escapes": 0,
         "false_call_rate": 1.0},
    ]  # fmt: skip
    by_camera = review_stats(conn, ["camera_id"], QueryFilters(model_version="1.0"))
    assert [(r["camera_id"], r["reviewed"], r["escapes"]) for r in by_camera] == [("cam-1", 3, 0), ("cam-2", 1, 1)]
    with pytest.raises(ValueError, match="group by"):
        review_stats(conn, ["class_name"])
    conn.close()
    assert main(["records", "stats", "--reviews", "--data-dir", str(tmp_path), "--format", "json"]) == 0
    assert [r["model_version"] for r in json.loads(capsys.readouterr().out)] == ["1.0", "2.0"]
    assert main(["records", "stats", "--reviews", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model_version", "reviewed", "reviewed_ng", "confirmed", "false_calls", "escapes",
                                "false_call_rate"]  # fmt: skip
    assert lines[1].split() == ["1.0", "4", "3", "2", "1", "1", "0.3333"]
    assert main(["records", "stats", "--reviews", "--data-dir", str(tmp_path), "--by", "class_name"]) == 2
    assert "group by" in capsys.readouterr().err
