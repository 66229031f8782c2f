"""service/cli/predict.py (`aoi predict`): a folder through a tiled bundle, its JSON lines, summary and NG images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from aoi.cli import main
from tests.synthetic import encode_image

# The synthetic model scores 8 px cells by their mean red (class 0, "scratch") and gives each a 16 px box
# (tests/synthetic.py). The bundle's native tile is 64 frame px (its input: scale 1), overlap 0.25 -> tiles every 48 px.
PATCH = (56, 40, 72, 56)  # x1, y1, x2, y2 in the 640x480 frame: four cells, across the tile borders at x 48/64, y 48
SUB_PATCH = (24, 24, 40, 40)  # in a 64x64 image (one input at scale 1): four cells again
BIG_TILES = 13 * 10  # 640 = 13 tiles of 64 every 48 px (axis_starts), 480 = 10


def _image(width: int, height: int, patch: tuple[int, int, int, int] | None = None) -> bytes:
    img = np.zeros((height, width, 3), np.uint8)
    if patch is not None:
        x1, y1, x2, y2 = patch
        img[y1:y2, x1:x2, 0] = 255
    return encode_image(img, "png")


def _cell_boxes(patch: tuple[int, int, int, int]) -> set[tuple[float, ...]]:
    """One 16 px box per 8 px cell fully inside ``patch`` (what a perfect inspection returns), in frame pixels."""
    x1, y1, x2, y2 = patch
    return {(cx - 8.0, cy - 8.0, cx + 8.0, cy + 8.0) for cx in range(x1 + 4, x2, 8) for cy in range(y1 + 4, y2, 8)}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """big.png (NG only when tiled), small.png (OK), sub/patch.png (NG untiled), garbage.jpg (not an image)."""
    root = tmp_path / "frames"
    (root / "sub").mkdir(parents=True)
    (root / "big.png").write_bytes(_image(640, 480, PATCH))
    (root / "small.png").write_bytes(_image(64, 64))
    (root / "sub" / "patch.png").write_bytes(_image(64, 64, SUB_PATCH))
    (root / "garbage.jpg").write_bytes(b"this is not a JPEG at all" * 4)
    (root / "notes.txt").write_text("not an image suffix: ignored\n", encoding="utf-8")
    return root


def _predict(bundle: Path, source: Path, out: Path, *extra: str) -> int:
    args = ["predict", "--model", str(bundle), "--source", str(source), "--out", str(out)]
    return main([*args, "--backend", "onnxruntime-cpu", *extra])


def _lines(out: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    by_file = {Path(r["file"]).name: r for r in rows}
    assert len(by_file) == len(rows), rows
    return by_file


def _boxes(row: dict[str, Any]) -> set[tuple[float, ...]]:
    return {tuple(d["box_xyxy"]) for d in row["detections"]}


def _is_jpeg(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:3] == b"\xff\xd8\xff"


def test_folder_is_inspected_tiled_as_served(
    tiled_bundle: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _predict(tiled_bundle, source, out) == 1  # 1: the garbage file failed, the rest ran

    err = capsys.readouterr().err
    garbage = source / "garbage.jpg"
    assert f"aoi predict: error: {garbage}: " in err and "not a supported image" in err
    assert "aoi predict: images 4/4" in err  # non-terminal stderr: at least the last progress line

    rows = _lines(out)
    assert set(rows) == {"big.png", "small.png", "patch.png", "garbage.jpg"}  # notes.txt is not an image
    big, small, sub, bad = rows["big.png"], rows["small.png"], rows["patch.png"], rows["garbage.jpg"]
    assert (big["width"], big["height"], big["verdict"]) == (640, 480, "NG")
    assert big["tiled"] is True and big["tiles"] == BIG_TILES
    boxes = [tuple(d["box_xyxy"]) for d in big["detections"]]
    assert len(boxes) == 4 and set(boxes) == _cell_boxes(PATCH), boxes  # seen by up to four tiles, returned once
    assert {d["class_name"] for d in big["detections"]} == {"scratch"}
    assert all(d["class_id"] == 0 and 0.5 <= d["score"] <= 1.0 for d in big["detections"])
    assert (small["verdict"], small["tiled"], small["tiles"], small["detections"]) == ("OK", False, 1, [])
    assert (sub["verdict"], sub["tiled"], sub["tiles"]) == ("NG", False, 1)
    assert _boxes(sub) == _cell_boxes(SUB_PATCH)
    assert Path(sub["file"]) == source / "sub" / "patch.png"
    assert bad["error"] == "invalid_image" and "not a supported image" in bad["message"]
    assert Path(bad["file"]) == garbage and "verdict" not in bad

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["model"] == {"name": "synthetic", "version": "1.0.0"}
    assert summary["tiling"] == {"mode": "auto", "tile": [64, 64], "overlap": 0.25, "source": "test"}
    assert (summary["images"], summary["inspected"]) == (4, 3)
    assert summary["verdicts"] == {"NG": 2, "OK": 1}
    assert summary["detections_per_class"] == {"scratch": 8}
    assert summary["model_inputs"] == BIG_TILES + 2
    assert list(summary["failed"]) == [str(garbage)] and "not a supported image" in summary["failed"][str(garbage)]

    # annotated NG frames only, as JPEG, keeping the sub-folder under --source
    assert _is_jpeg(out / "ng" / "big.png.jpg") and _is_jpeg(out / "ng" / "sub" / "patch.png.jpg")
    assert {p.relative_to(out / "ng").as_posix() for p in (out / "ng").rglob("*.jpg")} == {
        "big.png.jpg",
        "sub/patch.png.jpg",
    }
    annotated = cv2.imread(str(out / "ng" / "big.png.jpg"))
    assert annotated is not None and annotated.shape == (480, 640, 3)
    assert not (out / "ok").exists()


def test_tiling_off_letterboxes_the_frame_whole(tiled_bundle: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(tiled_bundle, source, out, "--tiling", "off", "--save-ok") == 1
    rows = _lines(out)
    # 640 px into a 64 px input: the 16 px patch becomes 1.6 px, far below a cell's 0.5 mean red
    assert (rows["big.png"]["verdict"], rows["big.png"]["tiled"], rows["big.png"]["tiles"]) == ("OK", False, 1)
    assert rows["patch.png"]["verdict"] == "NG"  # already at the native scale: unaffected
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["tiling"]["mode"] == "off" and summary["model_inputs"] == 3
    assert summary["verdicts"] == {"OK": 2, "NG": 1}
    # --save-ok: OK frames annotated under ok/
    assert _is_jpeg(out / "ok" / "big.png.jpg") and _is_jpeg(out / "ok" / "small.png.jpg")
    assert _is_jpeg(out / "ng" / "sub" / "patch.png.jpg") and not (out / "ng" / "big.png.jpg").exists()


def test_single_file_and_no_images(tiled_bundle: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(tiled_bundle, source / "sub" / "patch.png", out, "--no-images") == 0
    rows = _lines(out)
    assert set(rows) == {"patch.png"} and rows["patch.png"]["verdict"] == "NG"
    assert not (out / "ng").exists()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert (summary["images"], summary["inspected"], summary["failed"]) == (1, 1, {})

    out = tmp_path / "out_single"
    assert _predict(tiled_bundle, source / "big.png", out) == 0
    assert _is_jpeg(out / "ng" / "big.png.jpg")  # a single file keeps only its name


def test_native_tile_and_full_frame_overrides(tiled_bundle: Path, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(tiled_bundle, source / "big.png", out, "--native-tile", "128", "--full-frame") == 0
    (row,) = _lines(out).values()
    # 128 px tiles overlapping >= 32 px: 640 -> 7 tiles, 480 -> 5 tiles, plus the whole-frame pass
    assert row["tiled"] is True and row["tiles"] == 7 * 5 + 1
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["tiling"]["tile"] == [128, 128] and "native_tile = 128" in summary["tiling"]["source"]


def test_bad_arguments_exit_2(
    tiled_bundle: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "missing"
    assert _predict(tiled_bundle, missing, out) == 2
    err = capsys.readouterr().err
    assert f"aoi predict: error: {missing}: no such file or folder" in err

    assert _predict(tiled_bundle, source, out, "--batch", "0") == 2
    assert "--batch: must be >= 1, got 0" in capsys.readouterr().err

    assert _predict(tiled_bundle, source, out, "--native-tile", "0") == 2
    assert "--native-tile: must be >= 1" in capsys.readouterr().err

    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here\n", encoding="utf-8")
    assert _predict(tiled_bundle, empty, out) == 2
    assert f"aoi predict: error: {empty}: no images" in capsys.readouterr().err

    assert _predict(tmp_path / "no_bundle", source, out) == 2
    assert "aoi predict: error:" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written

    with pytest.raises(SystemExit) as exc:
        main(["predict", "--source", str(source), "--out", str(out), "--tiling", "sideways"])
    assert exc.value.code == 2


def test_last_progress_line_when_the_last_file_fails(
    tiled_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    (src / "a.png").write_bytes(_image(64, 64))
    (src / "z.jpg").write_bytes(b"not an image")
    # --batch 1: a.png is inferred and reported (1/2) before z.jpg is refused, the last file of the run
    assert _predict(tiled_bundle, src, tmp_path / "out", "--batch", "1") == 1
    err = capsys.readouterr().err
    assert "aoi predict: images 2/2" in err, (
        "CountProgress promises a last line when the count completes, but FrameInspector.run counts a refused "
        f"frame without calling progress, so a run whose last file is refused never reports 2/2. stderr was:\n{err}"
    )


def test_unreadable_file_is_reported(
    tiled_bundle: Path,
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    unreadable = source / "small.png"
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    out = tmp_path / "out"
    assert _predict(tiled_bundle, source / "sub", out) == 0  # the patched file is not under sub/: nothing fails
    assert _predict(tiled_bundle, source, out) == 1
    err = capsys.readouterr().err
    assert f"aoi predict: error: {unreadable}: cannot read: Permission denied" in err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["failed"][str(unreadable)] == "cannot read: Permission denied"
    assert summary["inspected"] == 2 and set(summary["failed"]) == {str(unreadable), str(source / "garbage.jpg")}
    rows = _lines(out)
    assert "small.png" in rows and "error" in rows["small.png"], (
        "predictions.jsonl should have one line per image (module docstring; a file that fails to decode gets an "
        f"'error' line), but a file that cannot be read gets none: lines for {sorted(rows)}"
    )


def test_same_stem_does_not_overwrite_and_out_inside_source_is_not_reread(tiled_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "frames"
    root.mkdir()
    (root / "a.png").write_bytes(_image(64, 64, SUB_PATCH))
    ok, jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(_image(64, 64, SUB_PATCH), np.uint8), cv2.IMREAD_COLOR))
    assert ok
    (root / "a.jpg").write_bytes(jpeg.tobytes())
    out = root / "results"
    for _ in range(2):  # the second run must not inspect the first run's annotated pictures
        assert _predict(tiled_bundle, root, out) == 0
        assert set(_lines(out)) == {"a.png", "a.jpg"}
    assert {p.name for p in (out / "ng").iterdir()} == {"a.png.jpg", "a.jpg"}
