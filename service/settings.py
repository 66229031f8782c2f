"""Deployment settings of the service: environment (``AOI_`` prefix, ``__`` for nesting), optional YAML file, CLI.

Facts about the model (input size, normalisation, classes, thresholds) come from the bundle, not from here; the
few overrides below (thresholds, verdict rule) are checked against the bundle at startup. Nothing is read at import.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.core.bundle import ScoreThresholds, VerdictRule
from service.core.errors import format_validation_error
from service.core.frames import TilingMode, TilingSettings

__all__ = [
    "BACKEND_KINDS",
    "PRECISIONS",
    "ArchiveSettings",
    "AuthSettings",
    "BackendKind",
    "MqttSettings",
    "PrecisionChoice",
    "RecordsSettings",
    "ReviewSettings",
    "Settings",
    "SettingsError",
    "SignalsSettings",
    "SwapSettings",
    "TilingMode",
    "TilingSettings",
    "WebhookSettings",
    "format_validation_error",
    "get_settings",
]

BackendKind = Literal["auto", "tensorrt", "onnxruntime-trt", "onnxruntime-cuda", "openvino", "onnxruntime-cpu"]
PrecisionChoice = Literal["auto", "fp32", "fp16", "bf16", "int8"]
BACKEND_KINDS: tuple[str, ...] = get_args(BackendKind)  # CLI choices
PRECISIONS: tuple[str, ...] = get_args(PrecisionChoice)
_yaml_data: ContextVar[dict[str, Any] | None] = ContextVar("_yaml_data", default=None)


class SettingsError(Exception):
    """Settings are invalid; the message names the source (file or environment) and each bad field."""


class _YamlSource(PydanticBaseSettingsSource):
    """Values from the YAML file given to :func:`get_settings` (lower priority than environment and CLI)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        data = _yaml_data.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get() or {})


class AuthSettings(BaseModel):
    """Optional API keys (``auth:`` in YAML, ``AOI_AUTH__INSPECT_KEYS='["k1", "k2"]'``). No keys: the routes are open.
    Keys are secrets: shown as ``**********`` in logs and dumps, compared in constant time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inspect_keys: list[SecretStr] = Field(default_factory=list, description="keys accepted by POST /v1/inspect")
    inspect_keys_file: Path | None = Field(default=None, description="file of inspect keys, one per line (# comments)")
    admin_keys: list[SecretStr] = Field(default_factory=list, description="keys for /v1/model and admin routes")
    admin_keys_file: Path | None = Field(default=None, description="file of admin keys, one per line")
    reviewer_keys: list[SecretStr] = Field(
        default_factory=list, description="keys for the review page and API (admin keys are accepted there too)"
    )
    reviewer_keys_file: Path | None = Field(default=None, description="file of reviewer keys, one per line")
    protect_metrics: bool = Field(default=False, description="/metrics also needs an admin key")
    protect_health: bool = Field(default=False, description="/healthz, /readyz (and v2) also need an admin key")

    @field_validator("inspect_keys_file", "admin_keys_file", "reviewer_keys_file")
    @classmethod
    def _readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            read_key_file(v)  # at startup: a missing or empty key file is a settings error, not a 401 storm
        return v

    def keys(self, scope: Literal["inspect", "admin", "review"]) -> tuple[bytes, ...]:
        """Every key of ``scope`` (inline and from its file), as bytes; ``review``: the reviewer keys only (the review
        routes accept the admin keys too)."""
        inline, path = {
            "inspect": (self.inspect_keys, self.inspect_keys_file),
            "admin": (self.admin_keys, self.admin_keys_file),
            "review": (self.reviewer_keys, self.reviewer_keys_file),
        }[scope]
        return tuple(k.get_secret_value().encode() for k in inline) + (read_key_file(path) if path else ())


def read_key_file(path: Path) -> tuple[bytes, ...]:
    """Keys in ``path``: one per line, blank lines and ``#`` comments ignored.

    Raises:
        ValueError: the file cannot be read or holds no key (names the file, never a key).
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the key file ({exc.strerror})") from exc
    keys = tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"{path}: no keys in the key file (one per line)")
    return keys


