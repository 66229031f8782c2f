"""The HTTP floor of ``aoi bench service --cpu``: two servers that answer ``POST /v1/inspect`` with a fixed JSON body
the size of a real answer and do nothing else, run with uvicorn as the service is (uvloop, httptools).

- ``asgi``: a plain ASGI callable (reads the body, sends the answer): what uvicorn itself costs per request;
- ``fastapi_app``: the same route in FastAPI with what ``/v1/inspect`` declares (one dependency, three query
  parameters, a ``Response``): what the framework adds.

    python -m uvicorn benchmarks.bare_http:asgi --port 8081 --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response

__all__ = ["ANSWER", "asgi", "fastapi_app"]

# An OK answer's fields (no detections), as /v1/inspect sends them
ANSWER = json.dumps(
    {
        "request_id": "0123456789abcdef0123456789abcdef", "image_index": 0, "filename": None, "camera_id": None,
        "part_id": None, "model_name": "yolo11n.neu-det", "model_version": "1.5.0", "width": 200, "height": 200,
        "verdict": "OK", "detections": [], "batch_size": 8, "tiling": {"tiled": False, "tiles": 1, "batches": 1},
        "timings_ms": {"decode": 0.41, "queue": 0.2, "inference": 121.3, "postprocess": 1.9, "merge": 0.02,
                       "total": 140.2},
    }
).encode()  # fmt: skip
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Plain ASGI: the lifespan acknowledged, every HTTP request answered with :data:`ANSWER` once its body is read."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


fastapi_app = FastAPI()


async def _ready(request: Request) -> bool:
    return request.app is not None


@fastapi_app.post("/v1/inspect")
async def inspect(
    request: Request,
    ready: Annotated[bool, Depends(_ready)],
    camera_id: Annotated[str | None, Query(max_length=128)] = None,
    part_id: Annotated[str | None, Query(max_length=128)] = None,
    tiling: Annotated[Literal["auto", "on", "off"] | None, Query()] = None,
) -> Response:
    """Reads the body and answers :data:`ANSWER`."""
    await request.body()
    return Response(ANSWER, media_type="application/json")


@fastapi_app.get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ready": True}
