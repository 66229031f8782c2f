"""Object storage of NG images: an S3-compatible bucket (boto3) or a shared directory, behind one small protocol.
Every upload is verified (sha256 before, size and sha256 metadata after) before a record may point at it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from service.records.archive import fsync_dirs, write_file
from service.records.central.settings import CentralSettings
from service.settings import ObjectStoreSettings

__all__ = [
    "DirectoryObjectStore",
    "ObjectStore",
    "ObjectStoreError",
    "S3ObjectStore",
    "StoredObject",
    "object_key",
    "object_store_from",
]

logger = logging.getLogger(__name__)
_EXT = re.compile(r"^[A-Za-z0-9]{1,8}$")


def _safe(part: str) -> str:
    # Station and request ids come from configuration and clients: anything outside [A-Za-z0-9._~-] is
    # percent-encoded, so a key never gains a folder level and stays the same on S3 and on a file system.
    return quote(part, safe="-._~")[:160] or "_"


def object_key(
    station_id: str, received_at: float, request_id: str, index: int, ext: str, seq: int | None = None
) -> str:
    """``station_id/yyyy/mm/dd/request_id-index-seq.ext`` (UTC date of ``received_at``), every part made path-safe.

    The record's ``seq`` (its journal key, unique per station) is part of the name because request ids come from
    clients and may be reused: two records of one request id and image index on one day would otherwise share one
    object, and the second upload would replace the first record's image. Without ``seq``:
    ``station_id/yyyy/mm/dd/request_id-index.ext`` (the design's form, kept for callers that have no seq).
    """
    day = datetime.fromtimestamp(received_at, UTC).strftime("%Y/%m/%d")
    suffix = ext.lower() if _EXT.match(ext) else "bin"
    tail = "" if seq is None else f"-{int(seq)}"
    return f"{_safe(station_id)}/{day}/{_safe(request_id)}-{int(index)}{tail}.{suffix}"


class ObjectStoreError(Exception):
    """An object was not stored (or not verifiably): the caller keeps the image pending and tries again later."""


@dataclass(frozen=True)
class StoredObject:
    """A verified object: where (``url``), its key, size and sha256."""

    url: str
    key: str
    bytes: int
    sha256: str


class ObjectStore(Protocol):
    """Where NG images go. ``put`` returns only once the object is durably stored with exactly these bytes."""

    def put(self, key: str, data: bytes, sha256: str) -> StoredObject:
        """Store ``data`` under ``key``; ``sha256`` is what the record says the bytes are.

        Raises:
            ObjectStoreError: not stored (after the backend's retries), or the bytes do not match ``sha256``.
        """
        ...


def _check_digest(key: str, data: bytes, sha256: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.lower():
        raise ObjectStoreError(f"{key}: bytes have sha256 {actual[:16]}..., the record says {sha256[:16]}...")


class DirectoryObjectStore:
    """Objects as files under ``root`` (an NFS/SMB share): temp file in the target folder, fsync, rename, fsync the
    folder, so a reader never sees a partial file and a crash leaves either nothing or the whole object."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, data: bytes, sha256: str) -> StoredObject:
        _check_digest(key, data, sha256)
        target = (self.root / key).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise ObjectStoreError(f"{key}: key leaves the store's folder")
        try:
            dirty: set[Path] = set()
            write_file(self.root, key, data, dirty)  # the archive's own durable write: temp file, fsync, rename
            fsync_dirs(dirty)
            stored = hashlib.sha256(target.read_bytes()).hexdigest()
        except OSError as exc:
            raise ObjectStoreError(f"{key}: cannot write under {self.root} ({exc.strerror or exc})") from exc
        if stored != sha256.lower():
            raise ObjectStoreError(f"{key}: file reads back with sha256 {stored[:16]}..., expected {sha256[:16]}...")
        return StoredObject(target.as_uri(), key, len(data), stored)


# Client errors worth another try (throttling, a server's own failure); any other 4xx is final (no bucket, denied).
_RETRYABLE_CODES = {
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "SlowDown",
    "RequestTimeout",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
}


class S3ObjectStore:
    """Objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW) under ``prefix``.

    Credentials and region come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, ``~/.aws``, instance or pod roles), never from our settings. Each upload sends Content-MD5 (the
    server rejects corrupted bodies) and the sha256 as metadata, then ``head_object`` checks size and sha256.
    Transient failures are retried ``attempts`` times with exponential backoff and jitter (botocore's own retries are
    off, so the count is ours).
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        attempts: int = 4,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        timeout_s: float = 10.0,
        client: Any = None,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.attempts = max(1, attempts)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeout_s, read_timeout=timeout_s
        )
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def put(self, key: str, data: bytes, sha256: str) -> StoredObject:
        _check_digest(key, data, sha256)
        full = self.prefix + key
        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                return self._put_once(full, key, data, sha256.lower())
            except ObjectStoreError:
                raise
            except Exception as exc:
                retryable, last = _classify(exc)
                if not retryable or attempt == self.attempts:
                    break
                delay = min(self.max_backoff_s, self.min_backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                logger.warning(
                    "s3://%s/%s: upload attempt %d failed (%s); retrying in %.2f s",
                    self.bucket,
                    full,
                    attempt,
                    last,
                    delay,
                )
                time.sleep(delay)
        raise ObjectStoreError(f"s3://{self.bucket}/{full}: not stored after {attempt} attempt(s): {last}")

    def _put_once(self, full: str, key: str, data: bytes, sha256: str) -> StoredObject:
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self.client.put_object(
            Bucket=self.bucket,
            Key=full,
            Body=data,
            ContentMD5=md5,
            ContentType=content_type,
            Metadata={"sha256": sha256},
        )
        head = self.client.head_object(Bucket=self.bucket, Key=full)
        size, stored = int(head.get("ContentLength", -1)), head.get("Metadata", {}).get("sha256")
        if size != len(data) or stored != sha256:
            raise ObjectStoreError(
                f"s3://{self.bucket}/{full}: stored object has {size} bytes, sha256 {stored!r}; "
                f"expected {len(data)} bytes, {sha256[:16]}..."
            )
        return StoredObject(f"s3://{self.bucket}/{full}", key, size, sha256)


def _classify(exc: Exception) -> tuple[bool, str]:
    """(retry?, a message without secrets) for a boto3/botocore failure."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):  # configuration, not a transient fault
        return False, "no AWS credentials found (environment, AWS_PROFILE, ~/.aws or an instance/pod role)"

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        code = str(error.get("Code", status))
        retry = code in _RETRYABLE_CODES or status in _RETRYABLE_CODES
        return retry, f"{code} (HTTP {status}): {error.get('Message', '')}".strip()
    if isinstance(exc, BotoCoreError):  # connection refused, timeouts, DNS: the endpoint may come back
        return True, f"{type(exc).__name__}: {exc}"
    return False, f"{type(exc).__name__}: {exc}"


def object_store_from(settings: CentralSettings | ObjectStoreSettings | None) -> ObjectStore | None:
    """The object store ``settings`` (a station's central settings, or their ``objects`` block) describe; None when no
    object store is configured. The S3 client makes one request per :meth:`~ObjectStore.put` attempt: the image
    uploader retries with its own (interruptible) backoff, so a stop never waits out a client's retry loop.
    Credentials come from boto3's default chain (environment, ``AWS_PROFILE``, ``~/.aws``, instance or pod roles)."""
    objects = settings.objects if isinstance(settings, CentralSettings) else settings
    if objects is None:
        return None
    if objects.kind == "dir":
        assert objects.root is not None  # the settings' validator
        return DirectoryObjectStore(objects.root)
    assert objects.bucket is not None
    return S3ObjectStore(
        objects.bucket,
        prefix=objects.prefix,
        endpoint_url=objects.endpoint_url,
        region=objects.region,
        attempts=1,
        timeout_s=objects.timeout_s,
    )