class ArchiveSettings(BaseModel):
    """Images kept next to the records (``records: {archive: ...}`` in YAML,
    ``AOI_RECORDS__ARCHIVE__OK_SAMPLE_RATE=0.01``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ng: bool = Field(default=True, description="keep every NG image (as uploaded, named by its sha256)")
    ok_sample_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of OK images kept too (0.01 = one in a hundred, at random)"
    )
    annotated: bool = Field(default=False, description="also keep a JPEG copy with the detections drawn")
    retention_days: float = Field(default=30.0, gt=0.0, description="images older than this are deleted")
    max_bytes: int = Field(
        default=10 * 1024**3, ge=1024 * 1024, description="disk quota of the archive; the oldest images go first"
    )


class RecordsSettings(BaseModel):
    """Inspection records (``records:`` in YAML, ``AOI_RECORDS__DURABILITY=fast``): one per answered image, in SQLite
    (WAL) under ``data_dir``; docs/records.md has the schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="record every answered image")
    durability: Literal["durable", "fast"] = Field(
        default="durable",
        description="durable: a 200 means its record (and archived image) is on disk, written in group commits; "
        "fast: the answer does not wait, records are written every fast_window_ms and at most that window is lost "
        "if the process dies",
    )
    fast_window_ms: float = Field(default=200.0, gt=0.0, le=10_000.0, description="fast mode: flush interval")
    max_wait_ms: float = Field(
        default=2000.0,
        gt=0.0,
        description="durable mode: longest a request waits for its record; past it (slow or full disk) on_failure",
    )
    max_pending: int = Field(
        default=10_000, ge=1, description="records accepted and not yet written; beyond it on_failure"
    )
    on_failure: Literal["serve", "refuse"] = Field(
        default="serve",
        description="when a record cannot be written (disk full or slow, pending full): serve answers anyway and "
        "counts each lost record in aoi_records_lost_total; refuse answers 503 records_unavailable",
    )
    retention_days: float | None = Field(default=365.0, gt=0.0, description="records older than this are deleted")
    archive: ArchiveSettings = Field(default_factory=ArchiveSettings, description="NG (and sampled OK) images")


class WebhookSettings(BaseModel):
    """POST of each verdict to a URL (off while ``url`` is unset), from a bounded outbox that survives restarts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(default=None, description="http(s) URL receiving one JSON verdict per POST; None = off")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers (e.g. Authorization)")
    timeout_ms: float = Field(default=2000.0, gt=0.0, description="per attempt")
    max_backoff_ms: float = Field(default=30_000.0, gt=0.0, description="longest wait between retries")
    only_ng: bool = Field(default=False, description="signal NG verdicts only")


class MqttSettings(BaseModel):
    """Publish each verdict to an MQTT broker (off while ``host`` is unset): topic ``<topic_prefix>/<camera_id>``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str | None = Field(default=None, description="broker host; None = off")
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = Field(default="aoi/verdicts", description="topic = prefix/camera_id ('none' without one)")
    qos: Literal[0, 1, 2] = Field(default=1, description="MQTT QoS of each verdict")
    client_id: str = Field(default="aoi-inspect", description="MQTT client id (a persistent session)")
    username: str | None = None
    password: SecretStr | None = None
    only_ng: bool = Field(default=False, description="signal NG verdicts only")


class SignalsSettings(BaseModel):
    """Verdicts signalled to the line (``signals:`` in YAML); each sink is off until configured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    outbox_max: int = Field(
        default=100_000,
        ge=1,
        description="verdicts waiting per sink (on disk, under data_dir); when full the oldest is dropped and "
        "counted in aoi_signals_dropped_total",
    )


class ObjectStoreSettings(BaseModel):
    """Where the station's NG images go (:class:`service.records.central.images.ImageForwarder`).

    Credentials are not settings: an S3 client takes them from boto3's default chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/credentials``, an instance or pod role), so they never reach
    a config file, a log or a status route. ``extra="forbid"`` refuses a key field put here by mistake.

    Attributes:
        kind: ``s3`` (AWS S3 or any S3-compatible server: MinIO, Ceph RGW) or ``dir`` (a mounted share).
        bucket: the S3 bucket (``s3``: required).
        prefix: key prefix inside the bucket (``plant-1/`` puts every object under it).
        endpoint_url: an S3-compatible server's URL (None: AWS, with ``region``).
        region: the bucket's region (None: from the AWS environment/files).
        root: the folder objects are written under (``dir``: required).
        timeout_s: connect and read timeout of one S3 request; with one request per attempt (the uploader retries
            with backoff, not the client) it bounds how long a stop waits for an upload in flight.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["s3", "dir"]
    bucket: str | None = Field(default=None, min_length=3, max_length=63)
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    root: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> ObjectStoreSettings:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("objects.kind s3 needs objects.bucket")
        if self.kind == "dir" and self.root is None:
            raise ValueError("objects.kind dir needs objects.root")
        return self


