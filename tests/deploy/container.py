"""Docker helpers for the image tests: the engine (started here when it is not running and we may), the base image
(the Dockerfile's default where a registry answers, else a Debian bookworm image made with debootstrap and cached per
machine), image builds, and containers published on loopback only. Every wait is bounded in time.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.deploy.stack import DOCKERFILE, REPO

logger = logging.getLogger(__name__)

LOCAL_BASE = "aoi-base:bookworm"  # built once per machine from Debian packages, reused while it exists
LOCAL_PROMETHEUS = "aoi-prometheus:bookworm"  # Debian's prometheus package on LOCAL_BASE, also built once
LABEL = "aoi-inspect.test=1"  # on every container this module starts
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# debootstrap --include: what python:3.11-slim-bookworm gives the Dockerfile (python, venv, pip); Debian 12's python3
# is 3.11, the version the slim image pins.
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# Proxy variables Docker passes to RUN steps as predefined build args (no ARG needed in the Dockerfile).
PROXY_VARS = tuple(v for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY") for v in (name, name.lower()))
PULL_TIMEOUT_S = 120
ENGINE_TIMEOUT_S = 60
DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 900


class EngineUnavailable(Exception):
    """No Docker engine can run here; the message says why (the tests skip with it)."""


def docker(
    *args: str, timeout: float = 60, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``docker ARGS``: text output captured; raises with both outputs when ``check`` and it fails."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False, env=env)
    if check and result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr}"
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{output}")
    return result


def _engine_answers() -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Engine:
    """The Docker engine in use; ``proc`` is the dockerd this module started (stopped by :meth:`stop`), else None."""

    version: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.log is not None:
            shutil.rmtree(self.log.parent, ignore_errors=True)


def ensure_engine() -> Engine:
    """The running engine, or one started now (root + dockerd installed). Raises :class:`EngineUnavailable`."""
    if shutil.which("docker") is None:
        raise EngineUnavailable("no docker CLI: install Debian's docker.io (see .ci/run)")
    if _engine_answers():
        return Engine(docker("info", "--format", "{{.ServerVersion}}").stdout.strip())
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineUnavailable("docker info fails and dockerd is not installed: apt-get install docker.io")
    if os.geteuid() != 0:
        raise EngineUnavailable("docker info fails and only root may start dockerd here")
    log = Path(tempfile.mkdtemp(prefix="aoi-dockerd-")) / "dockerd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + ENGINE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineUnavailable(f"dockerd exited with {proc.returncode}:\n{tail(log)}")
        if _engine_answers():
            engine = Engine(docker("info", "--format", "{{.ServerVersion}}").stdout.strip(), proc, log)
            logger.info("started dockerd %s (pid %d, log %s)", engine.version, proc.pid, log)
            return engine
        time.sleep(0.5)
    Engine("", proc).stop()
    raise EngineUnavailable(f"dockerd did not answer within {ENGINE_TIMEOUT_S} s:\n{tail(log)}")


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


def pulled(image: str) -> bool:
    """True when ``image`` is here or the engine can pull it now (a registry, or a mirror the engine knows)."""
    if image_exists(image):
        return True
    try:
        result = docker("pull", "--quiet", image, timeout=PULL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        logger.info("docker pull %s: no answer within %d s", image, PULL_TIMEOUT_S)
        return False
    if result.returncode != 0:
        logger.info("docker pull %s failed: %s", image, result.stderr.strip().splitlines()[-1:])
    return result.returncode == 0


def dockerfile_default(arg: str) -> str:
    """The default of ``ARG <arg>=...`` in the Dockerfile (the base the image is meant to be built on)."""
    match = re.search(rf"^ARG {arg}=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.M)
    if match is None:
        raise AssertionError(f"Dockerfile has no ARG {arg}=<default>")
    return match.group(1)


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str | None:
    """The Debian archive this machine's apt uses (deb822 ``*.sources`` or one-line ``*.list``), preferring an entry
    for bookworm; None leaves the choice to debootstrap's own default."""
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    for path in sorted(apt_dir.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, flags=re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes").lower() != "no":
                entries += [(uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
    for path in [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if match:
                    entries.append((match.group(1), [match.group(2)]))
    archives = [(uri.rstrip("/"), suites) for uri, suites in entries if uri.rstrip("/").endswith("/debian")]
    for uri, suites in archives:
        if "bookworm" in suites:
            return uri
    return archives[0][0] if archives else None


def build_local_base(tag: str = LOCAL_BASE) -> str:
    """A Debian bookworm image with Python 3.11, venv and pip, from distribution packages only: debootstrap into a
    temporary root, the host's CA bundle copied in (pip behind a TLS-intercepting proxy trusts only that bundle),
    then ``docker import``. Built once: an existing ``tag`` is reused."""
    if image_exists(tag):
        return tag
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise AssertionError(f"no registry answers and {tag} cannot be made: needs root and debootstrap (apt-get)")
    root = Path(tempfile.mkdtemp(prefix="aoi-base-"))
    try:
        mirror = debian_mirror()
        cmd = [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(root)]
        started = time.monotonic()
        result = subprocess.run(
            cmd + ([mirror] if mirror else []), capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S
        )
        if result.returncode != 0:
            raise AssertionError(f"debootstrap failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr}")
        logger.info("debootstrap bookworm from %s: %.0f s", mirror or "debootstrap's default mirror", _since(started))
        if HOST_CA_BUNDLE.is_file():
            bundle = root / HOST_CA_BUNDLE.relative_to("/")
            bundle.unlink(missing_ok=True)  # never write through a link out of the root
            shutil.copyfile(HOST_CA_BUNDLE, bundle)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        _import_rootfs(root, tag)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


def _import_rootfs(root: Path, tag: str) -> None:
    # An imported image has no environment: the Dockerfile's `ENV PATH=/opt/aoi/bin:$PATH` needs a PATH to extend.
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
    changes.append('CMD ["python3"]')
    started = time.monotonic()
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    try:
        cmd = ["docker", "import", *(f"--change={c}" for c in changes), "-", tag]
        result = subprocess.run(cmd, stdin=tar.stdout, capture_output=True, text=True, timeout=300, check=False)
    finally:
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait(timeout=60)
    if result.returncode != 0 or tar.returncode != 0:
        raise AssertionError(f"docker import {tag} failed (tar {tar.returncode}):\n{result.stderr}")
    logger.info("docker import %s: %.0f s", tag, _since(started))


def python_base() -> str:
    """The image to build the service on: the Dockerfile's default where it can be pulled, else the local base."""
    upstream = dockerfile_default("PYTHON_IMAGE")
    return upstream if pulled(upstream) else build_local_base()


def build(
    tag: str, context: Path, *, target: str | None = None, build_args: dict[str, str] | None = None, local: bool
) -> float:
    """``docker build`` of ``context`` into ``tag``; returns the seconds it took. ``local``: the base is an image of
    this engine, so the classic builder is used (BuildKit would pull the ``# syntax=`` frontend image from Docker
    Hub). Host network: the build reaches the package indexes the way this machine does (DNS, proxies)."""
    args = {**{k: os.environ[k] for k in PROXY_VARS if os.environ.get(k)}, **(build_args or {})}
    cmd = ["build", "--network", "host", "-t", tag, *(f"--build-arg={k}={v}" for k, v in args.items())]
    cmd += ["--target", target] if target else []
    env = {**os.environ, "DOCKER_BUILDKIT": "0"} if local else None
    started = time.monotonic()
    docker(*cmd, str(context), timeout=BUILD_TIMEOUT_S, env=env)
    seconds = _since(started)
    logger.info("docker build %s (target %s): %.0f s", tag, target or "last", seconds)
    return seconds


def build_cpu_image(tag: str) -> float:
    base = python_base()
    return build(tag, REPO, target="cpu", build_args={"PYTHON_IMAGE": base}, local=base == LOCAL_BASE)


# Shaped like prom/prometheus (binary as entrypoint, flags from compose, user nobody, data in /prometheus) so the
# compose service runs unchanged on it.
_PROMETHEUS_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
"""


def prometheus_image(upstream: str) -> str:
    """``upstream`` (the compose file's image) where it can be pulled, else Debian's prometheus on the local base."""
    if pulled(upstream):
        return upstream
    if not image_exists(LOCAL_PROMETHEUS):
        with tempfile.TemporaryDirectory(prefix="aoi-prometheus-") as context:
            (Path(context) / "Dockerfile").write_text(_PROMETHEUS_DOCKERFILE, encoding="utf-8")
            build(LOCAL_PROMETHEUS, Path(context), build_args={"BASE": build_local_base()}, local=True)
    return LOCAL_PROMETHEUS


def port_url(container: str, port: int) -> str:
    """``http://127.0.0.1:<host port>`` that the engine published ``port`` of ``container`` on."""
    out = docker("port", container, f"{port}/tcp").stdout.split()
    loopback = [a for a in out if a.startswith("127.0.0.1:")]
    assert loopback, f"{container}:{port} is not published on loopback: {out}"
    return f"http://{loopback[0]}"


@dataclass(frozen=True)
class Running:
    name: str
    url: str  # the service on loopback


@contextmanager
def run_container(image: str, args: Sequence[str] = (), port: int = 8000) -> Iterator[Running]:
    """``docker run -d`` of ``image`` with ``port`` published on a free loopback port; removed (volumes included)
    on exit."""
    name = f"aoi-test-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    docker("run", "-d", "--name", name, "--label", LABEL, "-p", f"127.0.0.1::{port}", *args, image)
    try:
        yield Running(name, port_url(name, port))
    finally:
        docker("rm", "-f", "-v", name, check=False)


def container_state(name: str) -> str:
    return docker("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()


def wait_http(url: str, container: str, timeout_s: float) -> float:
    """Poll ``url`` until it answers 200; returns the seconds it took. Fails with the container's log when the
    container stops or the deadline passes."""
    started = time.monotonic()
    last = "no answer"
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() - started < timeout_s:
            if container_state(container) not in {"created", "running"}:
                raise AssertionError(f"{container} stopped before {url} answered:\n{logs(container)}")
            try:
                resp = client.get(url)
                if resp.status_code == 200:
                    return _since(started)
                last = f"{resp.status_code} {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
    raise AssertionError(f"{url} not 200 within {timeout_s:.0f} s (last: {last}):\n{logs(container)}")


def wait_healthy(container: str, timeout_s: float) -> float:
    """Wait for the image's HEALTHCHECK to report healthy; returns the seconds it took."""
    started = time.monotonic()
    status = ""
    while time.monotonic() - started < timeout_s:
        status = docker("inspect", "--format", "{{.State.Health.Status}}", container, check=False).stdout.strip()
        if status == "healthy":
            return _since(started)
        if status == "unhealthy":
            break
        time.sleep(1.0)
    raise AssertionError(f"{container} health is {status!r} after {_since(started):.0f} s:\n{logs(container)}")


def logs(container: str) -> str:
    result = docker("logs", "--tail", "40", container, check=False)
    return result.stdout + result.stderr


@dataclass(frozen=True)
class ComposeStack:
    project: str
    containers: dict[str, str]  # service -> container id
    urls: dict[str, str]  # service -> http://127.0.0.1:<published port>


@contextmanager
def compose_stack(
    compose: Path, files: Sequence[Path], override: Path, ports: dict[str, int], timeout_s: float = 300
) -> Iterator[ComposeStack]:
    """``compose up -d`` of the services in ``ports`` (service -> container port, each published on loopback by
    ``override``), no build and no pull: the images must exist. ``down -v`` on exit removes its containers, network and
    volumes. Settings in the environment (``AOI_*``, ``COMPOSE_*``, ...) are dropped so the files' defaults run."""
    project = f"aoi-test-{os.getpid()}"
    cmd = [str(compose), "--project-name", project, "--project-directory", str(REPO)]
    for path in [*files, override]:
        cmd += ["--file", str(path)]
    env = {k: v for k, v in os.environ.items() if not re.match(r"^(AOI_|GRAFANA_|PROMETHEUS_|COMPOSE_)", k)}

    def run(*args: str, timeout: float = 120) -> str:
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result.stdout

    try:
        run("up", "--detach", "--no-build", "--pull", "never", *ports, timeout=timeout_s)
        containers = {name: run("ps", "--quiet", name).strip() for name in ports}
        urls = {name: f"http://{run('port', name, str(port)).strip()}" for name, port in ports.items()}
        for name, url in urls.items():
            assert url.startswith("http://127.0.0.1:"), f"{name} is not published on loopback only: {url}"
        yield ComposeStack(project, containers, urls)
    finally:
        run("down", "--volumes", "--remove-orphans", "--timeout", "10")


def _since(started: float) -> float:
    return time.monotonic() - started
