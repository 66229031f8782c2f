"""Read a ``torch.save`` zip archive without executing anything from it: a restricted unpickler.

``pickle`` runs whatever callable a file names (``os.system`` via ``__reduce__`` is the classic); ``torch.load`` with
``weights_only=True`` refuses pickled module objects, which is all an Ultralytics checkpoint is. This unpickler resolves
only the globals below: tensors and storages are rebuilt by our own code from the archive's raw bytes, a few inert
builtins and torch value types are allowed, and classes under ``ultralytics.`` and ``torch.nn.modules.`` become inert
:class:`Record` objects that hold the pickled state and have no behaviour. Every other global is refused with an
:class:`UnpickleRefused` naming it, before anything is called. See docs/byom.md, "Safety model".
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any, ClassVar

import torch

__all__ = ["RECORD_PREFIXES", "Record", "UnpickleRefused", "load_torch_archive"]

# Classes under these module prefixes are rebuilt as inert records (never imported, never called).
RECORD_PREFIXES = ("ultralytics.", "torch.nn.modules.")

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_DTYPES = {"float16", "float32", "float64", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


class UnpickleRefused(Exception):
    """The pickle names a global this reader does not rebuild (``module.name`` in ``self.name``), or is malformed."""

    def __init__(self, problem: str, name: str = "") -> None:
        super().__init__(problem)
        self.name = name


class Record:
    """An inert stand-in for a pickled object of a recognised class: its ``__dict__`` is the pickled state.

    ``qualname`` (``"ultralytics.nn.modules.conv.Conv"``) says what the object was. A record is only ever created and
    filled by the unpickler (``__new__`` + ``__dict__`` update, or a call with the pickled arguments stored in
    ``args``); nothing of the original class runs.
    """

    qualname: ClassVar[str] = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        # modules pickle their __dict__; a (dict, slots) pair or any other value is kept whole
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            self.__dict__.update(state[0] or {})
            if isinstance(state[1], dict):
                self.__dict__.update(state[1])
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<record {self.qualname}>"


class _StorageType:
    """What ``torch.HalfStorage`` (etc.) resolves to: only the dtype, read by ``persistent_load``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``: a view into a storage, checked to stay inside it, then copied."""
    if not isinstance(storage, torch.Tensor):
        raise UnpickleRefused(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
        raise UnpickleRefused(f"tensor with invalid geometry size={size} stride={stride} offset={offset}")
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1 if all(size) else offset
    if extent > storage.numel():
        raise UnpickleRefused(f"tensor reaches element {extent} of a storage of {storage.numel()}")
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    """``torch._utils._rebuild_parameter``: parameters come back as plain tensors (nothing here trains them)."""
    return data


def _record_class(module: str, name: str, cache: dict[str, type[Record]]) -> type[Record]:
    qualname = f"{module}.{name}"
    if qualname not in cache:
        cache[qualname] = type(name, (Record,), {"qualname": qualname, "__module__": __name__})
    return cache[qualname]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, torch.Tensor] = {}
        self._records: dict[str, type[Record]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles name Python 2's module; the default find_class maps it too
            module = "builtins"
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return getattr(torch, name)
        if module.startswith(RECORD_PREFIXES) and name.isidentifier():
            return _record_class(module, name, self._records)
        raise UnpickleRefused(
            f"refused global {module}.{name}: not a tensor, container or model class", f"{module}.{name}"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnpickleRefused(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not key.isalnum():
            raise UnpickleRefused(f"malformed storage reference {pid!r:.80}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise UnpickleRefused(f"storage {key} is missing from the archive") from None
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else torch.empty(0)
            if flat.numel() < int(numel):
                raise UnpickleRefused(f"storage {key} holds {flat.numel()} elements, the pickle says {numel}")
            self._storages[key] = flat
        return self._storages[key]


def load_torch_archive(path: str | Path) -> Any:
    """Unpickle the ``data.pkl`` of the ``torch.save`` zip at ``path`` with the restricted rules above.

    Raises:
        UnpickleRefused: a refused global (named in the message and in ``.name``), a malformed pickle or storage.
        zipfile.BadZipFile: not a zip archive (the legacy pre-1.6 torch format is not read).
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnpickleRefused(f"expected one <name>/data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0].split("/", 1)[0]
        order = f"{prefix}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
            raise UnpickleRefused("big-endian archives are not supported")
        with archive.open(pickles[0]) as f:
            try:
                return _Unpickler(f, archive, prefix).load()
            except UnpickleRefused:
                raise
            except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise UnpickleRefused(f"malformed pickle ({type(exc).__name__}: {exc})") from None
