"""NG counts and rates per hour or day, grouped by camera, part, class or model version: the station's own answer
(its SQLite journal) to the question `aoi records stats` asks; the plant's answer over every station is
:func:`service.records.central.query.ng_stats`, with the same row shape."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Literal

from service.records.query import QueryFilters

__all__ = ["STATION_KEYS", "station_stats"]

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
