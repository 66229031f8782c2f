"""The restricted unpickler: tensors and module records come back, code-running and unknown globals are refused."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from models import CheckpointError, load_checkpoint
from models.safe_unpickle import Record, UnpickleRefused, load_torch_archive


class _RunsCode:
    """Unpickling this with plain pickle runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class _Local(nn.Module):
    pass


def _archive(path: Path, payload: bytes) -> Path:
    """A torch.save-shaped zip whose data.pkl is ``payload``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps({"model": _RunsCode(f"touch {marker}")}, protocol=2)
    evil = _archive(tmp_path / "evil.pt", payload)
    with pytest.raises(UnpickleRefused, match=r"refused global (posix|os|nt)\.system") as info:
        load_torch_archive(evil)
    assert info.value.name.endswith(".system")
    # through the checkpoint entry point as well: the message names the file and the global, nothing ran
    with pytest.raises(CheckpointError, match=r"evil\.pt: not loaded, nothing in it was run: refused global"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the same bytes through plain pickle do run the command: the test payload is real
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize(
    ("obj", "name"),
    [(Path("x"), "pathlib.PosixPath"), (_Local(), "tests.models.test_safe_unpickle._Local"), (eval, "builtins.eval")],
)
def test_unknown_globals_are_refused_by_name(tmp_path: Path, obj: object, name: str) -> None:
    path = tmp_path / "other.pt"
    torch.save({"x": obj}, path)
    with pytest.raises(UnpickleRefused, match=f"refused global {name}:") as info:
        load_torch_archive(path)
    assert info.value.name == name


def test_tensors_and_module_records_are_rebuilt(tmp_path: Path) -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).half()
    weight = torch.arange(12, dtype=torch.float32).view(3, 4)
    path = tmp_path / "m.pt"
    torch.save({"model": conv, "view": weight[:, 1:3], "names": {0: "a"}, "size": torch.Size([2, 3])}, path)
    raw = load_torch_archive(path)
    seq = raw["model"]
    assert isinstance(seq, Record) and seq.qualname == "torch.nn.modules.container.Sequential"
    first = seq.__dict__["_modules"]["0"]
    assert first.qualname == "torch.nn.modules.conv.Conv2d" and first.__dict__["kernel_size"] == (3, 3)
    w = first.__dict__["_parameters"]["weight"]
    assert w.dtype == torch.float16 and torch.equal(w, conv[0].weight.detach())
    torch.testing.assert_close(raw["view"], weight[:, 1:3])  # a strided view into a shared storage
    assert raw["names"] == {0: "a"} and raw["size"] == torch.Size([2, 3])


def test_malformed_archives(tmp_path: Path) -> None:
    with pytest.raises(UnpickleRefused, match=r"one <name>/data\.pkl"):
        with zipfile.ZipFile(tmp_path / "empty.pt", "w") as z:
            z.writestr("x/other", b"")
        load_torch_archive(tmp_path / "empty.pt")
    with pytest.raises(UnpickleRefused, match="malformed pickle"):
        load_torch_archive(_archive(tmp_path / "cut.pt", pickle.dumps({"a": [1, 2, 3]}, protocol=2)[:-5]))
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile):
        load_torch_archive(tmp_path / "plain.pt")


def test_tensor_outside_its_storage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"t": torch.zeros(4)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    data = next(n for n in members if "/data/" in n)
    members[data] = members[data][:8]  # 2 of the 4 float32 elements left
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(UnpickleRefused, match="holds 2 elements"):
        load_torch_archive(path)
