"""The Open Inference Protocol v2 routes driven by the real tritonclient (HTTP) against a real uvicorn server on the
synthetic ONNX Runtime CPU bundle: health, metadata, readiness, infer with the image as BYTES in JSON and binary mode
giving exactly what ``/v1/inspect`` gives on the same images, one record per image, bad tensors answered 4xx in the
protocol's ``{"error"}`` form; raw requests (httpx) for the wire format itself."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.core.errors import BadRequest
from service.http.app import create_app
from service.http.oip import InferResponse, encode_bytes_elements, split_bytes_elements
from service.settings import AuthSettings, RecordsSettings, Settings
from tests.service.conftest import FakeBackend, serve, uvicorn_thread
from tests.service.inference.test_admission import _fill_the_queue
from tests.service.inference.test_batching import _EnteredBackend
from tests.synthetic import encode_image

pytestmark = pytest.mark.integration

OUTPUTS = ("boxes", "scores", "class_ids", "class_names", "batch_index", "verdict")
MAX_UPLOAD = 256 * 1024
MAX_IMAGES = 4


def _patches(*boxes: tuple[int, int, int, int, int], width: int = 128, height: int = 96, fmt: str = "png") -> bytes:
    """A black image with a coloured rectangle per (x1, y1, x2, y2, channel): red scores class 0, green class 1."""
    img = np.zeros((height, width, 3), np.uint8)
    for x1, y1, x2, y2, channel in boxes:
        img[y1:y2, x1:x2, channel] = 255
    return encode_image(img, fmt)


IMAGES = {
    "red.png": _patches((32, 16, 80, 64, 0)),
    "red-green.bmp": _patches((8, 8, 40, 40, 0), (70, 40, 120, 90, 1), width=160, height=100, fmt="bmp"),
    "green.jpeg": _patches((20, 30, 60, 70, 1), width=96, height=96, fmt="jpeg"),
    "black.png": _patches(),
}


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One service (ONNX Runtime CPU, durable records in a temporary folder) on a real uvicorn server."""
    settings = Settings(
        bundle=bundle_dir,
        backend="onnxruntime-cpu",
        max_delay_ms=0,
        max_upload_bytes=MAX_UPLOAD,
        max_images_per_request=MAX_IMAGES,
        data_dir=tmp_path_factory.mktemp("v2-data"),
        records=RecordsSettings(durability="durable"),
    )
    with uvicorn_thread(create_app(settings)) as port:
        yield f"127.0.0.1:{port}"


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server)
    yield c
    c.close()


def _image_input(images: list[bytes], binary: bool) -> triton.InferInput:
    """The ``image`` input as a tritonclient user writes it: raw bytes in binary mode, base64 text in JSON mode."""
    values = images if binary else [base64.b64encode(i) for i in images]
    inp = triton.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return inp


def _infer(client: triton.InferenceServerClient, images: list[bytes], binary: bool, **kw: Any) -> triton.InferResult:
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    return client.infer("synthetic", [_image_input(images, binary)], outputs=outputs, **kw)


