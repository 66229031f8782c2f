"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP) as data: the pydantic shapes of its JSON bodies, and the
pure functions that turn an infer request's body (JSON, or the binary-data extension's JSON header plus raw bytes)
into images and options, and inspection results into output tensors (JSON or binary). No I/O: the routes
(:mod:`service.http.routes.v2`) read the body and run the pipeline; docs/v2-protocol.md describes the wire format.

Input: one ``BYTES`` tensor named ``image`` of shape ``[n]`` (or ``[n, 1]``), one encoded image (JPEG, PNG, BMP,
TIFF) per element: base64 text in JSON ``data``, raw in the binary extension (each element a 4-byte little-endian
length and its bytes). Outputs: every detection of the request's images in one row each (``boxes`` FP32 ``[d, 4]``,
``scores`` FP32 ``[d]``, ``class_ids`` INT32 ``[d]``, ``class_names`` BYTES ``[d]``, ``batch_index`` INT32 ``[d]``:
which image), and ``verdict`` BYTES ``[n]`` (one per image, in input order)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, ValidationError

from service.core.errors import BadRequest, EmptyBody, InvalidQuery, RequestTooCostly, format_validation_error
from service.core.results import InspectResult

__all__ = [
    "EXTENSIONS",
    "INPUT_NAME",
    "OUTPUTS",
    "InferCall",
    "InferRequest",
    "InferResponse",
    "ModelMetadata",
    "ModelReady",
    "OutputTensor",
    "ServerMetadata",
    "TensorMetadata",
    "V2Error",
    "encode_bytes_elements",
    "encode_infer_response",
    "infer_request_schema",
    "output_tensors",
    "parse_infer_request",
    "split_bytes_elements",
]

INPUT_NAME = "image"
EXTENSIONS = ("binary_tensor_data", "parameters")
# Output name -> (datatype, shape in the model metadata; -1: varies per request).
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "boxes": ("FP32", [-1, 4]),
    "scores": ("FP32", [-1]),
    "class_ids": ("INT32", [-1]),
    "class_names": ("BYTES", [-1]),
    "batch_index": ("INT32", [-1]),
    "verdict": ("BYTES", [-1]),
}
_MAX_ID = 128  # camera_id, part_id: the limit of v1's query parameters