class CentralStoreSettings(BaseModel):
    """Plant-wide records (``central:`` in YAML, ``AOI_CENTRAL__DSN_FILE=/run/secrets/central-dsn``): this station's
    records forwarded to one PostgreSQL, its NG images to object storage (docs/records.md, "Plant-wide records").
    Off while neither ``dsn`` nor ``dsn_file`` is set. The DSN is a secret: from the environment or a file, shown as
    ``**********`` in logs and dumps, never in ``/v1/station`` or an error.

    Attributes:
        dsn / dsn_file: the central database's libpq URL (``postgresql://aoi_station@central/plant?sslmode=require``;
            TLS options pass through), or a file holding it (a Docker or Kubernetes secret). One of the two.
        batch_size: records per transaction; one batch is the most a crash can make the station resend.
        poll_interval_s: how long the idle forwarder (and image uploader) waits for new records before looking
            anyway; while backing off, how often their gauges are refreshed.
        min_backoff_s / max_backoff_s: the shortest and the longest wait after a failed attempt (reconnect, upload),
            on the service's one backoff (:func:`service.signals.sink.backoff_s`); the longest also bounds how late a
            database that is back is noticed (docs/measurements.md, M9).
        connect_timeout_s / statement_timeout_s: bounds on one connection attempt and one statement.
        migrate: create or upgrade the central schema at connect (needs DDL rights; otherwise the database owner
            runs ``service.records.central.schema.upgrade`` once).
        objects: where NG images are uploaded (None: images stay ``pending`` centrally and on the station's disk).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dsn: SecretStr | None = None
    dsn_file: Path | None = None
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    poll_interval_s: float = Field(default=1.0, gt=0)
    min_backoff_s: float = Field(default=0.5, gt=0)
    max_backoff_s: float = Field(default=5.0, gt=0)
    connect_timeout_s: int = Field(default=10, ge=1)
    statement_timeout_s: float = Field(default=60.0, gt=0)
    migrate: bool = False
    objects: ObjectStoreSettings | None = None

    @model_validator(mode="after")
    def _one_dsn(self) -> CentralStoreSettings:
        if self.dsn is not None and self.dsn_file is not None:
            raise ValueError("central: set dsn or dsn_file, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.dsn is not None or self.dsn_file is not None

    def resolved_dsn(self) -> SecretStr:
        """The DSN, read from ``dsn_file`` when that is how it is given.

        Raises:
            ValueError: no DSN configured, or its file cannot be read or is empty (names the file, never the DSN).
        """
        if self.dsn is not None:
            return self.dsn
        if self.dsn_file is None:
            raise ValueError("central: no dsn or dsn_file set")
        try:
            text = self.dsn_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"central.dsn_file {self.dsn_file}: cannot read it ({exc.strerror or exc})") from None
        if not text:
            raise ValueError(f"central.dsn_file {self.dsn_file}: empty")
        return SecretStr(text)


class ReviewSettings(BaseModel):
    """The review station (``review:`` in YAML, ``AOI_REVIEW__ENABLED=false``): the /review page and the review API
    over the records (docs/review.md). Needs records on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="serve /review and the review API; off: they answer 404")
    session_ttl_s: float = Field(
        default=12 * 3600.0,
        gt=0.0,
        le=7 * 86400.0,
        description="a review session (the aoi_review cookie POST /review/session sets) ends this long after it began",
    )
    max_sessions: int = Field(
        default=1000, ge=1, description="review sessions held at once; a new one beyond it ends the oldest"
    )


