"""service/records/central/objects.py: the S3 backend against moto's server mode (a local S3 emulator on
127.0.0.1, ``moto.server.ThreadedMotoServer``, see conftest; no AWS account or network), an endpoint that answers 500
and one that is not there (retries, then a clear error), the shared-directory backend, and the settings' ``objects``
block with its factory."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import boto3
import pytest
from pydantic import SecretStr, ValidationError

from benchmarks.bench_forward import free_port
from service.records.central.objects import (
    DirectoryObjectStore,
    ObjectStoreError,
    S3ObjectStore,
    object_key,
    object_store_from,
)
from service.records.central.settings import CentralSettings
from service.settings import CentralStoreSettings, ObjectStoreSettings

DATA = b"\xff\xd8 not really a jpeg, but bytes all the same"
SHA = hashlib.sha256(DATA).hexdigest()

pytestmark = pytest.mark.usefixtures("aws_env")


def test_object_key_is_path_safe() -> None:
    assert object_key("st-1", 1_767_225_600.0, "req-1", 2, "JPG") == "st-1/2026/01/01/req-1-2.jpg"
    assert object_key("st/1", 1_767_225_600.0, "../a b", 0, "p/ng") == "st%2F1/2026/01/01/..%2Fa%20b-0.bin"
    # the record's seq keeps two records of a reused request id apart
    assert object_key("st-1", 1_767_225_600.0, "req-1", 2, "jpg", 41) == "st-1/2026/01/01/req-1-2-41.jpg"
    assert object_key("st-1", 1_767_225_600.0, "req-1", 2, "jpg", 42) != object_key(
        "st-1", 1_767_225_600.0, "req-1", 2, "jpg", 41
    )


def test_s3_upload_is_verified_and_readable(s3_url: str) -> None:
    boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket="ng-images")
    store = S3ObjectStore("ng-images", prefix="plant-1", endpoint_url=s3_url, region="us-east-1")
    key = object_key("st-1", 1_767_225_600.0, "req-1", 0, "jpg")
    stored = store.put(key, DATA, SHA)
    assert stored.url == f"s3://ng-images/plant-1/{key}" and stored.bytes == len(DATA) and stored.sha256 == SHA
    obj = store.client.get_object(Bucket="ng-images", Key=f"plant-1/{key}")
    assert obj["Body"].read() == DATA and obj["Metadata"]["sha256"] == SHA and obj["ContentType"] == "image/jpeg"
    with pytest.raises(ObjectStoreError, match="record says"):
        store.put("other.jpg", DATA, "0" * 64)  # the bytes are not what the record says: nothing is sent
    with pytest.raises(ObjectStoreError, match="NoSuchBucket"):
        S3ObjectStore("missing", endpoint_url=s3_url, attempts=3, min_backoff_s=0.01).put(key, DATA, SHA)


class _Always500(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_PUT(self) -> None:
        type(self).requests += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_s3_server_errors_are_retried_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        store = S3ObjectStore("ng-images", endpoint_url=url, attempts=3, min_backoff_s=0.01, max_backoff_s=0.02)
        with pytest.raises(ObjectStoreError, match=r"not stored after 3 attempt\(s\): InternalError \(HTTP 500\)"):
            store.put("st-1/k.jpg", DATA, SHA)
    finally:
        server.shutdown()
    assert _Always500.requests == 3
    assert caplog.text.count("retrying") == 2


def test_s3_unreachable_endpoint_is_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3ObjectStore("b", endpoint_url=url, attempts=2, min_backoff_s=0.01, timeout_s=1.0)
    with pytest.raises(ObjectStoreError, match=r"after 2 attempt\(s\): EndpointConnectionError"):
        store.put("st-1/k.jpg", DATA, SHA)


def test_directory_store_writes_atomically(tmp_path: Path) -> None:
    store = DirectoryObjectStore(tmp_path / "share")
    key = object_key("st-1", 1_767_225_600.0, "req-1", 0, "jpg")
    stored = store.put(key, DATA, SHA)
    path = tmp_path / "share" / key
    assert path.read_bytes() == DATA and stored.url == path.as_uri() and stored.sha256 == SHA
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert store.put(key, DATA, SHA).bytes == len(DATA)  # the same object again: replaced, still whole
    with pytest.raises(ObjectStoreError, match="leaves"):
        store.put("../escape.jpg", DATA, SHA)
    with pytest.raises(ObjectStoreError, match="record says"):
        store.put("st-1/x.jpg", b"other bytes", SHA)


def test_objects_settings_and_factory(tmp_path: Path, s3_url: str) -> None:
    central = CentralSettings(dsn=SecretStr("postgresql://db/plant"), station_id="st-1")
    assert central.objects is None and object_store_from(central) is None
    as_dir = central.model_copy(update={"objects": ObjectStoreSettings(kind="dir", root=tmp_path / "share")})
    store = object_store_from(as_dir)
    assert isinstance(store, DirectoryObjectStore) and store.root == tmp_path / "share"
    parsed = CentralStoreSettings.model_validate(
        {"dsn": "postgresql://db/plant", "objects": {"kind": "s3", "bucket": "ng-images", "prefix": "plant-1",
                                                     "endpoint_url": s3_url, "region": "us-east-1"}}
    )  # fmt: skip
    s3 = object_store_from(parsed.objects)
    assert isinstance(s3, S3ObjectStore) and s3.bucket == "ng-images" and s3.prefix == "plant-1/"
    assert s3.attempts == 1  # the uploader's backoff retries, not a blocking loop inside put
    with pytest.raises(ValidationError, match=r"needs objects\.bucket"):
        ObjectStoreSettings(kind="s3")
    with pytest.raises(ValidationError, match=r"needs objects\.root"):
        ObjectStoreSettings(kind="dir")
    with pytest.raises(ValidationError, match="aws_secret_access_key"):  # credentials are never settings
        ObjectStoreSettings.model_validate({"kind": "s3", "bucket": "b12", "aws_secret_access_key": "x"})


def test_the_service_settings_give_the_station_its_forwarding(tmp_path: Path) -> None:
    """``AOI_CENTRAL__DSN_FILE`` (a Docker/Kubernetes secret) is read at startup; the station's identity comes from
    the top-level settings; the DSN never shows in a dump, and a bad file is named without it."""
    from service.settings import Settings

    off = Settings(data_dir=tmp_path)
    assert not off.central.enabled and CentralSettings.for_station(off) is None
    secret = tmp_path / "central-dsn"
    secret.write_text("postgresql://aoi_station:s3cret@central/plant?sslmode=require\n")
    on = Settings(data_dir=tmp_path, station_id="line3-a", line_id="line3", central={"dsn_file": str(secret)})
    forwarding = CentralSettings.for_station(on)
    assert forwarding is not None and forwarding.station_id == "line3-a" and forwarding.line_id == "line3"
    assert forwarding.dsn.get_secret_value().endswith("sslmode=require") and "s3cret" not in str(forwarding)
    assert "s3cret" not in on.model_dump_json() and "s3cret" not in forwarding.model_dump_json()
    with pytest.raises(ValidationError, match="dsn or dsn_file, not both"):
        CentralStoreSettings(dsn=SecretStr("postgresql://x"), dsn_file=secret)
    missing = Settings(data_dir=tmp_path, central={"dsn_file": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match=r"central\.dsn_file .*nope: cannot read it"):
        CentralSettings.for_station(missing)
