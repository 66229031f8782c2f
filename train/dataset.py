"""Detection datasets on disk -> in-memory records: Pascal VOC folders (NEU-DET layout) and Ultralytics YOLO datasets.

Boxes come out as 0-based ``xyxy`` in original-image pixels. VOC coordinates are 1-based, so every VOC corner gets
``- 1`` (x1 = xmin - 1, ..., x2 = xmax - 1: width stays xmax - xmin), the convention that reproduces the GRACE
paper's NEU-DET size statistics. Malformed annotations are never dropped silently: every problem in the split is
collected and raised together in one :class:`DatasetError` that names each file.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import yaml

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "DatasetSplit",
    "ImageRecord",
    "image_size_stats",
    "load_split",
    "read_image",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Folder names accepted for a VOC dataset, in order of preference (NEU-DET layout first, then standard VOC).
_VOC_IMAGE_DIRS = ("IMAGES", "images", "JPEGImages")
_VOC_ANNOTATION_DIRS = ("ANNOTATIONS", "Annotations", "annotations")
_VOC_SPLIT_DIRS = ("splits", "ImageSets/Main")
_MAX_LISTED_PROBLEMS = 50


class DatasetError(Exception):
    """A dataset file is missing or malformed.

    ``path`` names the file (or the dataset root when several files are bad), ``problem`` says what is wrong and
    ``problems`` lists every ``(file, problem)`` found, so a user can fix them all in one pass.
    """

    def __init__(self, path: Path | str, problem: str, problems: Sequence[tuple[Path, str]] | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        self.problems: list[tuple[Path, str]] = list(problems) if problems else [(self.path, problem)]
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class ImageRecord:
    """One image and its ground truth.

    ``boxes_xyxy`` is ``(n, 4) float32`` in original-image pixels, 0-based, ``x1 < x2 <= width``;
    ``class_ids`` is ``(n,) int64`` indexing :attr:`DatasetSplit.class_names`; ``stem`` is the file stem, used as
    the COCO ``image_id``.
    """

    path: Path
    width: int
    height: int
    boxes_xyxy: npt.NDArray[np.float32]
    class_ids: npt.NDArray[np.int64]
    stem: str


@dataclass(frozen=True)
class DatasetSplit:
    """The records of one split (``train``/``val``/...) and the dataset's class names (shared by all its splits)."""

    class_names: list[str]
    records: list[ImageRecord]
    root: Path
    split: str

    @property
    def num_instances(self) -> int:
        return int(sum(len(r.class_ids) for r in self.records))

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Instances per class, ``(nc,) int64``."""
        counts = np.zeros(len(self.class_names), dtype=np.int64)
        for r in self.records:
            np.add.at(counts, r.class_ids, 1)
        return counts


def image_size_stats(split: DatasetSplit) -> dict[str, float]:
    """Median width, height and long side of a split's images (from the annotations), in pixels: the scale a
    detector trained on them saw its defects at (``aoi export`` derives the served tile size from it)."""
    widths = np.asarray([r.width for r in split.records], np.float64)
    heights = np.asarray([r.height for r in split.records], np.float64)
    if widths.size == 0:
        return {}
    return {
        "images": int(widths.size),
        "median_width": float(np.median(widths)),
        "median_height": float(np.median(heights)),
        "median_long_side": float(np.median(np.maximum(widths, heights))),
    }


def read_image(path: Path | str) -> npt.NDArray[np.uint8]:
    """Read an image file with OpenCV as ``HWC uint8 RGB`` (greyscale and RGBA files become 3-channel RGB)."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode also handles non-ASCII paths
    except OSError as exc:
        raise DatasetError(path, f"cannot read image: {exc.strerror or exc}") from exc
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise DatasetError(path, "not a readable image (OpenCV could not decode it)")
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def load_split(data: Path | str, split: str) -> DatasetSplit:
    """Load one split of a VOC folder or a YOLO dataset.

    Args:
        data: a VOC folder (``IMAGES/``, ``ANNOTATIONS/``, ``splits/<split>.txt``; standard ``JPEGImages/``,
            ``Annotations/``, ``ImageSets/Main/`` also work), a folder holding ``data.yaml``, or a YAML file.
        split: split name, e.g. ``"train"`` or ``"val"``.

    Raises:
        DatasetError: the dataset is missing, or any annotation is malformed (all problems listed at once).
    """
    data = Path(data)
    if not data.exists():
        raise DatasetError(data, "dataset not found (expected a VOC folder, a folder with data.yaml, or a YAML file)")
    if data.is_file():
        return _load_yolo(data, split)
    if (data / "data.yaml").is_file():
        return _load_yolo(data / "data.yaml", split)
    if _first_dir(data, _VOC_ANNOTATION_DIRS) is not None:
        return _load_voc(data, split)
    raise DatasetError(
        data, "not a dataset: no data.yaml and no ANNOTATIONS/ folder (see docs/data-and-evaluation.md for the formats)"
    )


