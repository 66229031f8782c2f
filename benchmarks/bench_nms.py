"""Compare the two class-aware NMS implementations of service.core.postprocess
(vectorised numpy vs cv2.dnn.NMSBoxesBatched).

    python benchmarks/bench_nms.py [--repeats 20]

Random YOLO-like candidates (clustered boxes, 6 classes) at the candidate counts the service sees: a few tens
(serving thresholds ~0.25) up to thousands (evaluation at conf 0.001). Prints the median time per call and checks both
return the same indices.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from service.core.postprocess import nms_numpy, nms_opencv


def _candidates(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = rng.uniform(0, 640, (max(1, n // 20), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(10, 120, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32), rng.integers(0, 6, n).astype(np.int64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'candidates':>10} {'numpy ms':>10} {'opencv ms':>10}  same")
    for n in (10, 50, 200, 1000, 5000):
        boxes, scores, cls = _candidates(n, rng)
        row = []
        for fn in (nms_numpy, nms_opencv):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                keep = fn(boxes, scores, cls, 0.7)
                times.append(time.perf_counter() - t0)
            row.append((float(np.median(times)) * 1e3, keep))
        same = np.array_equal(np.sort(row[0][1]), np.sort(row[1][1]))
        print(f"{n:>10} {row[0][0]:>10.3f} {row[1][0]:>10.3f}  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
