"""Per-class score thresholds re-fitted from the operators' review decisions (``aoi calibrate-reviews``;
docs/review.md, "Back to training").

The evidence per class is every detection the model recorded on a reviewed image, labelled by the reviewer:
``confirmed`` is a true positive, ``false_call`` a false positive, and a box ``relabelled`` from this class to another
one a false positive too (the class was wrong: export's calibration also matches a detection only to ground truth of
its own class). The ground truth of a class counts its confirmed detections plus the defects of that class the model
did not flag as it: boxes the reviewer ``added`` and boxes relabelled *to* it (their score for the new class was
never recorded, so no threshold of the new class can be said to catch them). The threshold is then chosen by
:func:`export.calibrate.calibrate_class`, the rule of ``aoi export``'s calibration (best F1, or the highest threshold
reaching a target recall).

What the records can and cannot say: the service records only detections at or above the threshold it ran with, so
a threshold can be raised on evidence but never lowered (the detections it would add were never recorded); a new
threshold is at least the old one, and a class whose best cut keeps every reviewed detection keeps its old
threshold. Escapes are known only where a reviewer added a box, mostly on sampled OK images: "lost" counts the
confirmed defects a raised threshold would no longer flag, the escapes it would create among what was reviewed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.calibrate import MAX_THRESHOLD, Mode, calibrate_class
from export.report import table_lines
from service.core.bundle import ModelBundle
from service.records.reviews import ReviewedImage

__all__ = ["ClassChange", "Recalibration", "RecalibrationOptions", "format_table", "recalibrate", "updated_bundle"]


@dataclass(frozen=True)
class RecalibrationOptions:
    mode: Mode = "f1"
    target_recall: float = 0.9
    min_reviewed: int = 10  # fewer reviewed detections of a class: its threshold is kept


@dataclass(frozen=True)
class _Detection:
    image: int  # index of the reviewed image
    class_name: str
    score: float
    area: float
    status: str  # confirmed | false_call | relabelled (away from this class)


@dataclass(frozen=True)
class ClassChange:
    """One class: its old and new threshold, and what the reviewed detections would become under the new one."""

    name: str
    old: float
    new: float
    reviewed: int  # the model's detections of this class on reviewed images
    false_calls: tuple[int, int]  # (now, after)
    confirmed: tuple[int, int]  # true defects flagged (now, after): now - after = new escapes among the reviewed
    relabelled: tuple[int, int]  # real defects of another class flagged as this one (now, after)
    missed: int  # added boxes + boxes relabelled to this class: not flagged as this class at any threshold >= old
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "threshold": self.new,
            "reviewed": self.reviewed,
            "false_calls": self.false_calls[0],
            "false_calls_after": self.false_calls[1],
            "confirmed": self.confirmed[0],
            "confirmed_after": self.confirmed[1],
            "relabelled": self.relabelled[0],
            "relabelled_after": self.relabelled[1],
            "missed": self.missed,
            **({"note": self.note} if self.note else {}),
        }


@dataclass
class Recalibration:
    """The per-class changes and the image-level consequences (NG verdicts under the bundle's verdict rule)."""

    classes: list[ClassChange]
    images: int  # reviewed images used (skipped decisions and other models' images left out)
    false_call_images: tuple[int, int] = (0, 0)  # NG images without a real defect (now, after)
    defective_caught: tuple[int, int] = (0, 0)  # NG images with a real defect (now, after)
    escapes_found: int = 0  # OK images on which a reviewer added a defect

    @property
    def thresholds(self) -> dict[str, float]:
        return {c.name: c.new for c in self.classes}

    @property
    def changed(self) -> bool:
        return any(c.new != c.old for c in self.classes)


def _evidence(reviews: list[ReviewedImage], names: list[str]) -> tuple[list[_Detection], dict[str, int]]:
    """The model's reviewed detections, and per class the defects it did not flag as that class."""
    detections: list[_Detection] = []
    missed = dict.fromkeys(names, 0)
    for i, r in enumerate(reviews):
        for b in r.boxes:
            if b.status == "added":
                missed[b.class_name] = missed.get(b.class_name, 0) + 1
                continue
            if b.score is None:
                continue
            name = b.class_name
            if b.status == "relabelled":
                missed[b.class_name] = missed.get(b.class_name, 0) + 1
                if b.original_class_id is not None and 0 <= b.original_class_id < len(names):
                    name = names[b.original_class_id]
            x1, y1, x2, y2 = b.box_xyxy
            detections.append(_Detection(i, name, float(b.score), max(0.0, x2 - x1) * max(0.0, y2 - y1), b.status))
    return detections, missed


def _choose(
    name: str, old: float, dets: list[_Detection], missed: int, opts: RecalibrationOptions
) -> tuple[float, str]:
    """The new threshold of one class (never below ``old``) and why, when it stays."""
    if len(dets) < opts.min_reviewed:
        return old, f"{len(dets)} reviewed detection(s) < --min-reviewed {opts.min_reviewed}: kept"
    order = sorted(dets, key=lambda d: -d.score)
    scores = np.asarray([d.score for d in order], dtype=np.float64)
    tp = np.asarray([d.status == "confirmed" for d in order], dtype=bool)
    if not tp.any():
        return old, "no confirmed defect among its reviewed detections: nothing to weigh the false calls against; kept"
    cal = calibrate_class(name, scores, tp, int(tp.sum()) + missed, opts.mode, opts.target_recall)
    if float(scores[-1]) >= cal.threshold:  # the best cut keeps every reviewed detection
        note = "the best cut keeps every reviewed detection; lower thresholds were never recorded: kept"
        return old, f"{note} ({cal.note})" if cal.note else note
    return min(max(cal.threshold, old), MAX_THRESHOLD), cal.note


def _count(dets: list[_Detection], status: str, threshold: float) -> tuple[int, int]:
    sel = [d for d in dets if d.status == status]
    return len(sel), sum(1 for d in sel if d.score >= threshold)


def recalibrate(reviews: Iterable[ReviewedImage], bundle: ModelBundle, opts: RecalibrationOptions) -> Recalibration:
    """New per-class thresholds for ``bundle`` from the current decisions ``reviews`` (already narrowed to the
    images this bundle's model judged); ``skipped`` decisions are left out. Writes nothing."""
    used = [r for r in reviews if r.decision != "skipped"]
    detections, missed = _evidence(used, bundle.classes)
    changes = []
    for name, old in zip(bundle.classes, bundle.thresholds(), strict=True):
        dets = [d for d in detections if d.class_name == name]
        new, note = _choose(name, old, dets, missed.get(name, 0), opts)
        low = min((d.score for d in dets), default=old)
        if low < old - 1e-6:
            note = f"{note}; " if note else ""
            note += f"scores down to {low:.3f} recorded: the service ran below the bundle's {old:g} (settings override)"
        changes.append(
            ClassChange(
                name,
                old,
                new,
                len(dets),
                _count(dets, "false_call", new),
                _count(dets, "confirmed", new),
                _count(dets, "relabelled", new),
                missed.get(name, 0),
                note,
            )
        )
    result = Recalibration(changes, len(used))
    _image_effects(result, used, detections, bundle)
    return result


def _image_effects(
    result: Recalibration, used: list[ReviewedImage], detections: list[_Detection], bundle: ModelBundle
) -> None:
    """NG images without a real defect, and with one, now and under the new thresholds (the bundle's verdict rule:
    reject classes and minimum box area); OK images where a reviewer found a defect."""
    rule = bundle.verdict
    rejects = set(rule.reject_classes) if rule.reject_classes is not None else set(bundle.classes)
    new = result.thresholds
    ng_after = {
        d.image
        for d in detections
        if d.class_name in rejects and d.area >= rule.min_box_area and d.score >= new[d.class_name]
    }
    fc = [0, 0]
    caught = [0, 0]
    for i, r in enumerate(used):
        defective = any(b.status in ("confirmed", "relabelled", "added") for b in r.boxes)
        if r.verdict == "NG":
            tally = caught if defective else fc
            tally[0] += 1
            tally[1] += i in ng_after
        elif defective:
            result.escapes_found += 1
    result.false_call_images = (fc[0], fc[1])
    result.defective_caught = (caught[0], caught[1])


def format_table(result: Recalibration) -> str:
    """The per-class table and the image-level lines, as ``aoi calibrate-reviews`` prints them."""
    head = ["class", "old", "new", "reviewed", "false calls", "defects kept", "lost", "relabelled", "missed", "note"]
    rows = [
        [
            c.name,
            f"{c.old:.4f}",
            f"{c.new:.4f}",
            str(c.reviewed),
            f"{c.false_calls[0]} -> {c.false_calls[1]}",
            f"{c.confirmed[0]} -> {c.confirmed[1]}",
            str(c.confirmed[0] - c.confirmed[1]),
            f"{c.relabelled[0]} -> {c.relabelled[1]}",
            str(c.missed),
            c.note,
        ]
        for c in result.classes
    ]
    fc, caught = result.false_call_images, result.defective_caught
    lines = [
        *(line.rstrip() for line in table_lines(head, rows)),
        "",
        f"reviewed images: {result.images}; NG images that were false calls: {fc[0]} -> {fc[1]}; NG images with a "
        f"real defect: {caught[0]} -> {caught[1]} ({caught[0] - caught[1]} new escape(s) among the reviewed)",
        f"escapes reviewers found on OK images: {result.escapes_found} (no threshold at or above the old one "
        "catches them: they are training data, not a threshold question)",
        "thresholds only rise: the records hold no detection below the threshold the service ran with",
    ]
    return "\n".join(lines)


def updated_bundle(bundle: ModelBundle, result: Recalibration, version: str, source: dict[str, Any]) -> ModelBundle:
    """``bundle`` with the new thresholds (every class listed), a ``calibration.reviews`` record and ``version``;
    the bundle format is unchanged."""
    calibration = dict(bundle.calibration or {})
    calibration["reviews"] = {
        **source,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from_version": bundle.version,
        "images": result.images,
        "per_class": {c.name: c.to_json() for c in result.classes},
    }
    post = bundle.postprocess.model_copy(update={"score_thresholds": result.thresholds})
    return bundle.model_copy(update={"postprocess": post, "calibration": calibration, "version": version})
