"""Optional API keys: inspect and admin scopes, Bearer and X-API-Key, key files, open health/metrics by default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.settings import AuthSettings, Settings, SettingsError, get_settings
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
