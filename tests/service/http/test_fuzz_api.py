"""Schemathesis over the service's whole OpenAPI document, on a real uvicorn server: every operation the app serves
(v1, admin, records, review, plant, station, health, metrics and the v2 protocol routes; picked up from the schema,
so a new route is fuzzed without a list edit), with valid and with invalid inputs, with the admin key and without.
Checks on every answer: no 5xx, no status code its operation does not document, the content type and the body its
schema documents for that status, and every error is JSON carrying the request id (``X-Request-ID``; the
``ErrorBody``'s ``request_id`` equals it). A few hand-made cases (a real image, its records and review decisions, a
swap to a valid bundle and back) make sure the success answers are checked too, not only the refusals random data
gets."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.core.bundle import load_bundle, write_bundle
from service.http.app import create_app
from service.settings import AuthSettings, Settings, SwapSettings
from tests.service.conftest import FakeBackend, uvicorn_thread
from tests.synthetic import encode_image

pytestmark = pytest.mark.integration

ADMIN_KEY = "fuzz-admin-key"
WITH_KEY = {"authorization": f"Bearer {ADMIN_KEY}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# (generation mode, admin key sent, examples per operation): bounded so the whole run stays well under a minute on
# two cores (docs/service.md, "Fuzzing the API"); derandomized, so every run and machine sends the same cases.
PASSES = [
    (GenerationMode.POSITIVE, True, 30),
    (GenerationMode.NEGATIVE, True, 20),
    (GenerationMode.POSITIVE, False, 8),
]


def _red_patch() -> bytes:
    """An image the synthetic model calls NG: its record keeps the image, so the image route answers it."""
    img = np.zeros((96, 128, 3), np.uint8)
    img[16:64, 32:80, 0] = 255
    return encode_image(img, "png")


NG_PNG = _red_patch()
# a syntax error, nesting deeper than Python's JSON parser goes (RecursionError), a string that is not UTF-8, nothing
MALFORMED_JSON = [b'{"path": ', b"[" * 100_000, b'{"path": "\xff\xfe"}', b"", b"\x00" * 16]
V1_OPERATIONS = {
    "POST /v1/inspect",
    "GET /v1/model",
    "POST /v1/admin/bundle",
    "POST /v1/admin/rollback",
    "GET /v1/inspections",
    "GET /v1/inspections/{request_id}",
    "GET /v1/inspections/{request_id}/images/{index}",
    "GET /v1/plant/inspections",
    "GET /v1/station",
    "GET /v1/review/queue",
    "GET /v1/review/classes",
    "POST /v1/inspections/{request_id}/images/{index}/review",
    "DELETE /v1/inspections/{request_id}/images/{index}/review",
    "GET /v1/inspections/{request_id}/images/{index}/reviews",
    "GET /v1/inspections/{request_id}/images/{index}/image",
    "POST /review/session",
    "DELETE /review/session",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
}


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory, bundle_dir: Path) -> Path:
    """``swap.bundle_root`` with the served bundle (``v1``) and a valid second version (``v2``) to swap to."""
    root = tmp_path_factory.mktemp("bundles")
    shutil.copytree(bundle_dir, root / "v1")
    shutil.copytree(bundle_dir, root / "v2")
    write_bundle(load_bundle(root / "v2").model_copy(update={"version": "2.0.0"}), root / "v2")
    return root


@pytest.fixture(scope="module")
def base_url(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with admin keys (so the unkeyed pass meets their 401s)."""
    bundle = load_bundle(bundle_root / "v1")
    app = create_app(
        Settings(
            bundle=bundle_root / "v1",
            max_upload_bytes=256 * 1024,
            max_delay_ms=0,
            swap=SwapSettings(bundle_root=bundle_root),
            auth=AuthSettings(admin_keys=[ADMIN_KEY]),  # type: ignore[list-item]
            data_dir=tmp_path_factory.mktemp("data"),
        ),
        bundle=bundle,
        backend=FakeBackend(bundle),
    )
    with uvicorn_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


def _error_form(case: schemathesis.Case[Any], response: schemathesis.Response) -> None:
    what = f"{case.method} {case.formatted_path}: {response.status_code} {response.content[:300]!r}"
    rid = response.headers.get("x-request-id", [""])[0]  # schemathesis keeps every value of a header
    assert rid, what
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), what
        body = response.json()
        assert isinstance(body, dict) and ("error" in body or body.get("request_id") == rid), what


def _call(case: schemathesis.Case[Any], base_url: str, key: bool) -> schemathesis.Response:
    headers = WITH_KEY if key else None
    response = case.call(base_url=base_url, headers=headers, timeout=30)
    case.validate_response(response, checks=CHECKS, headers=headers)
    _error_form(case, response)
    return response


