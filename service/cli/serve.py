"""`aoi serve`: validate settings, bundle and backend, then run the service under uvicorn. No torch anywhere."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from pathlib import Path

from service.settings import BACKEND_KINDS, PRECISIONS

__all__ = ["add_arguments", "run", "serve"]

_GET_A_BUNDLE = (
    "get a bundle: train and export one (`aoi train ...` then `aoi export --help` writes bundles/<name>/), copy a "
    "released bundle to bundles/default/, or point --bundle / AOI_BUNDLE at a bundle directory"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle directory (default: bundles/default)")
    parser.add_argument("--host", default=None, help="bind address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default 8000)")
    parser.add_argument(
        "--backend",
        choices=BACKEND_KINDS,
        default=None,
        help="inference runtime (default auto: TensorRT, then ONNX Runtime's TensorRT provider, CUDA, then CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="auto (default): TensorRT FP16, the bundle's FP16 ONNX on ORT CUDA, on CPU the bundle's measured fastest "
        "(cpu_ranking); fp32/fp16/bf16/int8 force it",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (default: $AOI_CONFIG)")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default=None, choices=["json", "text"])


def _error(message: str) -> int:
    sys.stderr.write(f"aoi serve: error: {message}\n")
    return 2


def serve(args: argparse.Namespace) -> int:
    from service.core.bundle import BundleError, load_bundle
    from service.core.errors import BackendUnavailable
    from service.settings import SettingsError, get_settings

    try:
        settings = get_settings(
            args.config,
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            backend=args.backend,
            precision=args.precision,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    except SettingsError as exc:
        return _error(str(exc))
    try:
        sock = _bind(settings.host, settings.port)  # before the model loads: a taken port is reported at once
    except OSError as exc:
        return _error(exc.strerror or str(exc))
    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as exc:
        sock.close()
        return _error(f"{exc.path}: {exc.problem}\n  {_GET_A_BUNDLE}")

    import uvicorn

    from service.backends import backend_from_settings
    from service.cli.server import StoppingServer
    from service.http.app import create_app
    from service.inference.pipeline import effective_thresholds
    from service.lifecycle.plant import check_central
    from service.log_config import setup_logging
    from service.records.store import check_data_dir

    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger(__name__).info("settings: %s", settings.model_dump(mode="json"))
    try:
        check_data_dir(settings)
        check_central(settings)
    except ValueError as exc:
        sock.close()
        return _error(str(exc))
    try:
        effective_thresholds(bundle, settings.score_thresholds)
        choice = backend_from_settings(settings, bundle)
    except (BackendUnavailable, ValueError) as exc:
        sock.close()
        return _error(f"{settings.bundle}: {exc}")
    app = create_app(settings, bundle=bundle, backend=choice, freeze_heap=settings.gc_freeze)
    stop_s = settings.stop_timeout_ms / 1000.0
    # SIGTERM: uvicorn stops accepting and lets the admitted requests finish for up to 3/4 of the bound; the lifespan
    # then flushes the records and the outbox with what is left of it (InspectionService.stop).
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=max(1, round(0.75 * stop_s)))
    StoppingServer(config, app).run(sockets=[sock])  # serves on the socket bound above
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` now, so that ``aoi serve`` fails before loading the model when the port is
    taken (Linux refuses to bind a port another socket listens on). It listens only once uvicorn serves, after the
    warm-up: until then a connection is refused, so a load balancer sends it to another replica instead of leaving it
    waiting for the warm-up (docs/replicas.md).

    Raises:
        OSError: with ``strerror`` saying what to do (port in use, address not available).
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"--host {host!r}: cannot resolve it ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart past TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            what = f"port {port} on {host} is already in use (another aoi serve?); choose one with --port or AOI_PORT"
        else:
            what = f"cannot listen on {host}:{port}: {exc.strerror}"
        raise OSError(exc.errno, what) from exc
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    return serve(args)
