"""Reviewed images -> a YOLO training dataset (``aoi records export-dataset --reviewed``): the way the operators'
decisions go back to training (docs/review.md, "Back to training").

What an image contributes is its current review decision (:func:`service.records.reviews.current_reviews`):
``skipped`` images are left out; a ``false_call`` image is a negative (an empty label file: nothing on it is a
defect); otherwise the boxes whose status is ``confirmed``, ``relabelled`` (with their new class) or ``added`` are the
labels and ``false_call`` boxes are dropped. Images are deduplicated by sha256 (the newest decision wins) and split
train/val by part: every image of one ``part_id`` lands in the same split, an image without a part id is a group of
its own, and the split is a function of the seed. Only archived images can be exported; every reviewed image left
out says why in the manifest and in the counts the CLI prints, never silently.

Layout under ``out`` (what ``aoi train --data out/data.yaml`` reads, :mod:`train.dataset`): ``data.yaml`` (``path``,
``train``, ``val``, ``nc``, ``names`` in class-id order), ``images/{train,val}/<sha256>.<ext>``,
``labels/{train,val}/<sha256>.txt`` (``class cx cy w h`` normalised to the image), ``manifest.json`` (options,
counts, every image with its source and split, everything skipped and why) and ``manifest.csv`` (the images).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.records.query import RecordReader
from service.records.reviews import ReviewedImage, current_reviews

__all__ = [
    "MANIFEST",
    "DatasetExportError",
    "DatasetOptions",
    "ExportReport",
    "ReviewFilters",
    "assign_splits",
    "class_names_from_records",
    "export_reviewed",
    "yolo_lines",
]

MANIFEST = "manifest.json"
LABEL_STATUSES = frozenset({"confirmed", "relabelled", "added"})  # box statuses that are defects
_READABLE = frozenset({"jpg", "png", "bmp", "tif"})  # archive extensions the trainer decodes ("bin" it cannot)
_CSV_COLUMNS = (
    "file",
    "split",
    "sha256",
    "request_id",
    "image_index",
    "inspection_seq",
    "camera_id",
    "part_id",
    "decision",
    "labels",
    "reviewer",
    "decided_at",
    "model_version",
)


class DatasetExportError(Exception):
    """The export cannot be made: ``path`` names the file or folder, ``problem`` says what is wrong."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass(frozen=True)
class ReviewFilters:
    """Which reviewed images to export; None = no filter. Times are epoch seconds on ``received_at`` (``since``
    inclusive, ``until`` exclusive), as for ``aoi records export``."""

    camera_id: str | None = None
    part_id: str | None = None
    since: float | None = None
    until: float | None = None
    model_version: str | None = None

    def admits(self, r: ReviewedImage) -> bool:
        return (
            (self.camera_id is None or r.camera_id == self.camera_id)
            and (self.part_id is None or r.part_id == self.part_id)
            and (self.model_version is None or r.model_version == self.model_version)
            and (self.since is None or r.received_at >= self.since)
            and (self.until is None or r.received_at < self.until)
        )


@dataclass(frozen=True)
class DatasetOptions:
    """``class_names``: the bundle's classes in class-id order (None: read from the records, which must name every
    id). ``val_fraction`` in [0, 1): 0 writes no val split (``val`` points at the train images)."""

    out: Path
    filters: ReviewFilters = ReviewFilters()
    class_names: Sequence[str] | None = None
    val_fraction: float = 0.2
    seed: int = 0
    force: bool = False


@dataclass(frozen=True)
class _Candidate:
    review: ReviewedImage
    labels: tuple[str, ...]
    source: Path | None = None
    ext: str = ""

    @property
    def group(self) -> str:
        """The split group: the part, or the image itself when it has no part id."""
        r = self.review
        return f"part:{r.part_id}" if r.part_id else f"image:{r.image_sha256}"


@dataclass
class ExportReport:
    """What was written and what was left out (and why): ``images`` are the manifest rows of the exported images,
    ``skipped`` the reviewed images without a usable archived file, ``duplicates`` those whose bytes a newer decision
    already exported."""

    out: Path
    class_names: list[str]
    images: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    skipped_decisions: int = 0
    filtered_out: int = 0
    dropped_boxes: int = 0

    def count(self, split: str | None = None, *, negatives: bool = False) -> int:
        rows = [i for i in self.images if split is None or i["split"] == split]
        return sum(1 for i in rows if i["labels"] == 0) if negatives else len(rows)

    def skipped_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s["reason"]] = out.get(s["reason"], 0) + 1
        return dict(sorted(out.items()))