def _known_cases(api_schema: schemathesis.BaseSchema, base_url: str) -> Counter[str]:
    """Success answers random data rarely reaches: a real image, its records, a swap to ``v2`` and back."""
    op = {_label(o): o for o in _operations(api_schema)}
    ran: Counter[str] = Counter()

    def run(label: str, expect: int, **kw: Any) -> schemathesis.Response:
        response = _call(op[label].Case(**kw), base_url, key=True)
        assert response.status_code == expect, f"{label}: {response.status_code} {response.content[:300]!r}"
        ran[label] += 1
        return response

    result = run("POST /v1/inspect", 200, body=NG_PNG, media_type="image/png", query={"camera_id": "cam-1"}).json()
    assert result["verdict"] == "NG"
    rid = result["request_id"]
    run("GET /v1/inspections", 200, query={"camera_id": "cam-1"})
    run("GET /v1/inspections/{request_id}", 200, path_parameters={"request_id": rid})
    run("GET /v1/inspections/{request_id}/images/{index}", 200, path_parameters={"request_id": rid, "index": 0})
    run("GET /v1/inspections/{request_id}/images/{index}", 404, path_parameters={"request_id": rid, "index": 9})
    image = {"request_id": rid, "index": 0}
    run("GET /v1/review/queue", 200, query={"camera_id": "cam-1"})
    run("GET /v1/review/classes", 200)
    run("GET /v1/inspections/{request_id}/images/{index}/image", 200, path_parameters=image)
    for body in ({"decision": "confirmed"}, {"decision": "skipped", "reviewer": "fuzz"}):
        run("POST /v1/inspections/{request_id}/images/{index}/review", 201, path_parameters=image, body=body,
            media_type="application/json")  # fmt: skip
    run("GET /v1/inspections/{request_id}/images/{index}/reviews", 200, path_parameters=image)
    run("DELETE /v1/inspections/{request_id}/images/{index}/review", 200, path_parameters=image)
    run("POST /review/session", 204, body={"key": ADMIN_KEY, "reviewer": "fuzz"}, media_type="application/json")
    run("DELETE /review/session", 204)
    run("POST /v1/admin/bundle", 200, body={"path": "v2"}, media_type="application/json")
    run("POST /v1/admin/rollback", 200)
    run("POST /v1/admin/bundle", 422, body={"path": "a" * 300}, media_type="application/json")  # ENAMETOOLONG
    return ran


def _malformed_json(api_schema: schemathesis.BaseSchema, base_url: str) -> Counter[str]:
    """Bodies no JSON parser takes, sent to every operation whose body is JSON (schemathesis only sends bodies that
    are JSON, valid or not for the schema): each must be a documented 4xx in the route's error form."""
    ran: Counter[str] = Counter()
    with requests.Session() as session:
        model = session.get(f"{base_url}/v1/model", headers=WITH_KEY, timeout=30).json()
        known = {"model_name": model["name"], "model_version": model["version"]}  # reach the body, not a 404
        for op in _operations(api_schema):
            if "application/json" not in op.definition.raw.get("requestBody", {}).get("content", {}):
                continue
            names = [p.name for p in op.path_parameters]
            case = op.Case(media_type="application/json", path_parameters={n: known.get(n, "x") for n in names})
            for body in MALFORMED_JSON:
                response = session.request(
                    op.method.upper(),
                    base_url + case.formatted_path,
                    data=body,
                    headers={"content-type": "application/json", **WITH_KEY},
                    timeout=30,
                )
                assert 400 <= response.status_code < 500, f"{op.label} {body[:20]!r}: {response.status_code}"
                case.validate_response(response, checks=CHECKS)
                ran[_label(op)] += 1
    return ran


def _fuzz(operation: Any, base_url: str, mode: GenerationMode, key: bool, examples: int) -> int:
    sent = 0

    # derandomize: the same examples on every run and machine (a failure reproduces; CI never flakes on luck)
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case[Any]) -> None:
        nonlocal sent
        sent += 1
        _call(case, base_url, key)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # no input of this operation can be invalid (plain string path parameters, no body): nothing to send
    return sent


def test_every_operation_answers_as_documented(base_url: str) -> None:
    api_schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = _operations(api_schema)
    labels = {_label(op) for op in operations}
    assert labels >= V1_OPERATIONS, V1_OPERATIONS - labels  # and whatever else the schema has (v2): all of it
    start = time.perf_counter()
    sent = _known_cases(api_schema, base_url) + _malformed_json(api_schema, base_url)
    for op in operations:
        for mode, key, examples in PASSES:
            if mode is GenerationMode.NEGATIVE and not _has_inputs(op):
                continue  # nothing to make invalid: no parameters, no body
            sent[_label(op)] += _fuzz(op, base_url, mode, key, examples)
    elapsed = time.perf_counter() - start
    print(f"\nschemathesis: {sum(sent.values())} cases over {len(operations)} operations in {elapsed:.1f} s")
    for label, n in sorted(sent.items()):
        print(f"  {n:4d}  {label}")
    assert all(sent[label] > 0 for label in labels)


def _operations(api_schema: schemathesis.BaseSchema) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]  # type: ignore[union-attr]  # Ok, or raise


def _label(operation: Any) -> str:
    return f"{operation.method.upper()} {operation.path}"


def _has_inputs(operation: Any) -> bool:
    raw: dict[str, Any] = operation.definition.raw
    return bool(raw.get("parameters") or raw.get("requestBody"))
