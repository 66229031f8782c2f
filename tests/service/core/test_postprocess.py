"""service/core/postprocess.py against a plain brute-force reference on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.bundle import VerdictRule
from service.core.postprocess import Detections, nms_numpy, nms_opencv, postprocess, verdict
from service.core.preprocess import LetterboxInfo


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference(pred, info, thr, iou, max_det):
    """One image, plain Python loops: the behaviour docs/CONTRACTS.md describes."""
    nc = pred.shape[0] - 4
    cands = []
    for a in range(pred.shape[1]):
        scores = [float(pred[4 + c, a]) for c in range(nc)]
        c = max(range(nc), key=lambda k: scores[k])
        s = scores[c]
        if s > min(thr) and s >= thr[c]:
            cx, cy, w, h = (float(v) for v in pred[:4, a])
            cands.append((s, c, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    cands.sort(key=lambda t: -t[0])
    kept = []
    for s, c, box in cands:
        if all(k[1] != c or _iou(k[2], box) <= iou for k in kept):
            kept.append((s, c, box))
    out = []
    for s, c, (x1, y1, x2, y2) in kept[:max_det]:
        xs = [min(max((x - info.pad_x) / info.scale, 0), info.src_width) for x in (x1, x2)]
        ys = [min(max((y - info.pad_y) / info.scale, 0), info.src_height) for y in (y1, y2)]
        out.append((s, c, [xs[0], ys[0], xs[1], ys[1]]))
    return out


def _random_output(rng, b, nc, a, size=320):
    centres = rng.uniform(0, size, (6, 2))
    c = centres[rng.integers(0, 6, (b, a))] + rng.normal(0, 8, (b, a, 2))
    wh = rng.uniform(8, 80, (b, a, 2))
    boxes = np.concatenate([c, wh], axis=2).transpose(0, 2, 1)
    scores = rng.random((b, nc, a)) ** 3
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


@pytest.mark.parametrize("nms", ["numpy", "opencv"])
@pytest.mark.parametrize("seed", range(4))
def test_postprocess_matches_brute_force(seed: int, nms: str) -> None:
    rng = np.random.default_rng(seed)
    nc, a = 3, 150
    out = _random_output(rng, 2, nc, a)
    infos = [LetterboxInfo(0.5, 0.0, 40.0, 640, 480), LetterboxInfo(1.25, 12.0, 0.0, 200, 256)]
    thr = [0.2, 0.35, 0.5] if seed % 2 else [0.05, 0.05, 0.05]
    max_det = 7 if seed == 3 else 300
    got = postprocess(out, infos, thr, nms_iou=0.5, max_detections=max_det, nms=nms)
    assert len(got) == 2
    for b in range(2):
        ref = _reference(out[b], infos[b], thr, 0.5, max_det)
        dets = got[b]
        assert len(dets) == len(ref) > 0
        np.testing.assert_allclose(dets.scores, [r[0] for r in ref], rtol=1e-6)
        np.testing.assert_array_equal(dets.class_ids, [r[1] for r in ref])
        np.testing.assert_allclose(dets.boxes_xyxy, np.array([r[2] for r in ref]), rtol=1e-5, atol=1e-3)
        assert dets.boxes_xyxy.dtype == np.float32 and dets.class_ids.dtype == np.int64


def test_nms_implementations_agree_on_many_boxes() -> None:
    rng = np.random.default_rng(7)
    n = 400
    xy = rng.uniform(0, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], axis=1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    cls = rng.integers(0, 4, n).astype(np.int64)
    for iou in (0.3, 0.7):
        a, b = nms_numpy(boxes, scores, cls, iou), nms_opencv(boxes, scores, cls, iou)
        np.testing.assert_array_equal(a, b)
        assert 0 < len(a) < n


def test_max_candidates_keeps_the_best() -> None:
    rng = np.random.default_rng(1)
    out = _random_output(rng, 1, 2, 300)
    info = LetterboxInfo(1.0, 0.0, 0.0, 320, 320)
    full = postprocess(out, [info], [0.01, 0.01], nms_iou=1.0)[0]
    capped = postprocess(out, [info], [0.01, 0.01], nms_iou=1.0, max_candidates=10)[0]
    assert len(capped) == 10
    np.testing.assert_allclose(capped.scores, full.scores[:10])


def test_no_candidates_gives_empty_detections() -> None:
    out = np.zeros((2, 6, 20), np.float32)
    dets = postprocess(out, [LetterboxInfo(1.0, 0, 0, 10, 10)] * 2, [0.5, 0.5])
    assert [len(d) for d in dets] == [0, 0]
    assert dets[0].boxes_xyxy.shape == (0, 4)


def test_shape_errors_are_clear() -> None:
    info = LetterboxInfo(1.0, 0, 0, 10, 10)
    with pytest.raises(ValueError, match="expected 4 \\+ 3 classes"):
        postprocess(np.zeros((1, 6, 5), np.float32), [info], [0.5] * 3)
    with pytest.raises(ValueError, match="letterbox infos"):
        postprocess(np.zeros((2, 6, 5), np.float32), [info], [0.5] * 2)


def _dets(boxes, classes) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.full(len(classes), 0.9, np.float32),
        np.asarray(classes, np.int64),
    )


def test_verdict_rule() -> None:
    names = ["scratch", "dent", "stain"]
    small_stain = _dets([[0, 0, 2, 2]], [2])
    assert verdict(_dets([], []), VerdictRule(), names) == "OK"
    assert verdict(small_stain, VerdictRule(), names) == "NG"
    assert verdict(small_stain, VerdictRule(min_box_area=5.0), names) == "OK"
    assert verdict(small_stain, VerdictRule(reject_classes=["scratch", "dent"]), names) == "OK"
    big_dent = _dets([[0, 0, 2, 2], [0, 0, 10, 10]], [2, 1])
    assert verdict(big_dent, VerdictRule(reject_classes=["dent"], min_box_area=50), names) == "NG"
