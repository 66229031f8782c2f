"""Synthetic model bundles and images for tests (no torch, no real data).

The model is a tiny ONNX graph built with the ``onnx`` helper whose ``[B, 4+nc, A]`` output is a known function of
the input (:func:`synthetic_output`): the image is cut into ``STRIDE x STRIDE`` cells, one anchor per cell, each
anchor a fixed ``BOX x BOX`` box centred on its cell, and the score of class ``c`` is the mean of channel ``c % 3``
over the cell (inputs are 0-1, so scores are 0-1). A red patch on a black image therefore yields class-0
detections over the patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.core.bundle import InputSpec, ModelBundle, OnnxSpec, OutputSpec, PostprocessSpec, write_bundle

__all__ = [
    "BOX",
    "STRIDE",
    "encode_image",
    "make_image_bytes",
    "make_synthetic_bundle",
    "make_synthetic_fp16_onnx",
    "make_synthetic_onnx",
    "synthetic_output",
]

STRIDE = 8  # cell size in input pixels
BOX = 16.0  # width and height of every anchor box in input pixels
OPSET = 17


def _anchor_boxes(size: int) -> npt.NDArray[np.float32]:
    g = size // STRIDE
    ys, xs = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    cx = (xs.reshape(-1) + 0.5) * STRIDE
    cy = (ys.reshape(-1) + 0.5) * STRIDE
    wh = np.full(g * g, BOX)
    return np.stack([cx, cy, wh, wh]).astype(np.float32)  # (4, A)


def synthetic_output(x: npt.NDArray[np.float32], nc: int = 2) -> npt.NDArray[np.float32]:
    """What the synthetic model computes for ``x`` (B, 3, S, S) float32: ``(B, 4+nc, A)`` float32."""
    b, _, s, _ = x.shape
    g = s // STRIDE
    pooled = x.reshape(b, 3, g, STRIDE, g, STRIDE).mean(axis=(3, 5)).reshape(b, 3, g * g)
    scores = pooled[:, [c % 3 for c in range(nc)], :]
    boxes = np.broadcast_to(_anchor_boxes(s), (b, 4, g * g))
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def make_synthetic_onnx(
    path: Path, *, nc: int = 2, size: int = 64, extra_convs: int = 0, conv_channels: int = 16
) -> Path:
    """Write the synthetic model to ``path``. ``extra_convs`` adds 3x3 conv+ReLU layers whose result is multiplied by
    zero: the output is unchanged but inference costs real compute (for benchmarks)."""
    if size % STRIDE:
        raise ValueError(f"size must be a multiple of {STRIDE}, got {size}")
    a = (size // STRIDE) ** 2
    inits = [
        numpy_helper.from_array(np.array([0, 3, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([c % 3 for c in range(nc)], np.int64), "score_channels"),
        numpy_helper.from_array(_anchor_boxes(size)[None], "anchor_boxes"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([1], np.int64), "s1"),
        numpy_helper.from_array(np.array([0, 1, 1], np.int64), "chain_shape"),
    ]
    nodes = [
        helper.make_node(
            "AveragePool", ["images"], ["pooled"], kernel_shape=[STRIDE, STRIDE], strides=[STRIDE, STRIDE]
        ),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"]),
        helper.make_node("Gather", ["flat", "score_channels"], ["scores"], axis=1),
        helper.make_node("Slice", ["flat", "s0", "s1", "s1"], ["first"]),
        helper.make_node("Mul", ["first", "zero"], ["zeros"]),
    ]
    base = "zeros"
    if extra_convs:
        rng = np.random.default_rng(0)
        prev, cin = "images", 3
        for i in range(extra_convs):
            w = (rng.standard_normal((conv_channels, cin, 3, 3)) * 0.1).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"conv{i}_w"))
            nodes.append(helper.make_node("Conv", [prev, f"conv{i}_w"], [f"conv{i}"], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
            prev, cin = f"relu{i}", conv_channels
        nodes += [
            helper.make_node("ReduceMean", [prev], ["chain_mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["chain_mean", "chain_shape"], ["chain_flat"]),
            helper.make_node("Mul", ["chain_flat", "zero"], ["chain_zero"]),
            helper.make_node("Add", ["zeros", "chain_zero"], ["zeros_chain"]),
        ]
        base = "zeros_chain"
    nodes += [
        helper.make_node("Add", [base, "anchor_boxes"], ["boxes"]),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 4 + nc, a])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="aoi-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _topological(nodes: Sequence[onnx.NodeProto], graph_inputs: set[str]) -> list[onnx.NodeProto]:
    ready = set(graph_inputs)
    pending, ordered = list(nodes), []
    while pending:
        node = next((n for n in pending if all(not i or i in ready for i in n.input)), None)
        if node is None:
            raise ValueError("graph has a cycle or an undefined input")
        pending.remove(node)
        ordered.append(node)
        ready.update(node.output)
    return ordered


def make_synthetic_fp16_onnx(src: Path, dst: Path) -> Path:
    """The float16 variant of the synthetic model at ``src`` (float32 inputs/outputs, like ``aoi export
    --fp16-onnx``), converted with onnxruntime's converter and re-sorted so ``onnx.checker`` accepts it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    known = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    nodes = _topological(list(model.graph.node), known)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def make_synthetic_bundle(
    root: Path,
    *,
    classes: Sequence[str] = ("scratch", "dent"),
    size: int = 64,
    max_batch: int = 8,
    threshold: float = 0.5,
    extra_convs: int = 0,
    fp16: bool = False,
) -> Path:
    """Write a valid bundle (``model.onnx`` + ``bundle.json``, + ``model.fp16.onnx`` named in ``onnx.fp16_file`` with
    ``fp16``) for the synthetic model into ``root``; returns it."""
    root = Path(root)
    make_synthetic_onnx(root / "model.onnx", nc=len(classes), size=size, extra_convs=extra_convs)
    if fp16:
        make_synthetic_fp16_onnx(root / "model.onnx", root / "model.fp16.onnx")
    bundle = ModelBundle(
        name="synthetic",
        version="1.0.0",
        architecture="synthetic-avgpool",
        classes=list(classes),
        input=InputSpec(width=size, height=size),
        output=OutputSpec(num_anchors=(size // STRIDE) ** 2),
        onnx=OnnxSpec(
            opset=OPSET, dynamic_batch=True, max_batch=max_batch, fp16_file="model.fp16.onnx" if fp16 else None
        ),
        postprocess=PostprocessSpec(score_thresholds={c: threshold for c in classes}),
        provenance={"generator": "tests/synthetic.py", "training_data": "none (synthetic)"},
    )
    write_bundle(bundle, root)
    return root


def encode_image(rgb: npt.NDArray[np.generic], fmt: str = "png") -> bytes:
    """Encode an RGB (H, W, 3), RGBA (H, W, 4) or gray (H, W) array of uint8/uint16 as ``fmt`` bytes."""
    img = rgb
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png", "bmp": ".bmp", "tiff": ".tiff", "tif": ".tiff"}[fmt]
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        raise ValueError(f"OpenCV cannot encode a {img.dtype} image with shape {img.shape} as {fmt}")
    return buf.tobytes()


def make_image_bytes(
    width: int,
    height: int,
    fmt: str = "jpeg",
    channels: int = 3,
    dtype: type[np.generic] | np.dtype[np.generic] = np.uint8,
    seed: int = 0,
) -> bytes:
    """A deterministic smooth-noise test image of the given size, channel count (1, 3, 4) and dtype, encoded as
    ``fmt`` (jpeg, png, bmp, tiff)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    top = float(np.iinfo(dt).max) if dt.kind in "ui" else 1.0
    small = rng.random((max(1, height // 8), max(1, width // 8), channels))
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    img = (np.clip(img, 0, 1) * top).astype(dt)
    if channels == 1:
        img = img.reshape(height, width)
    return encode_image(img, fmt)
