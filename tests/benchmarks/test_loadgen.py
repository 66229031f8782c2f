"""`aoi bench service` end to end on the synthetic bundle, and its lean HTTP load client against a scripted server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from aoi.cli import main
from service.loadgen import HttpLoadClient, LoadClientError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _scripted_server() -> tuple[asyncio.Server, int, list[int]]:
    """Answers by path: /len (Content-Length), /chunked, /close (Connection: close), /drop (answers, then closes
    without saying so: a keep-alive connection that timed out), /hangup-next (answers, then closes on the next
    request without answering it), /garbage (not HTTP). Counts connections."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        hang_up_next = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if hang_up_next:  # read the request, then close without a byte of answer
                    break
                path = head.split(b" ", 2)[1]
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length)
                if path == b"/len":
                    msg = b"echo:" + body
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (len(msg), msg)
                    )
                elif path == b"/chunked":
                    writer.write(
                        b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                    )
                elif path == b"/close":
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno"
                    )
                    await writer.drain()
                    break
                elif path == b"/hangup-next":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    hang_up_next = True
                elif path == b"/bad-length":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: lots\r\n\r\n")
                elif path == b"/silent":  # reads the request, never answers; ends when the client hangs up
                    await reader.read()
                    break
                elif path == b"/drop":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
                    break
                else:
                    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
                    await writer.drain()
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, connections


async def test_load_client_framing_keepalive_and_errors() -> None:
    server, port, connections = await _scripted_server()
    client = HttpLoadClient("127.0.0.1", port, max_connections=4)
    try:
        req = client.build_request("POST", "/len", "127.0.0.1", b"frame-bytes", "image/jpeg")
        assert b"content-length: 11\r\n" in req and req.endswith(b"\r\n\r\nframe-bytes")
        for _ in range(3):  # keep-alive: one connection for sequential requests
            assert await client.send(req) == (200, b"echo:frame-bytes")
        assert len(connections) == 1
        assert await client.get("/chunked") == (201, b"abcde")
        assert await client.get("/close") == (503, b"no")  # the client drops that connection itself
        assert await client.get("/drop") == (200, b"ok")
        await asyncio.sleep(0.05)  # the server has closed the idle connection by now
        assert await client.send(req) == (200, b"echo:frame-bytes")  # reconnects instead of failing
        assert await client.get("/hangup-next") == (200, b"")
        before = len(connections)
        assert await client.send(req) == (200, b"echo:frame-bytes")  # closed unanswered: retried on a new one
        assert len(connections) == before + 1
        results = await asyncio.gather(*(client.send(req) for _ in range(8)))  # at most 4 connections at once
        assert all(r == (200, b"echo:frame-bytes") for r in results)
        with pytest.raises(LoadClientError, match="not an HTTP"):
            await client.get("/garbage")
        with pytest.raises(LoadClientError, match="malformed Content-Length"):
            await client.get("/bad-length")
        client.timeout_s = 0.2
        with pytest.raises(LoadClientError, match=r"no whole response within 0\.2 s"):
            await client.get("/silent")
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    with pytest.raises(OSError):
        await HttpLoadClient("127.0.0.1", port).get("/len")  # nothing listens any more


@pytest.mark.integration
def test_bench_service_prints_table_and_json(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "service", "--bundle", str(bundle_dir), "--backend", "onnxruntime-cpu", "--duration", "1"]
    rc = main([*args, "--rounds", "2", "--concurrency", "2", "--max-batch-size", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "service/raw throughput ratio at saturation" in text and "p99 at half saturation" in text
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["raw"]["rows"]] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["latency_ms_p50"] > 0 for r in result["raw"]["rows"])
    inter = result["http"]["interleaved_raw"]
    assert len(inter["rounds"]) == 2 and inter["batch"] in (1, 2) and inter["batch1_alone_latency_ms_p50"] > 0
    svc = result["http"]["service"]
    assert svc["backend"] == "onnxruntime-cpu" and svc["max_delay_ms"] == 0.0
    assert svc["instances"] == result["raw"]["info"]["instances"] >= 1
    for phase in ("saturation", "half_saturation"):
        h = result["http"][phase]
        assert h["requests_ok"] > 0 and h["errors"] == {} and h["latency_ms"]["p50"] <= h["latency_ms"]["p99"]
    sat = result["http"]["saturation"]["images_per_s"]
    assert result["targets"]["ratio"] == pytest.approx(sat / inter["images_per_s"])
    p99 = result["http"]["half_saturation"]["latency_ms"]["p99"]
    assert result["targets"]["p99_over_raw_b1"] == pytest.approx(p99 / inter["batch1_alone_latency_ms_p50"])


def test_bench_rejects_bad_arguments(bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--concurrency", "0"]) == 2
    assert "--concurrency and --rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "service", "--bundle", str(bundle_dir), "--max-delay-ms", "soon"])
    assert exc.value.code == 2 and "neither 'auto' nor a number" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 1..256" in capsys.readouterr().err
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--json", str(tmp_path)]) == 2
    assert f"{tmp_path}: is a directory" in capsys.readouterr().err
    not_an_image = tmp_path / "frame.jpg"
    not_an_image.write_bytes(b"this is not a JPEG")
    assert main(["bench", "service", "--bundle", str(bundle_dir), "--image", str(not_an_image)]) == 1
    assert f"{not_an_image}: the service would reject it:" in capsys.readouterr().err


class _SlowBackend:
    """Every call takes 0.15 s, whatever the batch."""

    def infer(self, x: object) -> None:
        import time

        time.sleep(0.15)


def test_raw_rate_counts_whole_calls_when_a_call_outlasts_the_window() -> None:
    import numpy as np

    from service.bench import _RawBackend

    raw = object.__new__(_RawBackend)  # the timing loop only, without loading a bundle
    raw.backend = _SlowBackend()  # type: ignore[assignment]
    raw._inputs = {4: np.zeros((4, 3, 8, 8), np.float32)}
    calls = raw.calls(4, 0.01, threads=2)  # each call (0.15 s) outlasts the 0.01 s window
    assert len(calls.latencies) == 6 and all(lat >= 0.14 for lat in calls.latencies)
    mean = sum(calls.latencies) / len(calls.latencies)  # 0.15 s plus however much this machine oversleeps
    assert calls.images_per_s <= 2 * 4 / 0.15 and calls.images_per_s == pytest.approx(2 * 4 / mean, rel=0.25)
