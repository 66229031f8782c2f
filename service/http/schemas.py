"""Pydantic models of the HTTP API's own envelopes (errors, health, batches, swap requests); the inspection results
themselves are :mod:`service.core.results`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.results import InspectResult, ModelInfo, SwapInfo

__all__ = ["ErrorBody", "Health", "InspectBatchResponse", "SwapRequest", "SwapResponse"]


class InspectBatchResponse(BaseModel):
    """Response to a multipart request: one result per ``images`` part, in order."""

    request_id: str
    results: list[InspectResult]


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error, e.g. invalid_image, overloaded")
    message: str
    request_id: str | None


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1024, description="bundle folder, relative to swap.bundle_root")


class SwapResponse(BaseModel):
    status: Literal["swapped"]
    swap: SwapInfo
    model: ModelInfo


class Health(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    detail: str | None = None
