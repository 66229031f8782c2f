"""service/records/store.py (+ writer, query, schema, archive) on real SQLite in tmp_path: durable and fast commits,
pagination and filters, migrations, the archive and its retention, failures, integrity."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.core.errors import RecordsUnavailable
from service.http.errors import status_of
from service.records.query import QueryFilters
from service.records.schema import MIGRATIONS, RecordsSchemaError, apply_migrations, open_reader
from service.records.store import RecordStore
from service.settings import ArchiveSettings, RecordsSettings
from tests.service.records_helpers import PITTED, SCRATCH, make_image, make_record

pytestmark = pytest.mark.anyio
DAY = 86400.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def opened(
    data_dir: Path, registry: CollectorRegistry | None = None, **settings: Any
) -> AsyncIterator[RecordStore]:
    sweep = settings.pop("sweep_interval_s", 3600.0)
    store = RecordStore(RecordsSettings(**settings), data_dir, registry, sweep_interval_s=sweep)
    store.start()
    try:
        yield store
    finally:
        await store.close(5.0)


def _fresh(data_dir: Path) -> sqlite3.Connection:
    """A connection of its own, as another process would open it: sees only what was committed."""
    conn = sqlite3.connect(data_dir / "records.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def _count(data_dir: Path) -> int:
    with _fresh(data_dir) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM inspections").fetchone()[0])


async def _until(check: Callable[[], bool], timeout_s: float = 3.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_durable_add_returns_after_the_commit_with_the_image_on_disk(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    image = make_image(1)
    async with opened(tmp_path, registry) as store:
        await store.add([(make_record("r1", image), image), (make_record("r1", image, index=1, verdict="OK"), image)])
        with _fresh(tmp_path) as conn:  # no wait: on disk when add returned
            rows = conn.execute("SELECT request_id, image_index, verdict FROM inspections ORDER BY seq").fetchall()
            assert [tuple(r) for r in rows] == [("r1", 0, "NG"), ("r1", 1, "OK")]
        (doc,) = [d for d in await store.get("r1") if d["image_index"] == 0]
        path = tmp_path / doc["image"]["path"]
        assert doc["image"]["kept"] and path.read_bytes() == image
        assert path.relative_to(tmp_path).parts[0] == "images" and path.suffix == ".jpg"
        assert doc["detections"] == [SCRATCH] and doc["timings_ms"]["inference"] == 7.25
        assert _sample(registry, "aoi_records_written_total") == 2
        assert _sample(registry, "aoi_records_pending") == 0
        assert _sample(registry, "aoi_archive_images_total") == 1
        assert _sample(registry, "aoi_archive_bytes") == len(image)
        assert _sample(registry, "aoi_records_group_size_count") == 1  # one add, one group commit


async def test_concurrent_durable_adds_share_group_commits(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with opened(tmp_path, registry) as store:
        images = [make_image(i) for i in range(40)]
        await asyncio.gather(*(store.add([(make_record(f"g{i}", im), im)]) for i, im in enumerate(images)))
        assert _count(tmp_path) == 40
        assert _sample(registry, "aoi_records_written_total") == 40
        assert _sample(registry, "aoi_records_group_size_count") < 40  # arrivals during a commit form one group


async def test_fast_mode_returns_at_once_and_flushes_within_the_window(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with opened(tmp_path, registry, durability="fast", fast_window_ms=300) as store:
        image = make_image(2)
        started = time.monotonic()
        await store.add([(make_record("f1", image), image)])
        assert _count(tmp_path) == 0 and _sample(registry, "aoi_records_pending") == 1  # not written yet
        await _until(lambda: _count(tmp_path) == 1)
        assert time.monotonic() - started < 0.3 + 1.0  # the window, plus scheduling slack on a loaded machine
        assert _sample(registry, "aoi_records_pending") == 0


async def test_close_flushes_what_is_pending(tmp_path: Path) -> None:
    image = make_image(3)
    async with opened(tmp_path, durability="fast", fast_window_ms=10_000) as store:
        await store.add([(make_record(f"c{i}", image), image) for i in range(5)])
        assert _count(tmp_path) == 0
    assert _count(tmp_path) == 5  # close() wrote them without waiting for the window
    with _fresh(tmp_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_pagination_covers_every_row_once_newest_first(tmp_path: Path) -> None:
    async with opened(tmp_path, durability="fast", fast_window_ms=5) as store:
        for i in range(23):
            await store.add([(make_record(f"p{i}", b"x", verdict="NG" if i % 3 else "OK"), None)])
        await _until(lambda: _count(tmp_path) == 23)
        seen: list[int] = []
        cursor: str | None = None
        while True:
            items, cursor = await store.query(limit=5, cursor=cursor)
            seen += [d["seq"] for d in items]
            if cursor is None:
                break
        assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen)) == 23
        ng, cursor = await store.query(QueryFilters(verdict="NG"), limit=100)
        assert cursor is None and len(ng) == 15 and all(d["verdict"] == "NG" for d in ng)
        with pytest.raises(ValueError, match="cursor"):
            await store.query(cursor="not-a-cursor")


async def test_filters(tmp_path: Path) -> None:
    now = time.time()
    async with opened(tmp_path) as store:
        await store.add(
            [
                (make_record("a", b"1", camera_id="cam-1", part_id="P1", received_at=now - 100), None),
                (make_record("b", b"2", camera_id="cam-2", part_id="P1", detections=[PITTED], received_at=now), None),
                (make_record("c", b"3", camera_id="cam-2", verdict="OK", received_at=now + 100), None),
            ]
        )

        async def ids(**kw: Any) -> list[str]:
            items, _ = await store.query(QueryFilters(**kw))
            return [d["request_id"] for d in items]

        assert await ids() == ["c", "b", "a"]
        assert await ids(camera_id="cam-2") == ["c", "b"]
        assert await ids(part_id="P1") == ["b", "a"]
        assert await ids(verdict="OK") == ["c"]
        assert await ids(class_name="pitted_surface") == ["b"]
        assert await ids(class_name="scratches", camera_id="cam-1") == ["a"]
        assert await ids(since=now, until=now + 100) == ["b"]  # since inclusive, until exclusive
        assert await ids(camera_id="nowhere") == []


async def test_migration_from_the_first_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "records.sqlite3"
    old = sqlite3.connect(db, isolation_level=None)
    assert apply_migrations(old, MIGRATIONS[:1]) == 0  # a database written before the archive existed
    old.execute(
        """INSERT INTO inspections (request_id, image_index, received_at, camera_id, part_id, filename, model_name,
           model_version, model_hash, backend, precision, verdict, width, height, image_sha256, image_bytes, tiled,
           tiles, timings_ms) VALUES ('old', 0, ?, 'cam', NULL, NULL, 'm', '1', 'h', 'b', 'fp32', 'NG', 8, 8, 'ab',
           3, 0, 1, '{"total": 2.0}')""",
        [time.time()],  # recent: records.retention_days would delete it at the first sweep
    )
    assert old.execute("PRAGMA user_version").fetchone()[0] == 1
    old.close()
    image = make_image(4)
    async with opened(tmp_path) as store:
        (doc,) = await store.get("old")
        assert doc["image"] == {"kept": False, "path": None, "deleted_at": None, "deleted_reason": None}
        assert doc["station_id"] is None and doc["line_id"] is None  # written before station identities
        await store.add([(make_record("new", image), image)])
        assert (await store.get("new"))[0]["image"]["kept"]
    with _fresh(tmp_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 4


async def test_a_newer_or_foreign_database_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "records.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RecordsSchemaError, match="newer"):
        RecordStore(RecordsSettings(), tmp_path).start()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "records.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(RecordsSchemaError, match=r"records\.sqlite3"):
        RecordStore(RecordsSettings(), tmp_path / "other").start()
    with pytest.raises(RecordsSchemaError, match="no records database"):
        open_reader(tmp_path / "nowhere" / "records.sqlite3")


async def test_archive_keeps_ng_and_samples_ok_deterministically_at_0_and_1(tmp_path: Path) -> None:
    png = make_image(5, "png")
    async with opened(tmp_path / "a", archive=ArchiveSettings(ok_sample_rate=0.0)) as store:
        await store.add([(make_record("ng", png), png), (make_record("ok", png, index=1, verdict="OK"), png)])
        by_index = {d["image_index"]: d for d in await store.get("ng")} | {1: (await store.get("ok"))[0]}
        assert by_index[0]["image"]["kept"] and by_index[0]["image"]["path"].endswith(".png")
        assert not by_index[1]["image"]["kept"]
        assert (await store.image_file("ok", 1)).reason == "not_archived"
    async with opened(tmp_path / "b", archive=ArchiveSettings(ng=False, ok_sample_rate=1.0)) as store:
        await store.add([(make_record("ng", png), png), (make_record("ok", png, verdict="OK"), png)])
        assert not (await store.get("ng"))[0]["image"]["kept"]
        assert (await store.get("ok"))[0]["image"]["kept"]


async def test_same_bytes_are_one_file_and_the_annotated_copy_is_a_jpeg(tmp_path: Path) -> None:
    image = make_image(6, size=64)
    async with opened(tmp_path, archive=ArchiveSettings(annotated=True)) as store:
        await store.add([(make_record("d1", image), image)])
        await store.add([(make_record("d2", image), image), (make_record("d2", image, index=1), image)])
        docs = [*(await store.get("d1")), *(await store.get("d2"))]
        assert len({d["image"]["path"] for d in docs}) == 1
        assert len(list((tmp_path / "images").rglob("*.jpg"))) == 1
        found = await store.image_file("d2", 1, annotated=True)
        assert found.path is not None and found.path.name == "d2_1.jpg" and found.media_type == "image/jpeg"
        drawn = cv2.imread(str(found.path))
        assert drawn.shape == (64, 64, 3)
        plain = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(drawn.astype(int) - plain.astype(int)).max() > 100  # the box is drawn on it
        await store.add([(make_record("d1", image), image)])  # a client reusing a request id: a second copy
        assert {p.name for p in (tmp_path / "annotated").rglob("d1_*")} == {"d1_0.jpg", "d1_0-1.jpg"}


async def test_retention_by_age_marks_images_deleted_and_drops_old_records(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    now = time.time()
    old, new = make_image(7), make_image(8)
    archive = ArchiveSettings(retention_days=30)
    async with opened(tmp_path, registry, archive=archive, retention_days=90, sweep_interval_s=0.05) as store:
        await store.add(
            [
                (make_record("ancient", b"0", received_at=now - 100 * DAY), None),
                (make_record("old", old, received_at=now - 40 * DAY), old),
                (make_record("new", new, received_at=now), new),
            ]
        )
        await _until(lambda: _sample(registry, "aoi_archive_deleted_total", reason="age") == 1)
        await _until(lambda: _count(tmp_path) == 2)
        (doc,) = await store.get("old")
        assert not doc["image"]["kept"] and doc["image"]["deleted_reason"] == "age"
        assert not (tmp_path / doc["image"]["path"]).exists()
        found = await store.image_file("old", 0)
        assert found.path is None and found.reason == "deleted" and found.deleted_reason == "age"
        assert (await store.get("new"))[0]["image"]["kept"]
        assert await store.get("ancient") == []
        assert _sample(registry, "aoi_archive_bytes") == len(new)


async def test_retention_keeps_what_the_central_store_has_not_acknowledged_and_the_newest_record(
    tmp_path: Path,
) -> None:
    """Forwarding on: a record past retention is deleted only at or below the acknowledged seq; and never the newest
    record, so SQLite never hands out a seq the central store already holds."""
    now = time.time()
    acked: list[int | None] = [None]
    old = [(make_record(f"o{i}", b"x", received_at=now - 400 * DAY + i), None) for i in range(4)]
    store = RecordStore(
        RecordsSettings(retention_days=1), tmp_path, CollectorRegistry(), sweep_interval_s=0.05,
        prunable_seq=lambda: acked[0],
    )  # fmt: skip
    store.start()
    try:
        await store.add(old)
        await asyncio.sleep(0.3)
        assert _count(tmp_path) == 4  # nothing acknowledged: nothing pruned
        acked[0] = 2
        await _until(lambda: _count(tmp_path) == 2)
        assert await store.get("o0") == [] and await store.get("o2") != []
        acked[0] = 4
        await _until(lambda: _count(tmp_path) == 1)
        await asyncio.sleep(0.2)
        assert _count(tmp_path) == 1 and await store.get("o3") != []  # the newest stays
    finally:
        await store.close(5.0)


async def test_retention_by_quota_deletes_the_oldest_first(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    now = time.time()
    images = [make_image(10 + i, "png", size=300, noise=True) for i in range(4)]  # ~270 kB each, 4 > 1 MiB
    assert sum(map(len, images)) > 1024 * 1024 > sum(map(len, images[1:]))
    archive = ArchiveSettings(max_bytes=1024 * 1024)
    async with opened(tmp_path, registry, archive=archive, sweep_interval_s=0.05) as store:
        await store.add([(make_record(f"q{i}", im, received_at=now - 10 + i), im) for i, im in enumerate(images)])
        await _until(lambda: _sample(registry, "aoi_archive_deleted_total", reason="quota") == 1)
        kept = [(await store.get(f"q{i}"))[0]["image"] for i in range(4)]
        assert [k["kept"] for k in kept] == [False, True, True, True]
        assert kept[0]["deleted_reason"] == "quota" and await store.get("q0")  # the record stays
        assert _sample(registry, "aoi_archive_bytes") == sum(map(len, images[1:])) <= 1024 * 1024


async def test_orphan_files_of_a_crashed_group_are_removed_at_start(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with opened(tmp_path):
        pass
    orphan = tmp_path / "images" / "2024" / "01" / "02" / ("f" * 64 + ".jpg")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"written, never committed")
    async with opened(tmp_path, registry, sweep_interval_s=3600):
        await _until(lambda: not orphan.exists())
    assert _sample(registry, "aoi_archive_deleted_total", reason="orphan") == 1


def _fill_database(store: RecordStore) -> None:
    """Cap the database at its current size (``PRAGMA max_page_count``), so the next transaction that needs a new
    page fails inside SQLite with a genuine SQLITE_FULL, exactly as on a full disk. Simpler and more faithful than a
    tiny tmpfs (needs mount privileges) or a patched connection (a fake error). Run while the writer is idle."""
    assert store._thread is not None
    conn = store._thread.writer.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


_MANY = [dict(SCRATCH, score=0.5) for _ in range(3000)]  # a record that surely needs new pages


async def test_disk_full_with_on_failure_serve_counts_the_loss(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    image = make_image(20)
    async with opened(tmp_path, registry, on_failure="serve") as store:
        _fill_database(store)
        await store.add([(make_record("full", image, detections=_MANY), image)])  # returns: the answer is served
        assert _sample(registry, "aoi_records_lost_total", reason="disk_full") == 1
        assert _count(tmp_path) == 0
        assert not list((tmp_path / "images").rglob("*.jpg"))  # the group's file was removed again
        assert _sample(registry, "aoi_records_pending") == 0


async def test_disk_full_with_on_failure_refuse_raises_503(tmp_path: Path) -> None:
    image = make_image(21)
    async with opened(tmp_path, on_failure="refuse") as store:
        _fill_database(store)
        with pytest.raises(RecordsUnavailable, match=r"disk full.*records\.on_failure=refuse") as info:
            await store.add([(make_record("full", image, detections=_MANY), image)])
        assert status_of(info.value) == 503 and info.value.code == "records_unavailable"


async def test_slow_disk_past_max_wait_and_pending_full(tmp_path: Path) -> None:
    """Another connection holds the write lock (a stalled disk, as the writer sees it): the writer's BEGIN waits."""
    registry = CollectorRegistry()
    async with opened(tmp_path, registry, max_wait_ms=100, on_failure="refuse") as store:
        await store.add([(make_record("warm", b"w"), None)])
        blocker = sqlite3.connect(tmp_path / "records.sqlite3", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(RecordsUnavailable, match=r"records\.max_wait_ms \(100 ms\)"):
                await store.add([(make_record("slow", b"s"), None)])
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await _until(lambda: _count(tmp_path) == 2)  # it was being committed: written late, never lost
        assert _sample(registry, "aoi_records_lost_total", reason="timeout") == 0
    async with opened(tmp_path / "q", registry := CollectorRegistry(), max_wait_ms=150) as store:
        await store.add([(make_record("warm", b"w"), None)])
        blocker = sqlite3.connect(tmp_path / "q" / "records.sqlite3", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            first = asyncio.create_task(store.add([(make_record("held", b"h"), None)]))
            await _until(lambda: _sample(registry, "aoi_records_pending") == 1 and store.queue.queued == 0)
            # the writer has taken "held" into a group and waits for the lock; "queued" waits behind it
            await store.add([(make_record("queued", b"q"), None)])  # serve: returns after max_wait_ms, lost
            await first
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await _until(lambda: _sample(registry, "aoi_records_written_total") == 2)
        assert _sample(registry, "aoi_records_lost_total", reason="timeout") == 1
        assert await store.get("held") and not await store.get("queued")
    async with opened(tmp_path / "p", registry := CollectorRegistry(), durability="fast", max_pending=2) as store:
        await store.add([(make_record("p1", b"1"), None), (make_record("p2", b"2"), None)])
        await store.add([(make_record("p3", b"3"), None)])  # serve: returns, counted
        assert _sample(registry, "aoi_records_lost_total", reason="pending_full") == 1


async def test_add_after_close_is_counted(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with opened(tmp_path, registry) as store:
        pass
    await store.add([(make_record("late", b"l"), None)])
    assert _sample(registry, "aoi_records_lost_total", reason="closed") == 1


async def test_integrity_check_finds_a_corrupted_and_a_missing_image(tmp_path: Path) -> None:
    a, b = make_image(30), make_image(31)
    async with opened(tmp_path) as store:
        await store.add([(make_record("a", a), a), (make_record("b", b), b)])
        assert await store.integrity_check() == []
        path_a = tmp_path / (await store.get("a"))[0]["image"]["path"]
        path_b = tmp_path / (await store.get("b"))[0]["image"]["path"]
        path_a.write_bytes(a[:-10] + b"0123456789")
        os.remove(path_b)
        problems = await store.integrity_check()
        assert len(problems) == 2
        assert any(path_a.name in p and "sha256" in p for p in problems)
        assert any(path_b.name in p and "missing" in p for p in problems)
        assert (await store.image_file("b", 0)).reason == "missing"
        assert hashlib.sha256(a).hexdigest() in path_a.name


# The child adds one NG record (with its own image) at a time to a durable store and prints "<request id> <sha256>"
# only after add() returned: every printed line is a promise that record and image are on disk.
_CRASH_CHILD = """
import asyncio, sys
from pathlib import Path
from service.records.store import RecordStore
from service.settings import RecordsSettings
from tests.service.records_helpers import make_image, make_record

async def main(data_dir, cycle):
    store = RecordStore(RecordsSettings(durability="durable"), Path(data_dir))
    store.start()
    i = 0
    while True:
        image = make_image(cycle * 100000 + i, "png", size=64, noise=True)
        record = make_record(f"c{cycle}-{i}", image)
        await store.add([(record, image)])
        sys.stdout.write(f"{record.request_id} {record.image_sha256}\\n")
        sys.stdout.flush()
        i += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.integration
def test_sigkill_never_loses_an_acknowledged_record(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    promised: dict[str, str] = {}
    for cycle, kill_after in enumerate((5, 17, 30)):
        cmd = [sys.executable, "-c", _CRASH_CHILD, str(tmp_path), str(cycle)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root, text=True)
        assert child.stdout is not None
        lines: list[str] = []
        for line in child.stdout:
            lines.append(line)
            if len(lines) >= kill_after:
                break
        child.send_signal(signal.SIGKILL)  # mid-loop: likely inside a commit of the next record
        rest, err = child.communicate(timeout=10)
        lines += rest.splitlines(keepends=True)
        assert len(lines) >= kill_after, err
        promised |= dict(line.split() for line in lines)
    with _fresh(tmp_path) as conn:
        rows = {
            r["request_id"]: r
            for r in conn.execute(
                "SELECT i.request_id, i.image_sha256, f.path, f.sha256 FROM inspections i "
                "JOIN archive_files f ON f.id = i.image_file_id WHERE f.deleted_at IS NULL"
            )
        }
    for rid, sha in promised.items():
        assert rid in rows, f"{rid} was acknowledged but is not in the database"
        assert rows[rid]["image_sha256"] == rows[rid]["sha256"] == sha
        assert hashlib.sha256((tmp_path / rows[rid]["path"]).read_bytes()).hexdigest() == sha

    async def check() -> list[str]:
        async with opened(tmp_path) as store:
            return await store.integrity_check()

    assert asyncio.run(check()) == []
