"""What ``aoi export`` shows a person: one progress line per step, then a summary table of the bundle.

Written to a text stream (stderr by default) rather than through logging, because this is the command's user
interface; library callers pass ``io.StringIO()`` or ``quiet=True``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Progress", "format_summary", "human_size", "table_lines"]


@dataclass
class Progress:
    """Numbered steps with their duration: ``[2/7] ONNX export ... done (3.1 s)``."""

    total: int
    stream: TextIO | None = None
    quiet: bool = False
    _index: int = field(default=0, init=False)
    _noted: bool = field(default=False, init=False)

    def _write(self, text: str) -> None:
        if not self.quiet:
            out = self.stream if self.stream is not None else sys.stderr
            out.write(text)
            out.flush()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self._index += 1
        self._write(f"[{self._index}/{self.total}] {title} ...")
        self._noted = False
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self._end(f"failed ({time.perf_counter() - start:.1f} s)")
            raise
        self._end(f"done ({time.perf_counter() - start:.1f} s)")

    def _end(self, text: str) -> None:
        self._write(f"      {text}\n" if self._noted else f" {text}\n")

    def note(self, text: str) -> None:
        """An indented line under the current step (warnings, numbers worth seeing as they come)."""
        self._write(f"\n      {text}\n")
        self._noted = True

    def skip(self, title: str, reason: str) -> None:
        self._index += 1
        self._write(f"[{self._index}/{self.total}] {title} ... skipped: {reason}\n")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def table_lines(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4f}"
    return str(v)


def format_summary(root: Path, parity: dict[str, Any], thresholds: dict[str, dict[str, Any]]) -> str:
    """Files with sizes, one parity row per compared runtime, one threshold row per class."""
    lines = [f"bundle: {root}", ""]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    lines += table_lines(
        ["file", "size"], [[p.relative_to(root).as_posix(), human_size(p.stat().st_size)] for p in files]
    )
    rows = []
    for name, r in parity.get("comparisons", {}).items():
        m = r.get("map") or {}
        rows.append(
            [
                name,
                "PASS" if r["passed"] else "FAIL",
                _fmt(r["raw"]["box_max_abs"]),
                _fmt(r["raw"]["score_max_abs"]),
                _fmt(r["detections"]["match_rate"]),
                _fmt(r["detections"]["iou_min"]),
                _fmt(m.get("delta_map50")),
                _fmt(m.get("delta_map50_95")),
            ]
        )
    lines += ["", f"parity on {parity.get('images', {}).get('count', '?')} images "
              f"({parity.get('images', {}).get('source', '?')}):"]  # fmt: skip
    heads = ["comparison", "result", "box max|d|", "score max|d|", "match", "IoU min", "dmAP50", "dmAP50-95"]
    lines += table_lines(heads, rows)
    trows = [
        [name, _fmt(t["threshold"]), _fmt(t.get("precision")), _fmt(t.get("recall")), _fmt(t.get("f1")),
         str(t.get("instances", "-")), t.get("note", "")]
        for name, t in thresholds.items()
    ]  # fmt: skip
    lines += ["", "score thresholds:"]
    lines += table_lines(["class", "threshold", "precision", "recall", "F1", "instances", "note"], trows)
    return "\n".join(line.rstrip() for line in lines) + "\n"
