"""The Open Inference Protocol v2 over HTTP (KServe v2 / Triton's HTTP API), beside ``/v1/inspect``: server and model
metadata, model readiness, and infer with the encoded image as a BYTES input (JSON or the binary-data extension).
Infer runs the same :meth:`~service.inference.pipeline.InspectionService.inspect` as ``/v1/inspect`` (admission,
batching, records, signals); only the wire format differs (:mod:`service.http.oip`). Errors are the protocol's
``{"error": message}`` with v1's status codes (:mod:`service.http.errors`). The health aliases ``/v2/health/live``
and ``/v2/health/ready`` are in :mod:`service.http.routes.health`. docs/v2-protocol.md has the wire format."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

from service.core.errors import EmptyBody, NotFound, NotReady, UnsupportedMediaType
from service.http.deps import InspectAuthDep, InspectServiceDep, ServiceDep
from service.http.oip import (
    EXTENSIONS,
    INPUT_NAME,
    OUTPUTS,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    TensorMetadata,
    V2Error,
    encode_infer_response,
    infer_request_schema,
    output_tensors,
    parse_infer_request,
)
from service.http.routes.inspect import read_body, unless_client_leaves
from service.inference.pipeline import ImageUpload, InspectionService
from service.inference.serving import ServingModel
from service.log_config import new_request_id, request_id_var

__all__ = ["v2_router"]

v2_router = APIRouter(tags=["v2"])

ModelName = Annotated[str, Path(description="the bundle's name")]
ModelVersion = Annotated[str, Path(description="the bundle's version")]


def _errors(**texts: str) -> dict[int | str, dict[str, Any]]:
    return {int(code[1:]): {"model": V2Error, "description": text} for code, text in texts.items()}


_AUTH = "API keys are configured and the request has none that is accepted (WWW-Authenticate header)"
_NOT_SERVED = "no model of that name (or version) is served here"
_METADATA_ERRORS = _errors(e401=_AUTH, e404=_NOT_SERVED, e503="the service is still starting")
_READY_ERRORS = {
    **_errors(e401=_AUTH, e404=_NOT_SERVED),
    503: {"model": ModelReady, "description": "not ready: loading, warming up or stopping"},
}
_INFER_ERRORS = _errors(
    e400="malformed JSON, not an inference request, wrong input name, datatype or shape, an element that is not "
    "base64 (JSON) or whose binary length does not fit, bad Inference-Header-Content-Length or binary_data_size, an "
    "unknown output, no image or an empty one",
    e401=_AUTH,
    e404=_NOT_SERVED,
    e413="body over max_upload_bytes, more images than max_images_per_request, an image over max_image_pixels, the "
    "request over max_request_pixels or max_decode_ms, or more tiles than the tiling limits or queue_size",
    e415="a Content-Encoding other than identity",
    e422="not an image, truncated or zero-size image; camera_id, part_id or tiling parameter out of range",
    e500="backend failure (only that batch's requests)",
    e503="not ready, or busy: decode stage or queue full, or the backlog would miss the deadline (Retry-After)",
    e504="deadline passed",
)
_INFER_200 = {
    "description": "JSON; with any binary output, the JSON header (its length in the Inference-Header-Content-Length "
    "header) followed by the binary outputs in order",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    "headers": {
        "Inference-Header-Content-Length": {
            "description": "length of the JSON header (only when some output is binary)",
            "schema": {"type": "integer"},
        }
    },
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": infer_request_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "the binary-data extension: the JSON request (its length in the "
                "Inference-Header-Content-Length header) followed by the inputs' binary data",
            },
        },
    }
}


def _served(service: InspectionService | None, name: str, version: str | None) -> ServingModel:
    """The live model if it is ``name`` (and ``version``); else 404, or 503 before the service runs."""
    if service is None:
        raise NotReady("the model is still loading or warming up; retry when /v2/health/ready says ready")
    model = service.model
    bundle = model.bundle
    if name != bundle.name:
        raise NotFound(f"unknown model {name[:64]!r}; this service serves {bundle.name!r} (GET /v2/models/{{name}})")
    if version is not None and version != bundle.version:
        raise NotFound(f"model {name!r} has no version {version[:64]!r}; it serves version {bundle.version!r}")
    return model


def _metadata(model: ServingModel) -> ModelMetadata:
    bundle = model.bundle
    return ModelMetadata(
        name=bundle.name,
        versions=[bundle.version],
        platform=f"aoi-inspect_{model.backend.kind}",
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=n, datatype=dt, shape=shape) for n, (dt, shape) in OUTPUTS.items()],
    )


def _ready(service: InspectionService | None, name: str, version: str | None) -> ModelReady | JSONResponse:
    if service is not None:
        _served(service, name, version)  # 404 for a model not served here, ready or not
        if service.ready and service.model.batcher.running:
            return ModelReady(name=name, ready=True)
    return JSONResponse(status_code=503, content=ModelReady(name=name, ready=False).model_dump())


async def _infer(
    request: Request, service: InspectionService, max_upload_bytes: int, max_images: int, name: str, version: str | None
) -> Response:
    arrival = time.monotonic()
    _served(service, name, version)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:32]!r} is not supported; send the body uncompressed")
    body = await read_body(request, max_upload_bytes)
    if not body:
        raise EmptyBody("request body is empty; send an inference request")
    call = parse_infer_request(body, request.headers.get("inference-header-content-length"), max_images)
    del body  # the images are copies: the request's bytes are not held twice while it is inspected
    rid = request_id_var.get() or new_request_id()
    work = service.inspect(
        [ImageUpload(data) for data in call.images],
        request_id=rid,
        arrival=arrival,
        camera_id=call.camera_id,
        part_id=call.part_id,
        tiling=call.tiling,
    )
    results = await unless_client_leaves(request, work)
    head = {
        "model_name": results[0].model_name,
        "model_version": results[0].model_version,
        "id": call.request_id or rid,
    }
    content, header_length = encode_infer_response(head, output_tensors(results), call.outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    headers = {"Inference-Header-Content-Length": str(header_length)}
    return Response(content, media_type="application/octet-stream", headers=headers)


@v2_router.get("/v2", response_model=ServerMetadata, responses=_errors(e401=_AUTH), summary="Server metadata")
async def server_metadata(request: Request, _auth: InspectAuthDep) -> ServerMetadata:
    """The server's name and version and the protocol extensions it supports."""
    return ServerMetadata(name=request.app.title, version=request.app.version, extensions=list(EXTENSIONS))


