"""Plant-wide queries on the central database: the station's record filters plus station and line, newest first with
keyset pagination, and NG rates per station/camera/class and hour or day. Synchronous, on a psycopg 3 connection.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from service.records.query import QueryFilters
from service.records.record import InspectionRecord

__all__ = [
    "GROUP_KEYS",
    "REVIEW_GROUP_KEYS",
    "PlantFilters",
    "decode_plant_cursor",
    "encode_plant_cursor",
    "ng_stats",
    "query_records",
    "review_stats",
]

GROUP_KEYS = ("station_id", "line_id", "camera_id", "part_id", "class_name")
REVIEW_GROUP_KEYS = ("station_id", "line_id", "model_version", "camera_id", "part_id")
# Every image's current review decision: per (station, record) the newest decision that is no undo and not undone.
_CURRENT_REVIEWS = """SELECT DISTINCT ON (r.station_id, r.inspection_seq) r.* FROM reviews r
    WHERE r.decision <> 'undo' AND NOT EXISTS (
        SELECT 1 FROM reviews u WHERE u.station_id = r.station_id AND u.undoes = r.review_seq)
    ORDER BY r.station_id, r.inspection_seq, r.review_seq DESC"""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# InspectionRecord.to_dict keys, in its order (station_id and line_id lead a central row instead)
_RECORD_FIELDS = tuple(f.name for f in fields(InspectionRecord) if f.name not in ("station_id", "line_id"))


def _time(epoch: float) -> datetime:
    return _EPOCH + timedelta(seconds=epoch)


@dataclass(frozen=True)
class PlantFilters:
    """The station's :class:`~service.records.query.QueryFilters` plus ``station_id`` and ``line_id``; None = no
    filter. Times in epoch seconds, ``since`` inclusive, ``until`` exclusive."""

    station_id: str | None = None
    line_id: str | None = None
    camera_id: str | None = None
    part_id: str | None = None
    verdict: str | None = None
    class_name: str | None = None
    since: float | None = None
    until: float | None = None

    @classmethod
    def of(cls, filters: QueryFilters, *, station_id: str | None = None, line_id: str | None = None) -> PlantFilters:
        """The station's filters, widened to the plant."""
        return cls(
            station_id,
            line_id,
            filters.camera_id,
            filters.part_id,
            filters.verdict,
            filters.class_name,
            filters.since,
            filters.until,
        )

    def where(self, alias: str = "i", columns: Sequence[str] | None = None) -> tuple[list[str], list[Any]]:
        """SQL conditions (psycopg placeholders) on table ``alias`` for the set filters, limited to ``columns``
        (None: all; ``class_name`` becomes an EXISTS on detections unless the table is detections itself)."""
        wanted = set(columns) if columns is not None else None
        clauses: list[str] = []
        params: list[Any] = []
        for column in ("station_id", "line_id", "camera_id", "part_id", "verdict"):
            value = getattr(self, column)
            if value is not None and (wanted is None or column in wanted):
                clauses.append(f"{alias}.{column} = %s")
                params.append(value)
        if self.class_name is not None and (wanted is None or "class_name" in wanted):
            if wanted is not None:
                clauses.append(f"{alias}.class_name = %s")
            else:
                clauses.append(
                    f"EXISTS (SELECT 1 FROM detections x WHERE x.station_id = {alias}.station_id "
                    f"AND x.seq = {alias}.seq AND x.class_name = %s)"
                )
            params.append(self.class_name)
        if wanted is None or "received_at" in wanted:
            if self.since is not None:
                clauses.append(f"{alias}.received_at >= %s")
                params.append(_time(self.since))
            if self.until is not None:
                clauses.append(f"{alias}.received_at < %s")
                params.append(_time(self.until))
        return clauses, params


def encode_plant_cursor(received_at: datetime, station_id: str, seq: int) -> str:
    """The opaque cursor after one row (clients must not build it: its form may change)."""
    micros = (received_at - _EPOCH) // _US
    return base64.urlsafe_b64encode(json.dumps([micros, station_id, seq]).encode()).decode().rstrip("=")


def decode_plant_cursor(cursor: str) -> tuple[datetime, str, int]:
    """Raises: ValueError for anything :func:`encode_plant_cursor` did not make."""
    try:
        doc = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        doc = None
    if not (
        isinstance(doc, list)
        and len(doc) == 3
        and isinstance(doc[0], int)
        and isinstance(doc[1], str)
        and isinstance(doc[2], int)
    ):
        raise ValueError(f"cursor {cursor[:64]!r} is not one this API returned (take next_cursor as it is)")
    return _EPOCH + doc[0] * _US, doc[1], doc[2]


_SELECT = """SELECT i.*, img.object_key AS image_key, img.sha256 AS image_object_sha256, img.state AS image_state,
        img.bytes AS image_object_bytes
    FROM inspections i LEFT JOIN images img ON img.station_id = i.station_id AND img.seq = i.seq AND img.kind = 'image'
"""
_DETECTIONS = """SELECT d.station_id, d.seq, d.class_id, d.class_name, d.score, d.x1, d.y1, d.x2, d.y2
    FROM detections d JOIN unnest(%s::text[], %s::bigint[]) AS k (station_id, seq) USING (station_id, seq)
    ORDER BY d.station_id, d.seq, d.ordinal"""


