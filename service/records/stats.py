"""NG counts and rates per hour or day, grouped by camera, part, class or model version: the station's own answer
(its SQLite journal) to the question `aoi records stats` asks; the plant's answer over every station is
:func:`service.records.central.query.ng_stats`, with the same row shape. And what the reviewers found
(:func:`review_stats`, `aoi records stats --reviews`): reviewed NG, confirmed, false calls, escapes and the false-call
rate per model version."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Literal

from service.records.query import QueryFilters
from service.records.reviews import ReviewedImage, current_reviews

__all__ = ["REVIEW_COUNTS", "REVIEW_KEYS", "STATION_KEYS", "review_stats", "station_stats"]

REVIEW_KEYS = ("model_version", "camera_id", "part_id")
REVIEW_COUNTS = ("reviewed", "reviewed_ng", "confirmed", "false_calls", "escapes", "false_call_rate")
_TRUE_DEFECT = ("confirmed", "relabelled", "added")

STATION_KEYS = ("station_id", "line_id", "camera_id", "part_id", "model_version", "class_name")
_BUCKET = {"hour": "%Y-%m-%dT%H:00:00Z", "day": "%Y-%m-%dT00:00:00Z"}


def station_stats(
    conn: sqlite3.Connection,
    group_by: Sequence[str] = ("camera_id", "class_name"),
    bucket: Literal["hour", "day"] = "hour",
    filters: QueryFilters | None = None,
) -> list[dict[str, Any]]:
    """Rows ``{bucket, <keys>, total, ng, ng_rate}`` oldest first (``bucket``: the UTC hour or day it starts, ISO
    8601). Without ``class_name`` in ``group_by``, ``ng`` counts NG verdicts; with it, one row per class that made
    inspections NG, ``ng`` counting the NG inspections with at least one detection of that class, over the group's
    ``total`` (so an inspection with two classes counts for both).

    Raises:
        ValueError: a key outside :data:`STATION_KEYS`, a bucket other than hour or day, or a verdict filter (every
            rate would be 0 or 1).
    """
    unknown = [k for k in group_by if k not in STATION_KEYS]
    if unknown or bucket not in _BUCKET:
        raise ValueError(f"group by keys among {', '.join(STATION_KEYS)} (got {unknown}) and bucket hour or day")
    base = filters or QueryFilters()
    if base.verdict is not None:
        raise ValueError("stats count both verdicts: filter on camera, part, class or time, not on the verdict")
    keys = [k for k in STATION_KEYS if k in group_by and k != "class_name"]
    clauses, params = QueryFilters(base.camera_id, base.part_id, None, None, base.since, base.until).where()
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    cols = "".join(f", i.{k}" for k in keys)
    slot = f"strftime('{_BUCKET[bucket]}', i.received_at, 'unixepoch')"
    totals = f"""SELECT {slot} AS bucket{cols}, COUNT(*) AS total, SUM(i.verdict = 'NG') AS ng
        FROM inspections i {where} GROUP BY 1{cols}"""
    if "class_name" not in group_by:
        sql, args = f"{totals} ORDER BY 1{cols}", params
    else:
        sql, args = _per_class(keys, slot, where, totals, params, base.class_name)
    rows = []
    for row in conn.execute(sql, args):
        doc = dict(row)
        doc["ng_rate"] = doc["ng"] / doc["total"] if doc["total"] else 0.0
        rows.append(doc)
    return rows


def _per_class(
    keys: list[str], slot: str, where: str, totals: str, params: list[Any], class_name: str | None
) -> tuple[str, list[Any]]:
    """Distinct NG inspections per class, joined to their group's totals."""
    cols = "".join(f", {k}" for k in keys)
    hit_where = " AND ".join(
        [c for c in (where.removeprefix("WHERE ").strip(), "i.verdict = 'NG'") if c]
        + (["d.class_name = ?"] if class_name is not None else [])
    )
    on = " AND ".join(["t.bucket = c.bucket", *(f"t.{k} IS c.{k}" for k in keys)])
    sql = f"""WITH totals AS ({totals}),
        hits AS (SELECT DISTINCT {slot} AS bucket{"".join(f", i.{k}" for k in keys)}, d.class_name, i.seq
            FROM inspections i JOIN detections d ON d.inspection_seq = i.seq WHERE {hit_where}),
        classes AS (SELECT bucket{cols}, class_name, COUNT(*) AS ng FROM hits GROUP BY bucket{cols}, class_name)
        SELECT c.bucket{"".join(f", c.{k}" for k in keys)}, c.class_name, t.total, c.ng
        FROM classes c JOIN totals t ON {on} ORDER BY 1{"".join(f", c.{k}" for k in keys)}, c.class_name"""
    return sql, [*params, *params, *([class_name] if class_name is not None else [])]


def _in(image: ReviewedImage, f: QueryFilters) -> bool:
    return (
        (f.camera_id is None or image.camera_id == f.camera_id)
        and (f.part_id is None or image.part_id == f.part_id)
        and (f.model_version is None or image.model_version == f.model_version)
        and (f.since is None or image.received_at >= f.since)
        and (f.until is None or image.received_at < f.until)
    )


def review_stats(
    conn: sqlite3.Connection, group_by: Sequence[str] = ("model_version",), filters: QueryFilters | None = None
) -> list[dict[str, Any]]:
    """Rows ``{<keys>, reviewed, reviewed_ng, confirmed, false_calls, escapes, false_call_rate}`` from every image's
    current decision (skipped ones left out), filtered on the record (camera, part, model version, time received):
    ``reviewed`` images, of which ``reviewed_ng`` the model called NG; ``confirmed`` NG images with a true defect (a
    box confirmed, relabelled or added), ``false_calls`` NG images without one (every model box a false call);
    ``escapes`` OK images with a defect the reviewer added; ``false_call_rate`` = false_calls / reviewed_ng.

    Raises:
        ValueError: a key outside :data:`REVIEW_KEYS`, or a verdict or class filter (the counts split by verdict,
            and a class is a box's, not an image's).
    """
    unknown = [k for k in group_by if k not in REVIEW_KEYS]
    f = filters or QueryFilters()
    if unknown or f.verdict is not None or f.class_name is not None:
        raise ValueError(
            f"review stats group by keys among {', '.join(REVIEW_KEYS)} (got {unknown}) and filter on camera, part, "
            "model version or time (not on the verdict or a class)"
        )
    keys = [k for k in REVIEW_KEYS if k in group_by]
    groups: dict[tuple[Any, ...], dict[str, int]] = {}
    for image in current_reviews(conn):
        if image.decision == "skipped" or not _in(image, f):
            continue
        counts = groups.setdefault(tuple(getattr(image, k) for k in keys), dict.fromkeys(REVIEW_COUNTS[:-1], 0))
        counts["reviewed"] += 1
        if image.verdict == "NG":
            counts["reviewed_ng"] += 1
            counts["confirmed" if any(b.status in _TRUE_DEFECT for b in image.boxes) else "false_calls"] += 1
        elif any(b.status == "added" for b in image.boxes):
            counts["escapes"] += 1
    rows = []
    for key in sorted(groups, key=lambda k: [(v is None, str(v)) for v in k]):
        c = groups[key]
        rate = c["false_calls"] / c["reviewed_ng"] if c["reviewed_ng"] else 0.0
        rows.append({**dict(zip(keys, key, strict=True)), **c, "false_call_rate": rate})
    return rows
