"""The few CUDA driver-API calls the TensorRT backend needs (streams, device and pinned host memory, async copies),
through ctypes on ``libcuda``: no cuda-python or pycuda dependency, and nothing loads until the backend is selected.

TensorRT runs on the device's primary context, the one the CUDA runtime uses, so the context is made current on
whichever thread calls :meth:`CudaDevice.bind` before any copy or launch.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CudaDevice", "CudaError", "PinnedBuffer"]


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and CUDA's error string."""


def _load() -> ctypes.CDLL:
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        p, u64, sz, i = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int
        sigs: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuDeviceGet": [ctypes.POINTER(i), i],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(p), i],
            "cuDevicePrimaryCtxRelease_v2": [i],
            "cuCtxSetCurrent": [p],
            "cuStreamCreate": [ctypes.POINTER(p), ctypes.c_uint],
            "cuStreamDestroy_v2": [p],
            "cuStreamSynchronize": [p],
            "cuMemAlloc_v2": [ctypes.POINTER(u64), sz],
            "cuMemFree_v2": [u64],
            "cuMemAllocHost_v2": [ctypes.POINTER(p), sz],
            "cuMemFreeHost": [p],
            "cuMemcpyHtoDAsync_v2": [u64, p, sz, p],
            "cuMemcpyDtoHAsync_v2": [p, u64, sz, p],
            "cuGetErrorString": [i, ctypes.POINTER(ctypes.c_char_p)],
        }
        for fn, argtypes in sigs.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = i
        return lib
    raise CudaError("CUDA driver library (libcuda) not found: no NVIDIA driver on this machine")


class PinnedBuffer:
    """Page-locked host memory of ``nbytes`` plus a device allocation of the same size."""

    def __init__(self, dev: CudaDevice, nbytes: int) -> None:
        self._dev = dev
        self.nbytes = nbytes
        host = ctypes.c_void_p()
        dev.call("cuMemAllocHost_v2", ctypes.byref(host), nbytes)
        self.host_ptr = int(host.value or 0)
        dptr = ctypes.c_uint64()
        dev.call("cuMemAlloc_v2", ctypes.byref(dptr), nbytes)
        self.device_ptr = int(dptr.value)

    def host_array(self, dtype: npt.DTypeLike, count: int) -> npt.NDArray[Any]:
        """A numpy view of the pinned host memory (``count`` elements of ``dtype``)."""
        raw = (ctypes.c_byte * self.nbytes).from_address(self.host_ptr)
        arr: npt.NDArray[Any] = np.frombuffer(memoryview(raw), dtype=np.dtype(dtype), count=count)
        return arr

    def free(self) -> None:
        if self.device_ptr:
            self._dev.call("cuMemFree_v2", self.device_ptr)
            self.device_ptr = 0
        if self.host_ptr:
            self._dev.call("cuMemFreeHost", ctypes.c_void_p(self.host_ptr))
            self.host_ptr = 0


class CudaDevice:
    """Primary context of one device, with one stream."""

    def __init__(self, device_id: int) -> None:
        self._lib = _load()
        self.device_id = device_id
        self.call("cuInit", 0)
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), device_id)
        self._dev = dev.value
        ctx = ctypes.c_void_p()
        self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), self._dev)
        self._ctx = ctx
        self.bind()
        stream = ctypes.c_void_p()
        self.call("cuStreamCreate", ctypes.byref(stream), 0)
        self.stream = stream

    @property
    def stream_handle(self) -> int:
        return int(self.stream.value or 0)

    def call(self, fn: str, *args: Any) -> None:
        rc = getattr(self._lib, fn)(*args)
        if rc != 0:
            msg = ctypes.c_char_p()
            self._lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise CudaError(f"{fn} failed: {(msg.value or b'unknown error').decode()} (code {rc})")

    def bind(self) -> None:
        """Make this device's primary context current on the calling thread."""
        self.call("cuCtxSetCurrent", self._ctx)

    def copy_to_device(self, buf: PinnedBuffer, nbytes: int) -> None:
        self.call("cuMemcpyHtoDAsync_v2", buf.device_ptr, ctypes.c_void_p(buf.host_ptr), nbytes, self.stream)

    def copy_to_host(self, buf: PinnedBuffer, nbytes: int) -> None:
        self.call("cuMemcpyDtoHAsync_v2", ctypes.c_void_p(buf.host_ptr), buf.device_ptr, nbytes, self.stream)

    def synchronize(self) -> None:
        self.call("cuStreamSynchronize", self.stream)

    def close(self) -> None:
        if self.stream.value:
            self.call("cuStreamDestroy_v2", self.stream)
            self.stream = ctypes.c_void_p()
        self.call("cuDevicePrimaryCtxRelease_v2", self._dev)
