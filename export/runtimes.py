"""The runtimes export compares: torch fp32 (the reference) and ONNX Runtime sessions (fp32 / fp16 ONNX).

Each runner maps a ``(B, 3, H, W)`` float32 batch to the ``(B, 4+nc, A)`` float32 output; :func:`run_all` pushes a
whole :class:`~export.samples.SampleSet` through one with the evaluation loop of ``train.predict``, keeping the raw
outputs for parity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from export.samples import SampleSet
from models import Detector
from service.core.postprocess import Detections
from service.core.preprocess import LetterboxInfo, to_input
from train.predict import predict_images

__all__ = ["OrtRunner", "RunOutput", "TorchRunner", "median_latency_ms", "run_all"]

Runner = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class TorchRunner:
    """Reference: the detector in eval mode on CPU, float32, ``decode(forward(x))``."""

    name = "torch fp32"

    def __init__(self, detector: Detector) -> None:
        self.detector = detector.eval()

    @torch.no_grad()
    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = self.detector.decode(self.detector(torch.from_numpy(x)))
        return np.asarray(out.float().numpy(), dtype=np.float32)


class OrtRunner:
    """An ONNX Runtime session on the first available provider of ``providers``."""

    def __init__(self, path: Path, providers: Sequence[str] = ("CPUExecutionProvider",), label: str = "fp32") -> None:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.name = f"onnxruntime {label} ({self.provider})"

    def __call__(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (out,) = self.session.run(None, {self.input_name: x})[:1]
        return np.asarray(out, dtype=np.float32)


@dataclass
class RunOutput:
    raw: npt.NDArray[np.float32]  # (N, 4+nc, A)
    infos: list[LetterboxInfo]
    detections: list[Detections]  # at the evaluation protocol's settings (train.predict.EVAL_CONF, EVAL_IOU, ...)


def run_all(runner: Runner, samples: SampleSet, nc: int, *, batch_size: int) -> RunOutput:
    """Every sample through ``runner`` in batches of ``batch_size`` by the evaluation loop
    (:func:`train.predict.predict_images`): the service's letterbox and ``to_input``, then its post-processing."""
    spec = samples.spec

    def infer(images: Sequence[npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        return runner(to_input(images, spec))

    run = predict_images(
        infer,
        samples.image,
        len(samples),
        nc,
        input_hw=(spec.height, spec.width),
        batch_size=batch_size,
        pad_value=spec.pad_value,
        keep_raw=True,
    )
    assert run.raw is not None  # keep_raw, and a SampleSet is never empty
    return RunOutput(run.raw, run.infos, run.detections)


def median_latency_ms(runner: Runner, x: npt.NDArray[np.float32], *, repeats: int = 5) -> float:
    """Median wall time of ``runner(x)`` after one warm-up call, in milliseconds."""
    runner(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))
