"""The Prometheus collectors of the records, the archive and the review decisions, declared once, on the app's
registry (names in docs/records.md, docs/review.md and docs/CONTRACTS.md), and the causes a record can be lost for."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LOSS_REASONS", "RecordsMetrics", "ReviewMetrics"]

LOSS_REASONS = (
    "pending_full",
    "timeout",
    "closed",
    "disk_full",
    "read_only",
    "io_error",
    "db_error",
    "internal_error",
)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class RecordsMetrics:
    """The collectors of the records and the archive, on the app's registry (names in docs/records.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.written = Counter("aoi_records_written", "Inspection records committed", registry=r)
        self.lost = Counter(
            "aoi_records_lost", "Inspection records accepted but never written, by cause", ["reason"], registry=r
        )
        self.pending = Gauge("aoi_records_pending", "Records accepted and not yet written", registry=r)
        self.commit_seconds = Histogram(
            "aoi_records_commit_seconds", "Group commit duration (files + transaction)", buckets=_COMMIT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.group_size = Histogram(
            "aoi_records_group_size", "Records per group commit", buckets=_GROUP_BUCKETS, registry=r
        )
        self.archive_images = Counter("aoi_archive_images", "Files written to the archive", registry=r)
        self.archive_bytes = Gauge("aoi_archive_bytes", "Bytes of the archived files on disk", registry=r)
        self.archive_deleted = Counter(
            "aoi_archive_deleted", "Archived files deleted, by cause (age, quota, orphan)", ["reason"], registry=r
        )
        for reason in LOSS_REASONS:
            self.lost.labels(reason=reason)
        for reason in ("age", "quota", "orphan"):
            self.archive_deleted.labels(reason=reason)


class ReviewMetrics:
    """The review decisions (docs/review.md): each decision row as it is written (an undo included), and the boxes
    of each decision (the reviewer's verdict per box; an added box is a missed defect, an escape). Counters count
    events: a decision that replaces an earlier one, or an undo, does not take the earlier boxes back (the current
    state is ``aoi records stats``'s)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.decisions = Counter(
            "aoi_review_decisions", "Review decisions written, by decision (undo included) and camera",
            ["decision", "camera_id"], registry=r,
        )  # fmt: skip
        self.boxes = Counter(
            "aoi_review_boxes", "Boxes of review decisions, by the reviewer's status, class and camera",
            ["status", "class_name", "camera_id"], registry=r,
        )  # fmt: skip
        self.escapes = Counter(
            "aoi_review_escapes", "Boxes reviewers added (defects the model missed), by class and camera",
            ["class_name", "camera_id"], registry=r,
        )  # fmt: skip