def _v1(server: str, images: list[bytes], **params: str) -> list[dict[str, Any]]:
    files = [("images", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    r = httpx.post(f"http://{server}/v1/inspect", files=files, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


def _texts(values: Any) -> list[str]:
    """A BYTES output as text: tritonclient gives bytes from binary outputs, str from JSON ones."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def _assert_same_as_v1(result: triton.InferResult, v1: list[dict[str, Any]]) -> None:
    boxes, scores = result.as_numpy("boxes"), result.as_numpy("scores")
    class_ids, batch_index = result.as_numpy("class_ids"), result.as_numpy("batch_index")
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and class_ids.dtype == np.int32
    dets = [(i, d) for i, r in enumerate(v1) for d in r["detections"]]
    assert boxes.shape == (len(dets), 4) and scores.shape == class_ids.shape == batch_index.shape == (len(dets),)
    assert batch_index.tolist() == [i for i, _ in dets]
    assert class_ids.tolist() == [d["class_id"] for _, d in dets]
    assert _texts(result.as_numpy("class_names")) == [d["class_name"] for _, d in dets]
    expected_boxes = np.array([d["box_xyxy"] for _, d in dets], np.float32).reshape(-1, 4)
    np.testing.assert_allclose(boxes, expected_boxes, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(scores, np.array([d["score"] for _, d in dets], np.float32), rtol=1e-6, atol=1e-6)
    assert _texts(result.as_numpy("verdict")) == [r["verdict"] for r in v1]


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("synthetic") and client.is_model_ready("synthetic", "1.0.0")
    assert not client.is_model_ready("other") and not client.is_model_ready("synthetic", "9")
    server = client.get_server_metadata()
    assert server["name"] == "aoi-inspect" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("synthetic")
    assert client.get_model_metadata("synthetic", "1.0.0") == meta
    assert meta["name"] == "synthetic" and meta["versions"] == ["1.0.0"]
    assert meta["platform"] == "aoi-inspect_onnxruntime-cpu"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "boxes": ("FP32", [-1, 4]),
        "scores": ("FP32", [-1]),
        "class_ids": ("INT32", [-1]),
        "class_names": ("BYTES", [-1]),
        "batch_index": ("INT32", [-1]),
        "verdict": ("BYTES", [-1]),
    }
    for name, version in (("other", ""), ("synthetic", "2.0.0")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(name, version)
        assert err.value.status() == "404"
        assert "serves 'synthetic'" in err.value.message() or "serves version '1.0.0'" in err.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_equals_v1(server: str, client: triton.InferenceServerClient, binary: bool) -> None:
    for name, data in IMAGES.items():
        result = _infer(client, [data], binary, parameters={"camera_id": "cam-2"})
        _assert_same_as_v1(result, _v1(server, [data], camera_id="cam-2"))
        assert result.get_response()["model_name"] == "synthetic", name
    assert _texts(_infer(client, [IMAGES["red.png"]], binary).as_numpy("verdict")) == ["NG"]
    assert _infer(client, [IMAGES["black.png"]], binary).as_numpy("boxes").shape == (0, 4)
    # Several images in one request: one batch, rows tagged by batch_index, one verdict per image in input order.
    several = list(IMAGES.values())
    result = _infer(client, several, binary, model_version="1.0.0")
    _assert_same_as_v1(result, _v1(server, several))
    assert set(result.as_numpy("batch_index").tolist()) == {0, 1, 2}  # the black image has no detections


def test_outputs_requested_and_mixed_binary(server: str, client: triton.InferenceServerClient) -> None:
    data = IMAGES["red-green.bmp"]
    outputs = [triton.InferRequestedOutput("verdict", binary_data=False), triton.InferRequestedOutput("scores")]
    result = client.infer("synthetic", [_image_input([data], True)], outputs=outputs, request_id="mine")
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["verdict", "scores"] and response["id"] == "mine"
    assert response["outputs"][0]["data"] == ["NG"] and "binary_data_size" in response["outputs"][1]["parameters"]
    assert result.as_numpy("boxes") is None
    # No outputs named: tritonclient asks for every output as binary (binary_data_output).
    everything = client.infer("synthetic", [_image_input([data], True)])
    assert [o["name"] for o in everything.get_response()["outputs"]] == list(OUTPUTS)
    _assert_same_as_v1(everything, _v1(server, [data]))


def test_records_one_per_image(server: str, client: triton.InferenceServerClient) -> None:
    images = [IMAGES["red.png"], IMAGES["black.png"]]
    params = {"camera_id": "line-3", "part_id": "P-77"}
    _infer(client, images, True, headers={"X-Request-ID": "v2-records"}, parameters=params)
    r = httpx.get(f"http://{server}/v1/inspections/v2-records", timeout=10)
    assert r.status_code == 200, r.text
    recorded = r.json()["images"]
    assert len(recorded) == 2
    assert [(x["camera_id"], x["part_id"], x["verdict"]) for x in recorded] == [
        ("line-3", "P-77", "NG"),
        ("line-3", "P-77", "OK"),
    ]


def _bad_tensor_cases() -> list[tuple[str, list[triton.InferInput], int, str]]:
    fp32 = triton.InferInput("image", [1], "FP32")
    fp32.set_data_from_numpy(np.zeros(1, np.float32))
    named = triton.InferInput("images", [1], "BYTES")
    named.set_data_from_numpy(np.array([IMAGES["red.png"]], dtype=np.object_))
    two_d = triton.InferInput("image", [1, 2], "BYTES")
    two_d.set_data_from_numpy(np.array([[IMAGES["red.png"], IMAGES["red.png"]]], dtype=np.object_))
    empty = triton.InferInput("image", [0], "BYTES")
    empty.set_data_from_numpy(np.array([], dtype=np.object_))
    return [
        ("datatype", [fp32], 400, "it must be BYTES"),
        ("name", [named], 400, "this model takes one input 'image'"),
        ("shape", [two_d], 400, "it must be [n]"),
        ("empty", [empty], 400, "has no elements"),
        ("empty element", [_image_input([b""], True)], 400, "element 0 is empty"),
        ("not an image", [_image_input([b"GIF89a not supported"], True)], 422, "image"),
        ("too many images", [_image_input([IMAGES["red.png"]] * (MAX_IMAGES + 1), True)], 413, "max_images"),
        ("oversized", [_image_input([bytes(MAX_UPLOAD + 1)], True)], 413, "max_upload_bytes"),
        ("two inputs", [_image_input([IMAGES["red.png"]], True), named], 400, "one input 'image'"),
        ("not base64", [_json_input(["not base64!"])], 400, "not base64"),
    ]


def _json_input(values: list[str]) -> triton.InferInput:
    inp = triton.InferInput("image", [len(values)], "BYTES")
    inp.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=False)
    return inp


def test_bad_tensors_are_4xx_in_the_protocol_form(client: triton.InferenceServerClient) -> None:
    for name, inputs, status, text in _bad_tensor_cases():
        with pytest.raises(InferenceServerException) as err:
            client.infer("synthetic", inputs)
        assert (err.value.status(), name) == (str(status), name), err.value.message()
        assert text in (err.value.message() or ""), (name, err.value.message())
    for params, text in (({"tiling": "sideways"}, "tiling"), ({"camera_id": "x" * 200}, "camera_id")):
        with pytest.raises(InferenceServerException) as err:
            client.infer("synthetic", [_image_input([IMAGES["red.png"]], True)], parameters=params)
        assert err.value.status() == "422" and text in (err.value.message() or "")
    for model, version in (("nope", ""), ("synthetic", "0.9")):
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, [_image_input([IMAGES["red.png"]], True)], model_version=version)
        assert err.value.status() == "404"
    bad_output = [triton.InferRequestedOutput("masks")]
    with pytest.raises(InferenceServerException) as err:
        client.infer("synthetic", [_image_input([IMAGES["red.png"]], True)], outputs=bad_output)
    assert err.value.status() == "400" and "unknown output 'masks'" in (err.value.message() or "")


def _post(server: str, body: bytes, headers: dict[str, str] | None = None, path: str = "synthetic/infer") -> Any:
    return httpx.post(f"http://{server}/v2/models/{path}", content=body, headers=headers or {}, timeout=30)


def _error(r: httpx.Response, status: int, text: str) -> None:
    assert r.status_code == status, r.text
    assert r.json().keys() == {"error"} and text in r.json()["error"], r.text
    assert r.headers["x-request-id"]


def test_raw_json_request_like_curl(server: str) -> None:
    data = IMAGES["red-green.bmp"]
    request = {
        "id": "curl-1",
        "parameters": {"camera_id": "cam-9"},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
    }
    r = _post(server, json.dumps(request).encode(), {"content-type": "application/json", "x-request-id": "rid-1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    assert "inference-header-content-length" not in r.headers and r.headers["x-request-id"] == "rid-1"
    body = InferResponse.model_validate(r.json())
    assert (body.model_name, body.model_version, body.id) == ("synthetic", "1.0.0", "curl-1")
    out = {o.name: o for o in body.outputs}
    assert [o.name for o in body.outputs] == list(OUTPUTS) and out["verdict"].data == ["NG"]
    v1 = _v1(server, [data])[0]["detections"]
    assert out["boxes"].shape == [len(v1), 4] and out["class_names"].data == [d["class_name"] for d in v1]
    assert out["boxes"].data == pytest.approx([c for d in v1 for c in d["box_xyxy"]], abs=1e-4)
    # A nested data array (row-major, shape [1, 1]) is the same request.
    request["inputs"][0].update(shape=[1, 1], data=[[base64.b64encode(data).decode()]])  # type: ignore[index]
    assert _post(server, json.dumps(request).encode()).json()["outputs"] == r.json()["outputs"]


def test_raw_binary_request_and_framing_errors(server: str) -> None:
    data = IMAGES["red.png"]
    element = encode_bytes_elements([data])
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(element)}}
            ],
            "outputs": [{"name": "scores", "parameters": {"binary_data": True}}],
        }
    ).encode()
    ok = _post(server, header + element, {"inference-header-content-length": str(len(header))})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/octet-stream"
    size = int(ok.headers["inference-header-content-length"])
    head = json.loads(ok.content[:size])
    scores = np.frombuffer(ok.content[size:], "<f4")
    assert head["outputs"][0]["parameters"]["binary_data_size"] == scores.nbytes and scores.max() == pytest.approx(1)
    cases = [
        (header + element, {}, 400, "malformed JSON"),  # binary data but no header length
        (header + element, {"inference-header-content-length": "x"}, 400, "Inference-Header-Content-Length"),
        (header + element, {"inference-header-content-length": str(len(header) + len(element) + 1)}, 400, "between"),
        (header + element[:-3], {"inference-header-content-length": str(len(header))}, 400, "does not fit"),
        (header + element + b"xx", {"inference-header-content-length": str(len(header))}, 400, "inputs declare"),
        (header + b"\xff\xff\x00\x00" + element[4:], {"inference-header-content-length": str(len(header))}, 400,
         "declares 65535 bytes"),
        (b"{not json", {}, 400, "malformed JSON"),
        (b'{"inputs": "image"}', {}, 400, "not an inference request"),
        (b"", {}, 400, "empty"),
        (header + element, {"content-encoding": "gzip", "inference-header-content-length": str(len(header))}, 415,
         "Content-Encoding"),
    ]  # fmt: skip
    for body, headers, status, text in cases:
        _error(_post(server, body, headers), status, text)
    _error(_post(server, b"{}", path="synthetic/versions/2/infer"), 404, "no version '2'")
    _error(httpx.get(f"http://{server}/v2/models/synthetic/infer"), 405, "Method Not Allowed")
    _error(httpx.get(f"http://{server}/v2/models/x/y/z"), 404, "Not Found")
    r = httpx.get(f"http://{server}/v2/models/nope/ready")
    _error(r, 404, "unknown model 'nope'")


def test_openapi_documents_every_v2_status(server: str) -> None:
    paths = httpx.get(f"http://{server}/openapi.json").json()["paths"]
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["responses"]) == {"200", "400", "401", "404", "413", "415", "422", "500", "503", "504"}
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert "$ref" not in json.dumps(infer["requestBody"])  # the request schema is written in place
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    for path in ("/v2", "/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}/ready"):
        assert "401" in paths[path]["get"]["responses"]


def test_bytes_elements_framing() -> None:
    values = [b"", b"a", bytes(range(256)) * 3]
    assert split_bytes_elements(memoryview(encode_bytes_elements(values)), "t") == values
    with pytest.raises(BadRequest, match="4-byte element length"):
        split_bytes_elements(memoryview(b"\x01\x00"), "t")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_v2_uses_the_inspect_keys(bundle: Any, anyio_backend: str) -> None:
    auth = AuthSettings(inspect_keys=["k1"])  # type: ignore[list-item]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(IMAGES["red.png"]).decode()]}]}  # fmt: skip
    async with serve(Settings(max_delay_ms=0, auth=auth), bundle=bundle, backend=FakeBackend(bundle)) as http:
        for path in ("/v2", "/v2/models/synthetic", "/v2/models/synthetic/ready"):
            r = await http.get(path)
            assert r.status_code == 401 and r.json().keys() == {"error"} and "www-authenticate" in r.headers, path
        r = await http.post("/v2/models/synthetic/infer", json=request)
        assert r.status_code == 401 and r.json().keys() == {"error"}
        r = await http.post("/v2/models/synthetic/infer", json=request, headers={"authorization": "Bearer k1"})
        assert r.status_code == 200 and r.json()["outputs"][-1]["data"] == ["NG"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_door_refuses_v2_infer_in_the_protocol_form(bundle: Any, anyio_backend: str) -> None:
    backend = _EnteredBackend(bundle)
    settings = Settings(max_batch_size=1, max_delay_ms=0, queue_size=1, deadline_ms=5000)
    async with serve(settings, bundle=bundle, backend=backend) as http:
        first, second = await _fill_the_queue(http, backend, {"content-type": "image/png"})
        # a body the route would answer 400: the 503 shows the route never saw the request
        r = await http.post("/v2/models/synthetic/infer", content=b"x", headers={"x-request-id": "door-v2"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.headers["x-request-id"] == "door-v2"
        assert r.json().keys() == {"error"} and "queue" in r.json()["error"]
        backend.gate.set()
        assert [x.status_code for x in await asyncio.gather(first, second)] == [200, 200]