# --------------------------------------------------------------------------------------------------------- shared


def _first_dir(root: Path, names: Iterable[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _raise_problems(root: Path, problems: list[tuple[Path, str]]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        raise DatasetError(problems[0][0], problems[0][1], problems)
    lines = [f"  {p}: {msg}" for p, msg in problems[:_MAX_LISTED_PROBLEMS]]
    if len(problems) > _MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more")
    raise DatasetError(root, f"{len(problems)} malformed annotation(s):\n" + "\n".join(lines), problems)


def _check_boxes(boxes: npt.NDArray[np.float64], width: int, height: int) -> str | None:
    """Problem with a set of 0-based xyxy boxes, or None. Allows 0.5 px of rounding outside the image."""
    if boxes.size == 0:
        return None
    if not np.isfinite(boxes).all():
        return "box coordinate is not a finite number"
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        return f"degenerate box (x2 <= x1 or y2 <= y1): {boxes[bad][0].round(2).tolist()}"
    tol = 0.5
    out = (boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > width + tol) | (boxes[:, 3] > height + tol)
    if out.any():
        return f"box outside the {width}x{height} image: {boxes[out][0].round(2).tolist()}"
    return None


def _make_record(path: Path, width: int, height: int, boxes: list[list[float]], classes: list[int]) -> ImageRecord:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, width)
    arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, height)
    return ImageRecord(
        path=path,
        width=width,
        height=height,
        boxes_xyxy=arr.astype(np.float32),
        class_ids=np.asarray(classes, dtype=np.int64).reshape(-1),
        stem=path.stem,
    )


# ------------------------------------------------------------------------------------------------------------ VOC


@dataclass(frozen=True)
class _VocAnnotation:
    width: int
    height: int
    names: list[str]
    boxes: list[list[float]]  # 0-based xyxy


def _read_split_file(path: Path) -> list[str]:
    entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [e.split()[0] for e in entries if e and not e.startswith("#")]


def _voc_split_files(root: Path) -> tuple[Path, dict[str, Path]]:
    split_dir = next((root / d for d in _VOC_SPLIT_DIRS if (root / d).is_dir()), None)
    if split_dir is None:
        raise DatasetError(root, "VOC dataset has no splits/ folder (splits/train.txt, splits/val.txt)")
    return split_dir, {p.stem: p for p in sorted(split_dir.glob("*.txt"))}


def _parse_voc_xml(path: Path) -> _VocAnnotation:
    """Parse one VOC XML; raises DatasetError(path, problem). ``difficult`` boxes are kept as normal ground truth."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(path, f"invalid XML: {exc}") from exc
    except OSError as exc:
        raise DatasetError(path, f"cannot read annotation: {exc.strerror or exc}") from exc
    try:
        width = int(float(root.findtext("size/width", "")))
        height = int(float(root.findtext("size/height", "")))
    except ValueError:
        raise DatasetError(path, "missing or non-numeric <size><width>/<height>") from None
    if width <= 0 or height <= 0:
        raise DatasetError(path, f"image size {width}x{height} is not positive")
    names: list[str] = []
    boxes: list[list[float]] = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(path, f"object {k}: missing <name>")
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}", "")) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DatasetError(path, f"object {k} ({name}): missing or non-numeric <bndbox> coordinate") from None
        names.append(name)
        boxes.append([xmin - 1.0, ymin - 1.0, xmax - 1.0, ymax - 1.0])  # 1-based VOC -> 0-based pixels
    problem = _check_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), width, height)
    if problem:
        raise DatasetError(path, problem)
    return _VocAnnotation(width, height, names, boxes)


def _find_image(image_dir: Path, entry: str) -> Path | None:
    candidate = image_dir / entry
    if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
        return candidate
    stem = Path(entry).stem if Path(entry).suffix.lower() in IMAGE_SUFFIXES else entry
    for suffix in IMAGE_SUFFIXES:
        for s in (suffix, suffix.upper()):
            if (image_dir / f"{stem}{s}").is_file():
                return image_dir / f"{stem}{s}"
    return None


def _voc_class_names(root: Path, parsed: dict[str, dict[str, _VocAnnotation]]) -> list[str]:
    classes_file = root / "classes.txt"
    if classes_file.is_file():
        names = [n.strip() for n in classes_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(set(names)) != len(names):
            raise DatasetError(classes_file, "class names are not unique")
        if not names:
            raise DatasetError(classes_file, "no class names")
        return names
    found = {n for per_split in parsed.values() for a in per_split.values() for n in a.names}
    if not found:
        raise DatasetError(root, "no objects in any annotation: cannot infer class names (add classes.txt)")
    return sorted(found)


def _load_voc(root: Path, split: str) -> DatasetSplit:
    image_dir = _first_dir(root, _VOC_IMAGE_DIRS)
    ann_dir = _first_dir(root, _VOC_ANNOTATION_DIRS)
    if image_dir is None or ann_dir is None:
        raise DatasetError(root, f"VOC dataset needs an image folder ({'/'.join(_VOC_IMAGE_DIRS)}) and ANNOTATIONS/")
    split_dir, split_files = _voc_split_files(root)
    if split not in split_files:
        have = ", ".join(split_files) or "none"
        raise DatasetError(split_dir / f"{split}.txt", f"split file not found (splits here: {have})")
    # Class names come from every split (unless classes.txt lists them), so train and val agree on class ids.
    problems: list[tuple[Path, str]] = []
    parsed: dict[str, dict[str, _VocAnnotation]] = {}
    images: dict[str, Path] = {}
    for name, split_file in split_files.items():
        parsed[name] = {}
        for entry in _read_split_file(split_file):
            stem = Path(entry).stem if Path(entry).suffix.lower() in IMAGE_SUFFIXES else entry
            xml_path = ann_dir / f"{stem}.xml"  # image and XML paths from the stem, never from <filename>
            if not xml_path.is_file():
                problems.append((xml_path, f"annotation missing for {entry!r} listed in {split_file.name}"))
                continue
            try:
                parsed[name][stem] = _parse_voc_xml(xml_path)
            except DatasetError as exc:
                problems.append((exc.path, exc.problem))
            if name == split:
                image = _find_image(image_dir, entry)
                if image is None:
                    problems.append((image_dir / entry, f"image missing for {entry!r} listed in {split_file.name}"))
                else:
                    images[stem] = image
    _raise_problems(root, problems)
    class_names = _voc_class_names(root, parsed)
    index = {n: i for i, n in enumerate(class_names)}
    records = []
    for stem, ann in parsed[split].items():
        unknown = sorted(set(ann.names) - index.keys())
        if unknown:
            problems.append((ann_dir / f"{stem}.xml", f"class name(s) {unknown} not in {root / 'classes.txt'}"))
            continue
        records.append(_make_record(images[stem], ann.width, ann.height, ann.boxes, [index[n] for n in ann.names]))
    _raise_problems(root, problems)
    if not records:
        raise DatasetError(split_files[split], "the split lists no images")
    return DatasetSplit(class_names=class_names, records=records, root=root, split=split)


# ----------------------------------------------------------------------------------------------------------- YOLO


def _yolo_class_names(yaml_path: Path, names: object) -> list[str]:
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(yaml_path, "'names' dict keys must be class indices 0..nc-1") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise DatasetError(yaml_path, f"'names' keys must be 0..{len(keyed) - 1}, got {sorted(keyed)}")
        return [keyed[i] for i in range(len(keyed))]
    raise DatasetError(yaml_path, "'names' must be a non-empty list of class names or a {index: name} dict")


def _yolo_images(yaml_path: Path, base: Path, entry: object) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        if not isinstance(e, str):
            raise DatasetError(yaml_path, f"split entry {e!r} is not a path")
        p = Path(e) if Path(e).is_absolute() else base / e
        if p.is_dir():
            images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":  # list file: one image path per line, relative to the dataset root
            images += [Path(s) if Path(s).is_absolute() else base / s for s in _read_split_file(p)]
        else:
            raise DatasetError(p, "image folder or list file not found")
    return images


def _label_path(image: Path) -> Path:
    """Ultralytics rule: the last ``images`` folder in the path becomes ``labels``, the suffix becomes ``.txt``."""
    parts = list(image.parts)
    idx = max((i for i, p in enumerate(parts[:-1]) if p == "images"), default=None)
    if idx is None:
        return image.with_suffix(".txt")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def _parse_yolo_label(path: Path, nc: int, width: int, height: int) -> tuple[list[list[float]], list[int]]:
    """Parse ``class cx cy w h`` (normalised) lines; polygon lines ``class x1 y1 x2 y2 ...`` become their bbox."""
    boxes: list[list[float]] = []
    classes: list[int] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 5 or (len(fields) > 5 and len(fields) % 2 == 0):
            raise DatasetError(path, f"line {lineno}: expected 'class cx cy w h' (or a polygon), got {line.strip()!r}")
        try:
            cls_f, values = float(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DatasetError(path, f"line {lineno}: non-numeric value in {line.strip()!r}") from None
        if cls_f != int(cls_f) or not 0 <= int(cls_f) < nc:
            raise DatasetError(path, f"line {lineno}: class {fields[0]} not in 0..{nc - 1}")
        if not all(math.isfinite(v) for v in values) or min(values) < -0.01 or max(values) > 1.01:
            raise DatasetError(path, f"line {lineno}: coordinates must be normalised to [0, 1], got {values}")
        if len(values) == 4:
            cx, cy, w, h = values
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = values[0::2], values[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
        classes.append(int(cls_f))
    problem = _check_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), width, height)
    if problem:
        raise DatasetError(path, problem)
    return boxes, classes


def _load_yolo(yaml_path: Path, split: str) -> DatasetSplit:
    try:
        cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(yaml_path, f"cannot read dataset YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise DatasetError(yaml_path, "dataset YAML must be a mapping with 'path', 'train', 'val' and 'names'")
    class_names = _yolo_class_names(yaml_path, cfg.get("names"))
    base = Path(str(cfg.get("path") or "."))
    base = base if base.is_absolute() else (yaml_path.parent / base)
    if not cfg.get(split):
        have = [k for k in ("train", "val", "test") if k in cfg]
        raise DatasetError(yaml_path, f"no '{split}' entry (splits here: {have})")
    problems: list[tuple[Path, str]] = []
    records: list[ImageRecord] = []
    for image in _yolo_images(yaml_path, base, cfg[split]):
        try:
            h, w = read_image(image).shape[:2]  # full decode: also applies EXIF orientation, like the loader will
            label = _label_path(image)
            boxes, classes = _parse_yolo_label(label, len(class_names), w, h) if label.is_file() else ([], [])
        except DatasetError as exc:
            problems.append((exc.path, exc.problem))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append((_label_path(image), f"cannot read label file: {exc}"))
            continue
        records.append(_make_record(image, w, h, boxes, classes))
    _raise_problems(yaml_path.parent, problems)
    if not records:
        raise DatasetError(yaml_path, f"split '{split}' has no images")
    return DatasetSplit(class_names=class_names, records=records, root=base, split=split)