class SwapSettings(BaseModel):
    """Live model swap (``swap:`` in YAML): POST /v1/admin/bundle, SIGHUP, an optional watch of the bundle folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle_root: Path | None = Field(
        default=None,
        description="folder POST /v1/admin/bundle may load bundles from (paths outside it are refused); None = the "
        "parent folder of the served bundle",
    )
    watch_s: float = Field(
        default=0.0,
        ge=0.0,
        description="check the served bundle's bundle.json every this many seconds and load it "
        "when it changed; 0 = off",
    )
    smoke_image: Path | None = Field(
        default=None,
        description="image each new bundle must answer before it serves (None: the bundle's sample.* if it has one, "
        "else a synthetic grey frame)",
    )


class Settings(BaseSettings):
    """Service settings. Times in milliseconds, sizes in bytes or pixels."""

    model_config = SettingsConfigDict(env_prefix="AOI_", env_nested_delimiter="__", extra="forbid", frozen=True)

    bundle: Path = Field(default=Path("bundles/default"), description="model bundle directory")
    backend: BackendKind = Field(default="auto", description="inference runtime; auto picks the best available")
    precision: PrecisionChoice = Field(
        default="auto",
        description="auto: TensorRT FP16, the bundle's FP16 ONNX on ORT CUDA, on a CPU runtime the fastest precision "
        "the bundle measured within its bound that the CPU runs (with backend auto: the runtime too, cpu_ranking); "
        "fp16 / fp32 / bf16 / int8 force it (bf16: OpenVINO only, on a CPU with BF16; int8: ORT CPU or OpenVINO)",
    )
    device_id: int = Field(default=0, ge=0, description="CUDA device index (GPU backends)")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="largest batch the batcher forms")
    max_delay_ms: Annotated[float, Field(ge=0.0, le=1000.0)] | Literal["auto"] = Field(
        default="auto",
        description="wait for a partial batch, from its oldest request; auto: 0 on the CPU backends (onnxruntime-cpu, "
        "openvino: a batch costs nearly the sum of its images there, waiting only adds latency), 2 ms on GPU backends",
    )
    queue_size: int = Field(
        default=512, ge=1, description="model inputs (images or tiles) waiting for a batch; more -> 503 + Retry-After"
    )
    deadline_ms: float = Field(default=2000.0, gt=0.0, description="per-request deadline; past it -> 504")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="request body limit -> 413")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="width x height limit (decompression bombs)")
    max_images_per_request: int = Field(default=32, ge=1, description="multipart images per request")
    max_request_pixels: int = Field(
        default=160_000_000, ge=1, description="decoded pixels of all images of one request (from the headers) -> 413"
    )
    max_inflight_pixels: int = Field(
        default=400_000_000,
        ge=1,
        description="decoded pixels all admitted requests may hold until answered (memory: 3 bytes a colour pixel); "
        "more -> 503; at least max_request_pixels",
    )
    max_decode_ms: float = Field(
        default=10_000.0, gt=0.0, description="decode time one request may take; images not started by then -> 413"
    )
    decode_workers: int = Field(default=4, ge=1, le=64, description="threads decoding and letterboxing images")
    decode_inline_pixels: int = Field(
        default=65_536,
        ge=0,
        description="a request of one image of at most this many pixels (from its header) is decoded on the event "
        "loop, not a decode thread: for small frames the two thread hops cost more than the decode; 0 = always a "
        "decode thread",
    )
    decode_queue_images: int = Field(
        default=64, ge=1, description="images admitted and not yet decoded, all requests together; more -> 503"
    )
    admit_by_deadline: bool = Field(
        default=True,
        description="refuse (503) a request the backlog ahead of it would keep past its deadline, from the measured "
        "rate the queue drains at, instead of computing it for a 504",
    )
    instances: int = Field(
        default=0,
        ge=0,
        le=64,
        description="batches in flight at once, each on its own inference thread (Triton's model instances); "
        "0 = auto: 2 on onnxruntime-cpu and openvino (streams) with >= 2 cores, else 1",
    )
    worker_niceness: int = Field(
        default=0,
        ge=0,
        le=19,
        description="nice value the decode and inference threads add to their own (Linux), so the event loop that "
        "admits, refuses and answers comes first; 0 = same priority (measured: 5 halves refusal latency in a retry "
        "storm but costs a third of the goodput when other processes share the cores)",
    )
    gc_freeze: bool = Field(
        default=True,
        description="once warm, keep the startup heap (libraries, bundle, backend) out of the garbage collector's "
        "passes (gc.freeze): a full pass otherwise walks it all and stops every thread for tens of milliseconds "
        "(aoi_gc_pause_seconds); false: the collector as Python sets it",
    )
    opencv_threads: int = Field(
        default=1,
        ge=0,
        le=64,
        description="threads OpenCV may use inside one decode, resize or colour conversion (cv2.setNumThreads): the "
        "decode and inference threads are the service's parallelism, and OpenCV's own parallel loops on top of them "
        "cost more CPU than they save (docs/measurements.md, M12); 1 = none; 0 = OpenCV's default (every core)",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads per session (0 = CPU: cores / instances); OpenVINO: threads of "
        "all its streams together (0 = the cores)",
    )
    engine_cache: Path = Field(
        default=Path("engine-cache"), description="TensorRT engines built at startup (ORT TensorRT provider: ort-trt/)"
    )
    openvino_cache: Path | None = Field(
        default=None,
        description="OpenVINO compiled-model cache, one folder per model, runtime, CPU and precision; never inside "
        "the bundle (None: <engine_cache>/openvino)",
    )
    score_thresholds: ScoreThresholds = Field(default_factory=dict, description="per-class overrides of the bundle")
    verdict: VerdictRule | None = Field(default=None, description="override of the bundle's verdict rule")
    tiling: TilingSettings = Field(default_factory=TilingSettings, description="tiling overrides and limits")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="optional API keys")
    data_dir: Path = Field(
        default=Path("data"), description="records (SQLite), archived images and the signal outbox live here"
    )
    station_id: str = Field(
        default_factory=lambda: socket.gethostname() or "station",
        min_length=1,
        max_length=200,
        description="this station's identity on every record and in the central store (default: the host name; "
        "keep it for the life of data_dir)",
    )
    line_id: str | None = Field(default=None, max_length=200, description="the production line, on every record")
    records: RecordsSettings = Field(default_factory=RecordsSettings, description="inspection records and images")
    signals: SignalsSettings = Field(default_factory=SignalsSettings, description="webhook / MQTT verdicts")
    swap: SwapSettings = Field(default_factory=SwapSettings, description="live model swap")
    review: ReviewSettings = Field(default_factory=ReviewSettings, description="the review page and API")
    central: CentralStoreSettings = Field(
        default_factory=CentralStoreSettings, description="plant-wide records: central PostgreSQL, object storage"
    )
    stop_timeout_ms: float = Field(
        default=20_000.0,
        gt=0.0,
        description="SIGTERM: admission stops, queued requests are answered, records and the outbox flushed, "
        "within this bound",
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _budgets_fit(self) -> Settings:
        if self.max_inflight_pixels < self.max_request_pixels:
            raise ValueError(
                f"max_inflight_pixels ({self.max_inflight_pixels}) is below max_request_pixels "
                f"({self.max_request_pixels}): a request within its own budget could never be admitted"
            )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: top level must be a mapping of setting names to values")
    return data


def _check_environment(environ: Mapping[str, str]) -> None:
    """Refuse ``AOI_*`` variables that name no setting (a typo would otherwise be ignored silently, while the same
    typo in YAML is refused)."""
    fields = set(Settings.model_fields)
    unknown = []
    for key in sorted(environ):
        if not key.startswith("AOI_") or key == "AOI_CONFIG":
            continue
        name = key[4:].lower().split("__", 1)[0]
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f" (did you mean AOI_{close[0].upper()}?)" if close else ""
            unknown.append(f"{key}{hint}")
    if unknown:
        raise SettingsError(
            f"environment: unknown setting variable(s) {', '.join(unknown)}; the settings are listed in docs/service.md"
        )


def get_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build Settings from (highest first) ``overrides`` (CLI flags), ``AOI_*`` environment variables, the YAML file
    ``config`` (or ``$AOI_CONFIG``), defaults. For the CLI and ``python -m service``; tests build ``Settings`` directly.

    Raises:
        SettingsError: naming the YAML file or "settings" and every invalid field.
    """
    path = config if config is not None else os.environ.get("AOI_CONFIG")
    _check_environment(os.environ)
    data = _read_yaml(Path(path)) if path else {}
    token = _yaml_data.set(data)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f"{path} / environment" if path else "settings (AOI_* environment / flags)"
        raise SettingsError(f"{where}: {format_validation_error(exc)}") from exc
    finally:
        _yaml_data.reset(token)