def yolo_lines(review: ReviewedImage, index_of: dict[str, int]) -> tuple[list[str], int]:
    """The YOLO label lines of one reviewed image (``class cx cy w h``, normalised, 6 decimals) and how many defect
    boxes were dropped because nothing of them is left inside the image. A ``false_call`` decision has none."""
    if review.decision == "false_call":
        return [], 0
    w, h = float(review.width), float(review.height)
    lines: list[str] = []
    dropped = 0
    for b in review.boxes:
        if b.status not in LABEL_STATUSES:
            continue
        x1, y1, x2, y2 = (min(max(v, 0.0), side) for v, side in zip(b.box_xyxy, (w, h, w, h), strict=True))
        if x2 - x1 <= 0.0 or y2 - y1 <= 0.0:
            dropped += 1
            continue
        cx, cy, bw, bh = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h
        lines.append(f"{index_of[b.class_name]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return lines, dropped


def class_names_from_records(conn: sqlite3.Connection, reviews: Sequence[ReviewedImage], db: Path) -> list[str]:
    """The class names in class-id order as the records know them: the ``(class_id, class_name)`` of every box of
    ``reviews`` and of every detection recorded by the model versions that judged them.

    Raises:
        DatasetExportError: an id with two names or a name with two ids (records of bundles with other classes), or
            an id never seen (the records cannot name it): the bundle must be given.
    """
    versions = sorted({r.model_version for r in reviews})
    sql = f"""SELECT DISTINCT d.class_id, d.class_name FROM detections d JOIN inspections i ON i.seq = d.inspection_seq
        WHERE i.model_version IN ({",".join("?" * len(versions))})"""
    pairs = {(int(r[0]), str(r[1])) for r in conn.execute(sql, versions)}
    pairs |= {(b.class_id, b.class_name) for r in reviews for b in r.boxes}
    by_id: dict[int, set[str]] = {}
    by_name: dict[str, set[int]] = {}
    for cid, name in pairs:
        by_id.setdefault(cid, set()).add(name)
        by_name.setdefault(name, set()).add(cid)
    clash = [f"id {c} is {sorted(n)}" for c, n in sorted(by_id.items()) if len(n) > 1]
    clash += [f"{n!r} has ids {sorted(c)}" for n, c in sorted(by_name.items()) if len(c) > 1]
    if clash:
        raise DatasetExportError(
            db,
            f"the records name classes two ways ({'; '.join(clash)}): records of bundles "
            "with other classes; pass --bundle, or --model-version to export one model's",
        )
    missing = sorted(set(range(max(by_id, default=-1) + 1)) - by_id.keys())
    if not by_id or missing:
        what = f"class id(s) {missing} appear in no record" if by_id else "no class appears in any record"
        raise DatasetExportError(db, f"{what}: pass --bundle DIR to name every class of the model")
    return [next(iter(by_id[c])) for c in range(len(by_id))]


def assign_splits(sizes: dict[str, int], val_fraction: float, seed: int) -> set[str]:
    """The groups that go to val: groups in a seeded shuffle, each taken while it brings the val image count closer
    to ``val_fraction`` of all images; at least one group in val and one in train when ``val_fraction`` > 0.

    Raises:
        ValueError: ``val_fraction`` > 0 with fewer than two groups (no part-disjoint split exists).
    """
    if val_fraction <= 0.0:
        return set()
    if len(sizes) < 2:
        raise ValueError("one group only")
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(sizes.values())
    val: list[str] = []
    n_val = 0
    for g in order:
        if abs(n_val + sizes[g] - target) < abs(n_val - target):
            val.append(g)
            n_val += sizes[g]
    if not val:
        val.append(min(order, key=lambda g: sizes[g]))
    while len(val) == len(order):
        val.pop()
    return set(val)


def _select(reviews: list[ReviewedImage], filters: ReviewFilters, report: ExportReport) -> list[ReviewedImage]:
    """The reviewed images to export, deduplicated by sha256 (the newest decision of the same bytes wins)."""
    chosen = []
    for r in reviews:
        if r.decision == "skipped":
            report.skipped_decisions += 1
        elif not filters.admits(r):
            report.filtered_out += 1
        else:
            chosen.append(r)
    chosen.sort(key=lambda r: (r.decided_at, r.inspection_seq), reverse=True)
    kept: dict[str, ReviewedImage] = {}
    for r in chosen:
        if r.image_sha256 in kept:
            first = kept[r.image_sha256]
            report.duplicates.append({**_source(r), "kept": f"{first.request_id}/{first.image_index}"})
        else:
            kept[r.image_sha256] = r
    return list(kept.values())


def _source(r: ReviewedImage) -> dict[str, Any]:
    return {"request_id": r.request_id, "image_index": r.image_index, "sha256": r.image_sha256}


def _locate(reader: RecordReader, candidates: list[_Candidate], report: ExportReport) -> list[_Candidate]:
    """Each candidate with its archived file, or a ``skipped`` row saying why it has none."""
    found = []
    for c in candidates:
        r = c.review
        lookup = reader.image_file(r.request_id, r.image_index)
        ext = lookup.path.suffix.lstrip(".") if lookup.path is not None else ""
        if lookup.path is None:
            reason = {"deleted": f"deleted ({lookup.deleted_reason})"}.get(lookup.reason or "", lookup.reason)
            report.skipped.append({**_source(r), "reason": f"no archived file: {reason}"})
        elif ext not in _READABLE:
            report.skipped.append({**_source(r), "reason": f"archived as .{ext}: not an image format training reads"})
        else:
            found.append(_Candidate(r, c.labels, lookup.path, ext))
    return found


def _copy_verified(c: _Candidate, dest: Path, report: ExportReport) -> bool:
    """Copy the archived file to ``dest`` if its bytes still have the recorded sha256 (else a ``skipped`` row)."""
    assert c.source is not None
    try:
        data = c.source.read_bytes()
    except OSError as exc:
        report.skipped.append({**_source(c.review), "reason": f"archived file unreadable ({exc.strerror or exc})"})
        return False
    if hashlib.sha256(data).hexdigest() != c.review.image_sha256:
        report.skipped.append({**_source(c.review), "reason": "archived file differs from the recorded sha256"})
        return False
    dest.write_bytes(data)
    return True


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetExportError(out, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DatasetExportError(out, "exists and is not empty; choose a new directory or pass --force")
        if not (out / MANIFEST).is_file():
            raise DatasetExportError(out, f"--force only replaces an earlier export-dataset output (no {MANIFEST})")


def _split_and_write(stage: Path, copied: list[_Candidate], opts: DatasetOptions, report: ExportReport) -> None:
    """Split the copied images by group, move them into ``images/<split>``, write their labels and manifest rows."""
    sizes: dict[str, int] = {}
    for c in copied:
        sizes[c.group] = sizes.get(c.group, 0) + 1
    try:
        val = assign_splits(sizes, opts.val_fraction, opts.seed)
    except ValueError:
        (group,) = sizes
        raise DatasetExportError(
            opts.out,
            f"all {len(copied)} image(s) belong to one group ({group}): a val split "
            "apart from train needs two parts; pass --val-fraction 0 (val = the train "
            "images) or review more parts",
        ) from None
    for split in ("train", "val") if val else ("train",):
        (stage / "images" / split).mkdir(parents=True)
        (stage / "labels" / split).mkdir(parents=True)
    for c in sorted(copied, key=lambda c: c.review.image_sha256):
        split = "val" if c.group in val else "train"
        name = c.review.image_sha256
        (stage / "images" / "all" / f"{name}.{c.ext}").rename(stage / "images" / split / f"{name}.{c.ext}")
        (stage / "labels" / split / f"{name}.txt").write_text("".join(f"{x}\n" for x in c.labels), encoding="utf-8")
        report.images.append(_manifest_row(c, split))
    (stage / "images" / "all").rmdir()


def _manifest_row(c: _Candidate, split: str) -> dict[str, Any]:
    r = c.review
    return {
        "file": f"images/{split}/{r.image_sha256}.{c.ext}",
        "split": split,
        **_source(r),
        "inspection_seq": r.inspection_seq,
        "camera_id": r.camera_id,
        "part_id": r.part_id,
        "decision": r.decision,
        "labels": len(c.labels),
        "reviewer": r.reviewer,
        "decided_at": r.decided_at,
        "model_version": r.model_version,
    }


def _write_meta(stage: Path, opts: DatasetOptions, report: ExportReport, db: Path) -> None:
    """``data.yaml``, ``manifest.json`` and ``manifest.csv``."""
    has_val = any(i["split"] == "val" for i in report.images)
    data = {
        "path": ".",
        "train": "images/train",
        "val": "images/val" if has_val else "images/train",
        "nc": len(report.class_names),
        "names": list(report.class_names),
    }
    head = f"# aoi records export-dataset --reviewed from {db} ({len(report.images)} images; manifest.json)\n"
    if not has_val:
        head += "# --val-fraction 0: val is the train images (it measures nothing held out)\n"
    (stage / "data.yaml").write_text(head + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    manifest = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "database": str(db),
        "filters": {k: v for k, v in vars(opts.filters).items() if v is not None},
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "classes": list(report.class_names),
        "counts": _counts(report),
        "images": report.images,
        "skipped": report.skipped,
        "duplicates": report.duplicates,
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with (stage / "manifest.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(report.images)


def _counts(report: ExportReport) -> dict[str, Any]:
    return {
        "images": report.count(),
        "train": report.count("train"),
        "val": report.count("val"),
        "negatives": report.count(negatives=True),
        "boxes": sum(int(i["labels"]) for i in report.images),
        "skipped": report.skipped_by_reason(),
        "duplicates": len(report.duplicates),
        "skipped_decisions": report.skipped_decisions,
        "filtered_out": report.filtered_out,
        "boxes_outside_image": report.dropped_boxes,
    }


def export_reviewed(conn: sqlite3.Connection, data_dir: Path, db: Path, opts: DatasetOptions) -> ExportReport:
    """Write the reviewed images of the records database ``conn`` (under ``data_dir``) as a YOLO dataset at
    ``opts.out``: built in ``.<out>.partial`` beside it and renamed into place, so a failure leaves ``out`` as it was.

    Raises:
        DatasetExportError: no reviewed image matches, classes cannot be named, no archived file is left, ``out`` is
            in the way, or the split is impossible; nothing is written then.
    """
    if not 0.0 <= opts.val_fraction < 1.0:
        raise DatasetExportError("--val-fraction", f"must be in [0, 1), got {opts.val_fraction}")
    _check_out(opts.out, opts.force)
    reviews = list(current_reviews(conn))
    report = ExportReport(opts.out, [])
    chosen = _select(reviews, opts.filters, report)
    if not chosen:
        raise DatasetExportError(
            db,
            f"no reviewed image to export ({len(reviews)} reviewed, "
            f"{report.skipped_decisions} skipped decisions, {report.filtered_out} "
            "outside the filters): review images first (docs/review.md)",
        )
    if opts.class_names is None:
        versions = {r.model_version for r in chosen}  # a model names its classes: its reviews beyond the filters too
        names = class_names_from_records(conn, [r for r in reviews if r.model_version in versions], db)
    else:
        names = list(opts.class_names)
    report.class_names = names
    candidates = _label(chosen, names, report, opts.out)
    located = _locate(RecordReader(conn, data_dir), candidates, report)
    out = opts.out.absolute()
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "images" / "all").mkdir(parents=True)
    try:
        copied = [
            c
            for c in located
            if _copy_verified(c, stage / "images" / "all" / f"{c.review.image_sha256}.{c.ext}", report)
        ]
        if not copied:
            raise DatasetExportError(
                data_dir,
                f"none of the {len(chosen)} reviewed image(s) has its archived file "
                f"({_reasons(report)}): only archived images can be exported",
            )
        _split_and_write(stage, copied, opts, report)
        _write_meta(stage, opts, report, db)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def _label(chosen: list[ReviewedImage], names: list[str], report: ExportReport, out: Path) -> list[_Candidate]:
    index_of = {n: i for i, n in enumerate(names)}
    unknown = sorted({b.class_name for r in chosen for b in r.boxes if b.status in LABEL_STATUSES} - index_of.keys())
    if unknown:
        raise DatasetExportError(
            out,
            f"reviewed boxes of class(es) {unknown} not among the classes {names}: "
            "export one model's reviews (--model-version) with its bundle",
        )
    out_list = []
    for r in chosen:
        lines, dropped = yolo_lines(r, index_of)
        report.dropped_boxes += dropped
        out_list.append(_Candidate(r, tuple(lines)))
    return out_list


def _reasons(report: ExportReport) -> str:
    return ", ".join(f"{n} {why}" for why, n in report.skipped_by_reason().items()) or "none found"
