"""ONNX export of every variant (decoded graph, dynamic batch) and onnxruntime parity within 1e-4."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import models
from tests.models.conftest import ALL_VARIANTS, LARGE_VARIANTS, randomize_batchnorm

ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces its own deprecation
# m/l/x scales are the n/s blocks at other widths (80-270 MB graphs): exporting them adds minutes, not coverage
@pytest.mark.parametrize("name", [n for n in ALL_VARIANTS if n not in LARGE_VARIANTS])
def test_onnx_export_matches_onnxruntime(name: str, built) -> None:
    model = built(name)
    randomize_batchnorm(model)
    models.fuse_model(model)
    graph = models.InferenceModel(model).eval()
    buf = io.BytesIO()
    torch.onnx.export(
        graph,
        (torch.zeros(1, 3, 128, 128),),
        buf,
        dynamo=False,  # the TorchScript exporter: no onnxscript needed, DySample needs opset >= 16
        opset_version=17,
        input_names=["images"],
        output_names=["output0"],
        dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
    )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 128, 128)  # batch 3 != export batch: the batch axis is dynamic
    (out,) = session.run(["output0"], {"images": x.numpy()})
    with torch.no_grad():
        expected = graph(x).numpy()
    assert out.shape == (3, 10, 16 * 16 + 8 * 8 + 4 * 4)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
