"""Live model swap: a new bundle loaded beside the serving one, checked, switched atomically; broken ones refused
while the old one serves; rollback; the folder watch (docs/service.md, "Live model swap"). SIGHUP is tested on a
real process (test_lifecycle.py): a signal sent to the test runner itself would reach every thread of it."""

from __future__ import annotations

import asyncio
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from service.core.bundle import ModelBundle, load_bundle, write_bundle
from service.settings import Settings, SwapSettings
from tests.service.conftest import serve
from tests.synthetic import make_image_bytes, make_synthetic_bundle

pytestmark = pytest.mark.anyio
IMAGE = make_image_bytes(64, 64, "png", seed=3)
PNG = {"content-type": "image/png"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_version(root: Path, version: str, threshold: float) -> Path:
    """A synthetic bundle named ``version`` whose score threshold differs per version, so the same image gets a
    different answer from each: a response labelled with the wrong version is caught by its detections."""
    make_synthetic_bundle(root, threshold=threshold)
    write_bundle(load_bundle(root).model_copy(update={"version": version}), root)
    return root


def _rewrite(root: Path, change: Any) -> None:
    b: ModelBundle = load_bundle(root, verify_hashes=False)
    write_bundle(change(b), root)


def make_broken(root: Path, kind: str) -> Path:
    """Bundles that must be refused: a file that no longer matches its sha256, a model whose output does not fit
    bundle.json (3 classes declared, 2 computed), and a model answering NaN."""
    make_version(root, f"broken-{kind}", 0.5)
    if kind == "hash":
        data = bytearray((root / "model.onnx").read_bytes())
        data[-1] ^= 0xFF
        (root / "model.onnx").write_bytes(bytes(data))
    elif kind == "shape":
        _rewrite(root, lambda b: b.model_copy(update={"classes": ["scratch", "dent", "rust"],
                 "postprocess": b.postprocess.model_copy(update={"score_thresholds": {}})}))  # fmt: skip
    elif kind == "nan":
        model = onnx.load(str(root / "model.onnx"))
        g = model.graph
        g.node[-1].output[0] = "clean"
        g.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
        g.node.append(helper.make_node("Mul", ["clean", "nan"], ["output0"]))
        onnx.save(model, str(root / "model.onnx"))
        _rewrite(root, lambda b: b)  # the hashes match: only the smoke check can tell
    else:
        raise ValueError(kind)
    return root


def _settings(root: Path, served: str, **kw: Any) -> Settings:
    return Settings(
        bundle=root / served,
        backend="onnxruntime-cpu",
        max_delay_ms=0,
        swap=SwapSettings(bundle_root=root, **kw),
        records={"enabled": False},  # type: ignore[arg-type]
    )


async def _version(client: Any) -> str:
    r = await client.get("/v1/model")
    assert r.status_code == 200
    return str(r.json()["version"])


async def test_swap_validates_warms_up_and_switches(tmp_path: Path) -> None:
    make_version(tmp_path / "v1", "1.0.0", 0.5)
    make_version(tmp_path / "v2", "2.0.0", 0.4)
    async with serve(_settings(tmp_path, "v1")) as client:
        before = (await client.post("/v1/inspect", content=IMAGE, headers=PNG)).json()
        r = await client.post("/v1/admin/bundle", json={"path": "v2"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["swap"]["from_version"] == "1.0.0" and body["swap"]["to_version"] == "2.0.0"
        assert set(body["model"]["warmup_ms"]) == {str(b) for b in range(1, 9)}  # every served batch size
        after = (await client.post("/v1/inspect", content=IMAGE, headers=PNG)).json()
        assert before["model_version"] == "1.0.0" and after["model_version"] == "2.0.0"
        assert len(after["detections"]) > len(before["detections"])  # the lower threshold answers
        info = (await client.get("/v1/model")).json()
        assert info["version"] == "2.0.0" and info["swaps"][-1]["result"] == "swapped"
        assert info["bundle_hash"] and str(tmp_path) not in r.text
        metrics = (await client.get("/metrics")).text
        assert 'aoi_model_swaps_total{result="swapped"} 1.0' in metrics
        assert 'aoi_model_info{architecture="synthetic-avgpool",backend="onnxruntime-cpu"' in metrics
        assert 'version="2.0.0"' in metrics and 'version="1.0.0"' not in metrics


@pytest.mark.parametrize(
    ("kind", "says"),
    [("hash", "sha256 mismatch"), ("shape", "model output has shape"), ("nan", "non-finite")],
)
async def test_broken_bundle_is_refused_and_the_old_one_serves(tmp_path: Path, kind: str, says: str) -> None:
    make_version(tmp_path / "v1", "1.0.0", 0.5)
    make_broken(tmp_path / "bad", kind)
    async with serve(_settings(tmp_path, "v1")) as client:
        r = await client.post("/v1/admin/bundle", json={"path": "bad"})
        assert r.status_code == 422, r.text
        err = r.json()
        assert err["code"] == "bundle_refused" and says in err["message"] and "still serving 1.0.0" in err["message"]
        assert err["request_id"] == r.headers["x-request-id"]
        assert await _version(client) == "1.0.0"
        r = await client.post("/v1/inspect", content=IMAGE, headers=PNG)
        assert r.status_code == 200 and r.json()["model_version"] == "1.0.0"
        info = (await client.get("/v1/model")).json()
        assert info["swaps"][-1]["result"] == "refused" and says in info["swaps"][-1]["reason"]
        assert 'aoi_model_swaps_total{result="refused"} 1.0' in (await client.get("/metrics")).text


async def test_paths_outside_the_bundle_root_are_refused(tmp_path: Path) -> None:
    make_version(tmp_path / "root" / "v1", "1.0.0", 0.5)
    make_version(tmp_path / "elsewhere", "9.0.0", 0.5)
    async with serve(_settings(tmp_path / "root", "v1")) as client:
        for path in ("../elsewhere", str(tmp_path / "elsewhere"), "missing"):
            r = await client.post("/v1/admin/bundle", json={"path": path})
            assert r.status_code == 422 and r.json()["code"] == "bundle_refused", r.text
            assert str(tmp_path) not in r.json()["message"].replace(path, "")
        r = await client.post("/v1/admin/bundle", json={})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"
        assert await _version(client) == "1.0.0"


async def test_paths_the_file_system_cannot_take_are_refused(tmp_path: Path) -> None:
    """A name over NAME_MAX (ENAMETOOLONG from stat), a NUL byte (ValueError) and a symlink loop are a 422 that says
    why, never a 500 (a fuzz run found the first), and never name a host path."""
    root = tmp_path / "root"
    make_version(root / "v1", "1.0.0", 0.5)
    (root / "loop").symlink_to(root / "loop")
    async with serve(_settings(root, "v1")) as client:
        for path, says in (("a" * 300, "File name too long"), ("v1/" + "b" * 256 + "/x", "File name too long"),
                           ("v1\x00", "embedded null byte"), ("loop", ""), ("loop/v1", "")):  # fmt: skip
            r = await client.post("/v1/admin/bundle", json={"path": path})
            assert r.status_code == 422 and r.json()["code"] == "bundle_refused", r.text
            assert says in r.json()["message"] and str(tmp_path) not in r.json()["message"], r.text
        assert await _version(client) == "1.0.0"


async def test_rollback_goes_one_step_back(tmp_path: Path) -> None:
    make_version(tmp_path / "v1", "1.0.0", 0.5)
    make_version(tmp_path / "v2", "2.0.0", 0.4)
    make_version(tmp_path / "v3", "3.0.0", 0.3)
    async with serve(_settings(tmp_path, "v1")) as client:
        r = await client.post("/v1/admin/rollback")
        assert r.status_code == 422 and "no previous bundle" in r.json()["message"]
        for v in ("v2", "v3"):
            assert (await client.post("/v1/admin/bundle", json={"path": v})).status_code == 200
        r = await client.post("/v1/admin/rollback")
        assert r.status_code == 200 and r.json()["swap"]["to_version"] == "2.0.0", r.text
        assert r.json()["swap"]["trigger"] == "rollback"
        assert (await client.post("/v1/admin/rollback")).json()["swap"]["to_version"] == "1.0.0"
        assert await _version(client) == "1.0.0"
        # The previous folder changed under the service: rolling back to it would not serve what it served.
        assert (await client.post("/v1/admin/bundle", json={"path": "v2"})).status_code == 200
        make_version(tmp_path / "v1", "1.0.1", 0.45)
        r = await client.post("/v1/admin/rollback")
        assert r.status_code == 422 and "no longer holds" in r.json()["message"]
        assert await _version(client) == "2.0.0"


async def test_swaps_under_load_lose_no_request_and_label_every_answer(tmp_path: Path) -> None:
    """10 swaps (3 of them broken bundles, refused) while clients send continuously: no request fails, and every
    answer carries the version that computed it (all answers of one version are the same, and versions differ)."""
    thresholds = {"1": 0.5, "2": 0.45, "3": 0.4, "4": 0.35}
    for v, t in thresholds.items():
        make_version(tmp_path / f"v{v}", f"{v}.0.0", t)
    for kind in ("hash", "shape", "nan"):
        make_broken(tmp_path / f"bad-{kind}", kind)
    plan = ["v2", "bad-hash", "v3", "v4", "bad-shape", "v1", "v2", "bad-nan", "v3", "v4"]
    answers: dict[str, set[str]] = defaultdict(set)
    failures: list[str] = []
    counts: dict[str, int] = defaultdict(int)
    stop = asyncio.Event()

    async with serve(_settings(tmp_path, "v1")) as client:

        async def send() -> None:
            while not stop.is_set():
                r = await client.post("/v1/inspect", content=IMAGE, headers=PNG)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                body = r.json()
                answers[body["model_version"]].add(repr(body["detections"]))
                counts[body["model_version"]] += 1

        clients = [asyncio.create_task(send()) for _ in range(6)]
        results = []
        for path in plan:
            await asyncio.sleep(0.05)
            r = await client.post("/v1/admin/bundle", json={"path": path})
            results.append(r.status_code)
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
    assert results == [422 if p.startswith("bad") else 200 for p in plan]
    assert failures == []
    assert set(answers) == {f"{v}.0.0" for v in thresholds}
    assert all(len(a) == 1 for a in answers.values()), answers  # one version, one answer
    assert len({next(iter(a)) for a in answers.values()}) == len(thresholds)  # and versions differ
    print(f"{len(plan)} swaps ({results.count(422)} refused): {sum(counts.values())} answers, 0 failed, {dict(counts)}")


async def _wait_for_version(client: Any, version: str) -> None:
    for _ in range(200):
        if await _version(client) == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still serving {await _version(client)}, expected {version}")


def _replace_files(served: Path, staging: Path) -> None:
    for f in staging.iterdir():
        shutil.copy2(f, served / f.name)


async def test_the_folder_watch_reloads_the_served_bundle_once_it_settles(tmp_path: Path) -> None:
    served = make_version(tmp_path / "line", "1.0.0", 0.5)
    async with serve(_settings(tmp_path, "line", watch_s=0.1)) as client:
        _replace_files(served, make_version(tmp_path / "staging", "2.0.0", 0.4))
        await _wait_for_version(client, "2.0.0")
        swaps = (await client.get("/v1/model")).json()["swaps"]
        assert [(s["trigger"], s["result"]) for s in swaps] == [("watch", "swapped")]
        # A broken copy is refused once and not retried until the files change again; the old model serves.
        (served / "model.onnx").write_bytes(b"not a model")
        await asyncio.sleep(0.6)
        swaps = (await client.get("/v1/model")).json()["swaps"]
        assert [(s["trigger"], s["result"]) for s in swaps] == [("watch", "swapped"), ("watch", "refused")]
        assert await _version(client) == "2.0.0"
