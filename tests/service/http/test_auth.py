"""Optional API keys: inspect and admin scopes, Bearer and X-API-Key, key files, open health/metrics by default; the
admin routes (``/v1/admin/*``) answer loopback callers only while no admin key is configured."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from service.http.app import create_app
from service.settings import AuthSettings, Settings, SettingsError, SwapSettings, get_settings
from tests.service.conftest import FakeBackend, serve
from tests.synthetic import make_image_bytes

pytestmark = pytest.mark.anyio
PNG = make_image_bytes(16, 16, "png")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _inspect(client: object, **headers: str) -> int:
    r = await client.post("/v1/inspect", content=PNG, headers={"content-type": "image/png", **headers})  # type: ignore[attr-defined]
    return int(r.status_code)


async def test_inspect_keys(bundle: object, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# line 3 cameras\nfile-key-1\n\n  file-key-2  \n", encoding="utf-8")
    auth = AuthSettings(inspect_keys=["inline-key"], inspect_keys_file=keys)  # type: ignore[list-item]
    async with serve(Settings(max_delay_ms=0, auth=auth), bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        r = await client.post("/v1/inspect", content=PNG, headers={"content-type": "image/png", "x-request-id": "a1"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert (
            r.json()["code"] == "unauthorized"
            and r.json()["request_id"] == "a1"
            and "no API key" in r.json()["message"]
        )
        r = await client.post("/v1/inspect", content=PNG, headers={"content-type": "image/png", "x-api-key": "guess"})
        assert r.status_code == 401 and "guess" not in r.text  # what was presented is never echoed
        assert await _inspect(client, authorization="Bearer inline-key") == 200
        assert await _inspect(client, authorization="bearer file-key-2") == 200
        assert await _inspect(client, **{"x-api-key": "file-key-1"}) == 200
        # the other scopes stay open: no admin keys configured, health and metrics not protected
        assert (await client.get("/v1/model")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'aoi_requests_rejected_total{reason="unauthorized"} 2.0' in metrics


async def test_admin_keys_protect_metadata_and_optionally_health_and_metrics(bundle: object) -> None:
    auth = AuthSettings(admin_keys=["ops"], protect_metrics=True, protect_health=True)  # type: ignore[list-item]
    async with serve(Settings(max_delay_ms=0, auth=auth), bundle=bundle, backend=FakeBackend(bundle)) as client:  # type: ignore[arg-type]
        assert await _inspect(client) == 200  # inspect has no keys of its own: open
        for path in ("/v1/model", "/metrics", "/healthz", "/readyz", "/v2/health/ready"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"authorization": "Bearer ops"})).status_code == 200, path


def test_keys_are_secrets_and_key_files_are_checked_at_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Settings(auth=AuthSettings(inspect_keys=["very-secret"]))  # type: ignore[list-item]
    assert "very-secret" not in str(s.model_dump(mode="json")) and "very-secret" not in repr(s)
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("settings: %s", s.model_dump(mode="json"))
    assert "very-secret" not in caplog.text
    monkeypatch.setenv("AOI_AUTH__INSPECT_KEYS_FILE", str(tmp_path / "missing.txt"))
    with pytest.raises(SettingsError, match=r"missing\.txt: cannot read the key file"):
        get_settings()
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    monkeypatch.setenv("AOI_AUTH__INSPECT_KEYS_FILE", str(tmp_path / "empty.txt"))
    with pytest.raises(SettingsError, match="no keys in the key file"):
        get_settings()
    monkeypatch.delenv("AOI_AUTH__INSPECT_KEYS_FILE")
    monkeypatch.setenv("AOI_AUTH__INSPECT_KEYS", '["k1", "k2"]')
    assert [k.get_secret_value() for k in get_settings().auth.inspect_keys] == ["k1", "k2"]


@asynccontextmanager
async def _peers(settings: Settings, bundle: Any, *hosts: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One app, one client per peer address (the TCP peer the ASGI server reports as ``request.client``)."""
    app = create_app(settings, bundle=bundle, backend=FakeBackend(bundle))
    async with LifespanManager(app) as manager:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app, client=(h, 40000)), base_url="http://t")
            for h in hosts
        ]
        try:
            yield clients
        finally:
            for client in clients:
                await client.aclose()


