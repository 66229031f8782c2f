"""Training configuration: typed dataclasses, YAML files, `key=value` overrides, the resolved config of a run.

Precedence: dataclass defaults < `--config` YAML < command-line flags / `key=value` overrides. A YAML lists only the
fields that differ from the defaults; nested sections are `loss`, `dscbsm` and `augment` (dotted keys on the command
line: `loss.box=7.5`, `dscbsm.alpha=0.2`, `augment.fliplr=0.5`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.losses import LossConfig
from train.sampler import SamplerConfig

__all__ = [
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_key_values",
    "save_config",
]


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the source and the field."""


@dataclass
class TrainConfig:
    """Every knob of `aoi train`. Defaults follow Ultralytics YOLO11 (docs/models.md, design note D4) unless noted."""

    model: str = "yolo11n"
    data: str = ""
    epochs: int = 100
    imgsz: int = 640
    batch: int = 16  # total over all DDP ranks
    device: str = "cpu"
    workers: int = 2
    out: str = ""  # run folder; "" = runs/<model>, suffixed -2, -3... when it already holds a run
    resume: bool = False
    weights: str = ""  # initialise from this checkpoint (fine-tuning); "" = from scratch
    seed: int = 0
    deterministic: bool = False
    sampler: str = "auto"  # uniform | ds-cbsm | auto (ds-cbsm for grace-*, uniform otherwise)
    box_loss: str = "auto"  # ciou | wiou3 | auto (the model's default_box_loss)
    optimizer: str = "auto"  # SGD | AdamW | auto
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    nbs: int = 64  # nominal batch size: gradients accumulate to it, weight decay scales with it
    grad_clip: float = 10.0
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    amp: bool = True  # used on CUDA only
    close_mosaic: int = 10
    patience: int = 100  # epochs without fitness improvement before stopping
    val_interval: int = 1  # validate every N epochs (and always after the last one)
    val_batch: int = 16
    sync_bn: bool = False
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    channels_last: bool = True  # NHWC tensors: faster per iteration on CPU (docs/measurements.md, M8)
    loss: LossConfig = field(default_factory=LossConfig)
    dscbsm: SamplerConfig = field(default_factory=SamplerConfig)
    augment: dict[str, Any] = field(default_factory=dict)  # AugmentConfig overrides (train/augment.py)

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work."""
        checks = [
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz", "must be a multiple of 32, >= 32"),
            (self.batch >= 1, "batch", "must be >= 1"),
            (self.workers >= 0, "workers", "must be >= 0"),
            (self.sampler in ("auto", "uniform", "ds-cbsm"), "sampler", "must be uniform, ds-cbsm or auto"),
            (self.box_loss in ("auto", "ciou", "wiou3"), "box_loss", "must be ciou, wiou3 or auto"),
            (self.optimizer in ("auto", "SGD", "AdamW"), "optimizer", "must be SGD, AdamW or auto"),
            (self.lr0 > 0, "lr0", "must be > 0"),
            (self.val_interval >= 1, "val_interval", "must be >= 1"),
            (self.close_mosaic >= 0, "close_mosaic", "must be >= 0"),
            (self.patience >= 1, "patience", "must be >= 1"),
            (bool(self.data), "data", "is required"),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise ConfigError(f"{name}: {problem} (got {getattr(self, name)!r})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, current: Any, key: str, source: str) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: {key}: cannot parse {value!r}: {exc}") from None
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        return str(value)
    return value


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> None:
    """Set (possibly dotted or nested) keys on `cfg` in place, type-checked against the defaults."""
    for key, value in values.items():
        if key == "augment":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: augment: expected a mapping")
            cfg.augment.update(value)
            continue
        if isinstance(value, dict) and key in ("loss", "dscbsm"):
            apply_overrides(cfg, {f"{key}.{k}": v for k, v in value.items()}, source)
            continue
        head, _, tail = key.partition(".")
        if head == "augment" and tail:
            cfg.augment[tail] = yaml.safe_load(value) if isinstance(value, str) else value
            continue
        target: Any = getattr(cfg, head) if tail else cfg
        name = tail or head
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"{source}: unknown key {key!r}")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{source}: {key}: expected a mapping of its fields")
        setattr(target, name, _coerce(value, current, key, source))


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML at `path` (if any), then `overrides` (already-parsed CLI values)."""
    cfg = TrainConfig()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        apply_overrides(cfg, data or {}, str(path))
    apply_overrides(cfg, overrides or {}, "command line")
    return cfg


def parse_key_values(items: list[str]) -> dict[str, Any]:
    """['a=1', 'loss.box=7'] -> {'a': '1', 'loss.box': '7'} (strings; typed by apply_overrides)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command line: expected key=value, got {item!r}")
        out[key.strip()] = value
    return out


def save_config(cfg: TrainConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus resolved facts such as the optimiser `auto` chose) as YAML."""
    data = cfg.to_dict()
    if extra:
        data["resolved"] = extra
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved by `TrainConfig.to_dict` (used on --resume)."""
    cfg = TrainConfig()
    apply_overrides(cfg, {k: v for k, v in data.items() if k != "resolved"}, "checkpoint config")
    return cfg