@v2_router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=_METADATA_ERRORS)
async def model_metadata(model_name: ModelName, _auth: InspectAuthDep, service: ServiceDep) -> ModelMetadata:
    """The model serving now: its name and version (the bundle's), platform, input and output tensors."""
    return _metadata(_served(service, model_name, None))


@v2_router.get(
    "/v2/models/{model_name}/versions/{model_version}", response_model=ModelMetadata, responses=_METADATA_ERRORS
)
async def model_version_metadata(
    model_name: ModelName, model_version: ModelVersion, _auth: InspectAuthDep, service: ServiceDep
) -> ModelMetadata:
    """As ``GET /v2/models/{model_name}``, for the version serving now (any other version: 404)."""
    return _metadata(_served(service, model_name, model_version))


@v2_router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=_READY_ERRORS)
async def model_ready(model_name: ModelName, _auth: InspectAuthDep, service: ServiceDep) -> ModelReady | JSONResponse:
    """200 ``{"name", "ready": true}`` when the model answers infer requests; 503 with ``ready`` false if not."""
    return _ready(service, model_name, None)


@v2_router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready", response_model=ModelReady, responses=_READY_ERRORS
)
async def model_version_ready(
    model_name: ModelName, model_version: ModelVersion, _auth: InspectAuthDep, service: ServiceDep
) -> ModelReady | JSONResponse:
    """As ``GET /v2/models/{model_name}/ready``, for the version serving now."""
    return _ready(service, model_name, model_version)


@v2_router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferResponse,
    responses={200: _INFER_200, **_INFER_ERRORS},
    openapi_extra=_INFER_BODY,
    summary="Inspect images sent as a BYTES tensor",
)
async def infer(request: Request, model_name: ModelName, service: InspectServiceDep) -> Response:
    """Input ``image``: BYTES ``[n]``, one encoded image (JPEG, PNG, BMP, TIFF) per element, base64 in JSON or raw
    with the binary-data extension; parameters ``camera_id``, ``part_id``, ``tiling`` as ``/v1/inspect``'s query.
    Outputs: ``boxes`` FP32 ``[d, 4]`` (x1, y1, x2, y2 in original-image pixels), ``scores`` FP32 ``[d]``,
    ``class_ids`` INT32 ``[d]``, ``class_names`` BYTES ``[d]``, ``batch_index`` INT32 ``[d]`` (the image of each
    detection), ``verdict`` BYTES ``[n]`` (OK or NG per image)."""
    settings = service.settings
    return await _infer(request, service, settings.max_upload_bytes, settings.max_images_per_request, model_name, None)


@v2_router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponse,
    responses={200: _INFER_200, **_INFER_ERRORS},
    openapi_extra=_INFER_BODY,
    summary="Inspect images sent as a BYTES tensor (this version)",
)
async def infer_version(
    request: Request,
    model_name: ModelName,
    model_version: ModelVersion,
    service: InspectServiceDep,
) -> Response:
    """As ``POST /v2/models/{model_name}/infer``, for the version serving now (any other version: 404)."""
    settings = service.settings
    return await _infer(
        request, service, settings.max_upload_bytes, settings.max_images_per_request, model_name, model_version
    )
