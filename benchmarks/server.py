"""The service as a real uvicorn subprocess on 127.0.0.1, for the benchmarks: started with only the settings given
(inherited ``AOI_*`` variables would make it differ from what is compared with it), and waited for until ready."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from benchmarks.loadgen import HttpLoadClient

__all__ = ["free_port", "log_tail", "start_service", "wait_ready"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(
    bundle: Path,
    port: int,
    log: IO[bytes],
    settings: Mapping[str, str] | None = None,
    flags: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """``python -m service`` on ``127.0.0.1:port``; ``settings`` are ``AOI_*`` variables by name (``{"QUEUE_SIZE":
    "4096"}``), ``flags`` extra command-line flags. The log goes to ``log``, a file: a pipe nobody reads fills up and
    blocks the service's event loop. ``AOI_DATA_DIR`` alone is inherited: where records go is not a setting that
    changes what is compared (the tests point it at a temporary folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AOI_") or k == "AOI_DATA_DIR"}
    env.update({f"AOI_{name}": value for name, value in (settings or {}).items()})
    cmd = [sys.executable, "-m", "service", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "WARNING", *flags]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def log_tail(log: IO[bytes], n: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-n:]


async def wait_ready(
    client: HttpLoadClient, proc: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float = 120.0
) -> None:
    """Poll ``/readyz`` until 200. Raises RuntimeError (with the log's end) if the service exits or times out."""
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with code {proc.returncode}: {log_tail(log)}")
        try:
            if (await client.get("/readyz"))[0] == 200:
                return
        except OSError:  # connection refused until uvicorn listens
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"service not ready after {timeout_s:.0f} s: {log_tail(log)}")