def query_records(
    conn: psycopg.Connection[Any], filters: PlantFilters, limit: int = 100, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Up to ``limit`` records matching ``filters``, newest first (by received_at, then station and seq), after
    ``cursor``; and the next page's cursor (None on the last). Rows have the station's JSON shape (the fields of
    ``InspectionRecord.to_dict``, received_at in epoch seconds) plus ``station_id``, ``line_id``, ``seq`` and
    ``image`` (``{state, object_key, sha256, bytes}`` or None when the station archived no image; state ``pending``
    until the upload is verified, then ``stored``, or ``missing`` when the station's file was deleted first).

    Raises:
        ValueError: a cursor this API did not return.
    """
    clauses, params = filters.where()
    if cursor is not None:
        clauses.append("(i.received_at, i.station_id, i.seq) < (%s, %s, %s)")
        params.extend(decode_plant_cursor(cursor))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"{_SELECT} {where} ORDER BY i.received_at DESC, i.station_id DESC, i.seq DESC LIMIT %s"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql, [*params, limit + 1]).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        keys = ([r["station_id"] for r in rows], [r["seq"] for r in rows])
        detections: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for d in cur.execute(_DETECTIONS, keys).fetchall() if rows else []:
            detections.setdefault((d["station_id"], d["seq"]), []).append(
                {
                    "class_id": d["class_id"],
                    "class_name": d["class_name"],
                    "score": d["score"],
                    "box_xyxy": [d["x1"], d["y1"], d["x2"], d["y2"]],
                }
            )
    docs = [_to_dict(r, detections.get((r["station_id"], r["seq"]), [])) for r in rows]
    last = rows[-1] if rows else None
    return docs, encode_plant_cursor(last["received_at"], last["station_id"], last["seq"]) if more and last else None


def _to_dict(row: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, Any]:
    values = {**row, "received_at": (row["received_at"] - _EPOCH) / timedelta(seconds=1), "detections": detections}
    doc: dict[str, Any] = {"station_id": row["station_id"], "line_id": row["line_id"], "seq": row["seq"]}
    doc.update((name, values[name]) for name in _RECORD_FIELDS)
    doc["timings_ms"] = {k: float(v) for k, v in doc["timings_ms"].items()}
    doc["image"] = (
        None
        if row["image_key"] is None
        else {
            "state": row["image_state"],
            "object_key": row["image_key"],
            "sha256": row["image_object_sha256"],
            "bytes": row["image_object_bytes"],
        }
    )
    return doc


def ng_stats(
    conn: psycopg.Connection[Any],
    group_by: Sequence[str] = ("station_id", "camera_id", "class_name"),
    bucket: Literal["hour", "day"] = "hour",
    since: float | None = None,
    until: float | None = None,
    filters: PlantFilters | None = None,
) -> list[dict[str, Any]]:
    """NG counts and rates per UTC ``bucket`` and ``group_by`` keys (a subset of :data:`GROUP_KEYS`), oldest first.

    Each row: ``bucket`` (ISO 8601 UTC start), the keys, ``total`` (inspections in the group), ``ng`` and ``ng_rate``
    (``ng / total``). Without ``class_name`` in ``group_by``, ``ng`` counts NG verdicts; with it, one row per class
    that occurred and ``ng`` counts the NG inspections with at least one detection of that class (so a class's rate
    says how often it made the group's parts NG; an inspection with two classes counts for both). ``since``/``until``
    (epoch s, inclusive/exclusive) take precedence over ``filters``' times; ``filters.class_name`` limits the classes.

    Raises:
        ValueError: an unknown key or bucket, or a verdict filter (it would make every rate 0 or 1).
    """
    unknown = [k for k in group_by if k not in GROUP_KEYS]
    if unknown or bucket not in ("hour", "day"):
        raise ValueError(f"group_by must be among {GROUP_KEYS} (got {unknown}) and bucket hour or day (got {bucket!r})")
    base = filters or PlantFilters()
    if base.verdict is not None:
        raise ValueError("ng_stats counts both verdicts: filter on station, line, camera, part, class or time")
    base = replace(
        base,
        since=since if since is not None else base.since,
        until=until if until is not None else base.until,
    )
    keys = [k for k in GROUP_KEYS if k in group_by and k != "class_name"]
    totals_sql, totals_params = _totals(keys, base, bucket)
    if "class_name" not in group_by:
        sql, params = totals_sql, totals_params
    else:
        sql, params = _per_class(keys, base, bucket, totals_sql, totals_params)
    out = []
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(sql, params):
            row["bucket"] = row["bucket"].astimezone(UTC).isoformat().replace("+00:00", "Z")
            row["ng_rate"] = row["ng"] / row["total"] if row["total"] else 0.0
            out.append(row)
    return out


def _totals(keys: list[str], filters: PlantFilters, bucket: str) -> tuple[str, list[Any]]:
    """Inspections and NG verdicts per bucket and keys."""
    clauses, params = replace(filters, verdict=None, class_name=None).where("i")
    cols = "".join(f", i.{k}" for k in keys)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"""SELECT date_trunc(%s, i.received_at, 'UTC') AS bucket{cols}, count(*) AS total,
            count(*) FILTER (WHERE i.verdict = 'NG') AS ng
        FROM inspections i {where} GROUP BY 1{cols} ORDER BY 1{cols}"""
    return sql, [bucket, *params]


def _per_class(
    keys: list[str], filters: PlantFilters, bucket: str, totals_sql: str, totals_params: list[Any]
) -> tuple[str, list[Any]]:
    """Per class: distinct NG inspections with that class, joined to the group's totals. Answered from the
    detections' covering index alone unless a key or filter needs the inspection row (line, camera, part)."""
    inspection_only = {"line_id", "camera_id", "part_id"}
    join = bool(inspection_only & set(keys)) or any(getattr(filters, k) is not None for k in inspection_only)
    d_clauses, d_params = filters.where("d", ("station_id", "class_name", "received_at"))
    i_clauses, i_params = filters.where("i", tuple(inspection_only)) if join else ([], [])
    source = "detections d"
    if join:
        source += " JOIN inspections i ON i.station_id = d.station_id AND i.seq = d.seq"
    hit_cols = "".join(f", {'d' if k == 'station_id' else 'i'}.{k}" for k in keys)
    where = " AND ".join(["d.verdict = 'NG'", *d_clauses, *i_clauses])
    cols = "".join(f", {k}" for k in keys)
    on = " AND ".join(["t.bucket = c.bucket", *(f"t.{k} IS NOT DISTINCT FROM c.{k}" for k in keys)])
    sql = f"""WITH totals AS ({totals_sql}),
        hits AS (SELECT DISTINCT date_trunc(%s, d.received_at, 'UTC') AS bucket{hit_cols}, d.class_name,
                d.station_id AS hit_station, d.seq AS hit_seq
            FROM {source} WHERE {where}),
        classes AS (SELECT bucket{cols}, class_name, count(*) AS ng FROM hits GROUP BY bucket{cols}, class_name)
        SELECT c.bucket{"".join(f", c.{k}" for k in keys)}, c.class_name, t.total, c.ng
        FROM classes c JOIN totals t ON {on} ORDER BY 1{cols.replace(", ", ", c.")}, c.class_name"""
    return sql, [*totals_params, bucket, *d_params, *i_params]


def review_stats(
    conn: psycopg.Connection[Any], group_by: Sequence[str] = ("model_version",), filters: PlantFilters | None = None
) -> list[dict[str, Any]]:
    """:func:`service.records.stats.review_stats` over the plant: the same rows from every station's current
    decisions (forwarded with the records), grouped by :data:`REVIEW_GROUP_KEYS`.

    Raises:
        ValueError: an unknown key, or a verdict or class filter.
    """
    unknown = [k for k in group_by if k not in REVIEW_GROUP_KEYS]
    f = filters or PlantFilters()
    if unknown or f.verdict is not None or f.class_name is not None:
        raise ValueError(f"group_by must be among {REVIEW_GROUP_KEYS} (got {unknown}); no verdict or class filter")
    keys = [k for k in REVIEW_GROUP_KEYS if k in group_by]
    clauses, params = f.where("i")
    where = " AND ".join(["c.decision <> 'skipped'", *clauses])
    cols = "".join(f", i.{k}" for k in keys)
    true_defect = "EXISTS (SELECT 1 FROM jsonb_array_elements(c.boxes) b WHERE b->>'status' IN ({}))"
    confirmed = true_defect.format("'confirmed', 'relabelled', 'added'")
    sql = f"""SELECT {", ".join([*(f"i.{k}" for k in keys), "count(*) AS reviewed"])},
            count(*) FILTER (WHERE i.verdict = 'NG') AS reviewed_ng,
            count(*) FILTER (WHERE i.verdict = 'NG' AND {confirmed}) AS confirmed,
            count(*) FILTER (WHERE i.verdict = 'NG' AND NOT {confirmed}) AS false_calls,
            count(*) FILTER (WHERE i.verdict = 'OK' AND {true_defect.format("'added'")}) AS escapes
        FROM ({_CURRENT_REVIEWS}) c JOIN inspections i ON i.station_id = c.station_id AND i.seq = c.inspection_seq
        WHERE {where} {f"GROUP BY {cols.lstrip(', ')} ORDER BY {cols.lstrip(', ')}" if keys else ""}"""
    out = []
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(sql, params):
            if not keys and not row["reviewed"]:
                continue  # no group: one row of zeros when nothing was reviewed
            row["false_call_rate"] = row["false_calls"] / row["reviewed_ng"] if row["reviewed_ng"] else 0.0
            out.append(row)
    return out