class V2Error(BaseModel):
    """The protocol's error body (every 4xx and 5xx of the ``/v2`` routes)."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: a dimension that varies per request")


class ModelMetadata(BaseModel):
    name: str = Field(description="the bundle's name")
    versions: list[str] = Field(description="the bundle's version (one: the model serving now)")
    platform: str = Field(description="aoi-inspect_<backend in use>")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        default=None, description="BYTES in JSON: one base64 string per image (absent with binary_data_size)"
    )


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data: true for a binary answer")


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="camera_id, part_id (strings, up to 128 characters), tiling (auto | on | off), "
        "binary_data_output (bool: the default of every output's binary_data); others are ignored",
    )
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = Field(default=None, description="absent: every output")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data_size when sent as binary")
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def infer_request_schema() -> dict[str, Any]:
    """The JSON schema of :class:`InferRequest` with its nested models written in place (for the OpenAPI request
    body, which is declared by hand because the route reads the raw body)."""
    schema = InferRequest.model_json_schema()
    return cast(dict[str, Any], _inline(schema, schema.get("$defs", {})))


@dataclass(frozen=True)
class InferCall:
    """What an infer request asks for, checked: the images, the v1 options, and the outputs wanted in order, each
    with whether it goes as binary."""

    images: list[bytes]
    request_id: str | None
    camera_id: str | None
    part_id: str | None
    tiling: Literal["auto", "on", "off"] | None
    outputs: list[tuple[str, bool]]


def split_bytes_elements(buf: memoryview, what: str) -> list[bytes]:
    """The elements of a BYTES tensor in the binary format: each a 4-byte little-endian length and its bytes."""
    out: list[bytes] = []
    i, n = 0, len(buf)
    while i < n:
        if n - i < 4:
            raise BadRequest(f"{what}: {n - i} byte(s) left where a 4-byte element length was expected")
        size = int.from_bytes(buf[i : i + 4], "little")
        i += 4
        if size > n - i:
            raise BadRequest(f"{what}: element {len(out)} declares {size} bytes but only {n - i} remain")
        out.append(bytes(buf[i : i + size]))
        i += size
    return out


def encode_bytes_elements(values: Sequence[bytes]) -> bytes:
    """The binary format of a BYTES tensor (the inverse of :func:`split_bytes_elements`)."""
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    size = header_length.strip()
    if not size.isdigit() or not 0 < int(size) <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length {header_length[:40]!r} is not a byte count between 1 and the body's "
            f"{len(body)} bytes"
        )
    return body[: int(size)], memoryview(body)[int(size) :]


def _parse_json(header: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest(f"malformed JSON in the inference request: {exc.errors()[0]['msg']}") from None
        raise BadRequest(f"not an inference request: {format_validation_error(exc)}") from None


def _flatten(data: list[Any]) -> Iterator[Any]:
    for item in data:
        if isinstance(item, list):
            yield from _flatten(item)
        else:
            yield item


def _decode_json_elements(data: list[Any]) -> list[bytes]:
    images = []
    for i, item in enumerate(_flatten(data)):
        if not isinstance(item, str):
            raise BadRequest(f"input {INPUT_NAME!r}: element {i} is {type(item).__name__}; send base64 strings")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(
                f"input {INPUT_NAME!r}: element {i} is not base64 (in JSON a BYTES element is the image's base64 "
                "text; send raw bytes with the binary-data extension)"
            ) from None
    return images


def _image_count(tensor: InputTensor, max_images: int) -> int:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input {INPUT_NAME!r} has datatype {tensor.datatype[:20]!r}; it must be BYTES")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise BadRequest(f"input {INPUT_NAME!r} has shape {shape[:4]}; it must be [n] (or [n, 1]): n images")
    if shape[0] == 0:
        raise EmptyBody(f"input {INPUT_NAME!r} has no elements (shape {shape}); send at least one image")
    if shape[0] > max_images:
        raise RequestTooCostly(f"{shape[0]} images in one request, over {max_images} (setting max_images_per_request)")
    return shape[0]


def _input_images(tensor: InputTensor, binary: memoryview, max_images: int) -> tuple[list[bytes], int]:
    """The images of the ``image`` input and how many of the ``binary`` bytes they took."""
    count = _image_count(tensor, max_images)
    params = tensor.parameters or {}
    if "shared_memory_region" in params:
        raise BadRequest("shared-memory inputs are not supported; send the data in the request")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise BadRequest(
                f"input {INPUT_NAME!r}: binary_data_size {str(size)[:20]} does not fit the {len(binary)} bytes "
                "after the JSON header"
            )
        if tensor.data is not None:
            raise BadRequest(f"input {INPUT_NAME!r} has both data and binary_data_size; send one")
        images = split_bytes_elements(binary[:size], f"input {INPUT_NAME!r} (binary)")
    elif tensor.data is None:
        raise BadRequest(f"input {INPUT_NAME!r} has no data and no binary_data_size")
    else:
        images = _decode_json_elements(tensor.data)
    if len(images) != count:
        raise BadRequest(f"input {INPUT_NAME!r} has shape {tensor.shape} but {len(images)} element(s)")
    for i, image in enumerate(images):
        if not image:
            raise EmptyBody(f"input {INPUT_NAME!r}: element {i} is empty; send the image bytes")
    return images, size or 0


def _text_param(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_ID:
        raise InvalidQuery(f"parameter {name!r} must be a string of at most {_MAX_ID} characters")
    return value


def _tiling(params: dict[str, Any]) -> Literal["auto", "on", "off"] | None:
    value = params.get("tiling")
    if value is None:
        return None
    if value not in ("auto", "on", "off"):
        raise InvalidQuery("parameter 'tiling' must be 'auto', 'on' or 'off'")
    return cast(Literal["auto", "on", "off"], value)


def _flag(params: dict[str, Any], name: str, what: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}: parameter {name!r} must be true or false")
    return value


def _outputs(request: InferRequest, binary_default: bool) -> list[tuple[str, bool]]:
    if request.outputs is None:
        return [(name, binary_default) for name in OUTPUTS]
    wanted: list[tuple[str, bool]] = []
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise BadRequest(f"unknown output {out.name[:64]!r}; this model has {', '.join(OUTPUTS)}")
        if any(out.name == name for name, _ in wanted):
            raise BadRequest(f"output {out.name!r} is requested twice")
        params = out.parameters or {}
        if "classification" in params or "shared_memory_region" in params:
            raise BadRequest(f"output {out.name!r}: the classification and shared-memory extensions are not supported")
        binary = _flag(params, "binary_data", f"output {out.name!r}") if "binary_data" in params else binary_default
        wanted.append((out.name, binary))
    return wanted


def parse_infer_request(body: bytes, header_length: str | None, max_images: int) -> InferCall:
    """Check an infer request's body (``header_length``: the ``Inference-Header-Content-Length`` header, None
    without the binary-data extension).

    Raises:
        BadRequest (400): malformed JSON, not an inference request, a wrong input name, datatype, shape or element,
        bad binary sizes, an unknown or repeated output; EmptyBody (400): no images or an empty one;
        RequestTooCostly (413): more than ``max_images``; InvalidQuery (422): a bad camera_id, part_id or tiling.
    """
    header, binary = _split_body(body, header_length)
    request = _parse_json(header)
    names = [t.name for t in request.inputs]
    unknown = [n for n in names if n != INPUT_NAME]
    if unknown or len(names) != 1:
        raise BadRequest(
            f"inputs {[n[:64] for n in names[:4]]}: this model takes one input {INPUT_NAME!r} (BYTES, shape [n], "
            "one encoded image per element)"
        )
    images, used = _input_images(request.inputs[0], binary, max_images)
    if used != len(binary):
        raise BadRequest(f"{len(binary)} bytes follow the JSON header but the inputs declare {used}")
    params = request.parameters or {}
    return InferCall(
        images=images,
        request_id=request.id,
        camera_id=_text_param(params, "camera_id"),
        part_id=_text_param(params, "part_id"),
        tiling=_tiling(params),
        outputs=_outputs(request, _flag(params, "binary_data_output", "request")),
    )


@dataclass(frozen=True)
class _Tensor:
    datatype: str
    shape: list[int]
    values: npt.NDArray[Any] | list[str]

    def raw(self) -> bytes:
        if isinstance(self.values, list):
            return encode_bytes_elements([v.encode() for v in self.values])
        return self.values.tobytes()

    def json_data(self) -> list[Any]:
        return self.values if isinstance(self.values, list) else self.values.ravel().tolist()


def output_tensors(results: Sequence[InspectResult]) -> dict[str, _Tensor]:
    """Every output of a request's results: one row per detection (``batch_index`` says whose), one verdict per
    image. Boxes are x1, y1, x2, y2 in original-image pixels, as ``/v1/inspect`` answers them."""
    dets = [(i, d) for i, r in enumerate(results) for d in r.detections]
    n = len(dets)
    boxes = np.array([d.box_xyxy for _, d in dets], dtype="<f4").reshape(n, 4)
    return {
        "boxes": _Tensor("FP32", [n, 4], boxes),
        "scores": _Tensor("FP32", [n], np.array([d.score for _, d in dets], dtype="<f4")),
        "class_ids": _Tensor("INT32", [n], np.array([d.class_id for _, d in dets], dtype="<i4")),
        "class_names": _Tensor("BYTES", [n], [d.class_name for _, d in dets]),
        "batch_index": _Tensor("INT32", [n], np.array([i for i, _ in dets], dtype="<i4")),
        "verdict": _Tensor("BYTES", [len(results)], [r.verdict for r in results]),
    }


def encode_infer_response(
    head: dict[str, Any], tensors: dict[str, _Tensor], wanted: Sequence[tuple[str, bool]]
) -> tuple[bytes, int | None]:
    """The response body: ``head`` (model_name, model_version, id) plus the ``wanted`` outputs in order; with any
    binary output, the JSON header followed by their bytes, and the header's length (for
    ``Inference-Header-Content-Length``), else the JSON alone and None."""
    outputs, blobs = [], []
    for name, binary in wanted:
        tensor = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            blob = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.json_data()
        outputs.append(entry)
    header = json.dumps({**head, "outputs": outputs}, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