def _admin_settings(bundle_dir: Path, auth: AuthSettings | None = None) -> Settings:
    return Settings(
        max_delay_ms=0,
        swap=SwapSettings(bundle_root=bundle_dir.parent),
        auth=auth or AuthSettings(),
        records={"enabled": False},  # type: ignore[arg-type]
    )


async def _admin(client: httpx.AsyncClient, **headers: str) -> httpx.Response:
    """A rollback: past the access check it is refused (nothing to roll back to, 422), so it changes nothing."""
    return await client.post("/v1/admin/rollback", headers={"x-request-id": "adm-1", **headers})


async def test_without_admin_keys_admin_routes_answer_loopback_only(
    bundle: Any, bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.http.app"):
        async with _peers(_admin_settings(bundle_dir), bundle, "127.0.0.1", "::1", "::ffff:127.0.0.9", "10.1.2.3",
                          "192.168.0.7", "::ffff:10.0.0.1", "fe80::1%eth0") as clients:  # fmt: skip
            v4, v6, mapped, lan, other, mapped_lan, link_local = clients
            for client in (v4, v6, mapped):  # loopback: past the access check, no key asked for
                r = await _admin(client)
                assert r.status_code == 422 and r.json()["code"] == "bundle_refused", r.text
            for client in (lan, other, mapped_lan, link_local):
                r = await _admin(client)
                assert r.status_code == 403, r.text
                body = r.json()
                assert body["code"] == "forbidden" and body["request_id"] == "adm-1" == r.headers["x-request-id"]
                assert "loopback" in body["message"] and "auth.admin_keys" in body["message"]
                assert (await client.post("/v1/admin/bundle", json={"path": "v1"})).status_code == 403
                # a key does not help while none is configured: there is nothing to check it against
                assert (await _admin(client, authorization="Bearer anything")).status_code == 403
            # a request a proxy relayed is not a local caller's, whatever its peer address
            for header in ("x-forwarded-for", "forwarded", "x-real-ip"):
                r = await _admin(v4, **{header: "127.0.0.1"})
                assert r.status_code == 403 and header in r.json()["message"], r.text
            # the read routes keep their rule: open while no admin keys are configured
            assert (await lan.get("/v1/model")).status_code == 200
            station = await lan.get("/v1/station")
            assert station.status_code == 200 and station.json()["admin_routes"] == "loopback_only"
            metrics = (await v4.get("/metrics")).text
            assert 'aoi_requests_rejected_total{reason="forbidden"} 15.0' in metrics
    assert "answer loopback callers only" in caplog.text


async def test_with_admin_keys_the_key_is_required_from_anywhere(
    bundle: Any, bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    auth = AuthSettings(admin_keys=["ops"])  # type: ignore[list-item]
    with caplog.at_level(logging.INFO, logger="service.http.app"):
        async with _peers(_admin_settings(bundle_dir, auth), bundle, "127.0.0.1", "10.1.2.3") as (local, lan):
            for client in (local, lan):
                r = await _admin(client)
                assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
                r = await _admin(client, authorization="Bearer ops", **{"x-forwarded-for": "203.0.113.9"})
                assert r.status_code == 422 and r.json()["code"] == "bundle_refused", r.text  # past the check
            station = await lan.get("/v1/station", headers={"x-api-key": "ops"})
            assert station.json()["admin_routes"] == "key_required"
    assert "an admin key is required from any caller" in caplog.text


def test_the_openapi_documents_the_admin_refusals(bundle: Any) -> None:
    paths = create_app(Settings(), bundle=bundle, backend=FakeBackend(bundle)).openapi()["paths"]
    for path in ("/v1/admin/bundle", "/v1/admin/rollback"):
        responses = paths[path]["post"]["responses"]
        assert {"401", "403", "409", "422", "503"} <= set(responses), path
        assert responses["403"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "400" in paths["/v1/admin/bundle"]["post"]["responses"]  # a body no JSON parser takes
