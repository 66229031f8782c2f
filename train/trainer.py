"""The training loop: data, AMP, accumulation, gradient clipping, EMA, DS-CBSM++, validation, checkpoints, resume, DDP.

Recipe: docs/models.md, design note D4 (YOLO11 defaults). Every source of randomness is a function of
(seed, epoch[, index]) or is checkpointed, so `--resume` continues an interrupted run with exactly the same result.
Under `torchrun` each process trains its share of every batch (DistributedDataParallel); rank 0 validates, logs
and writes the run folder.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from models import CheckpointError, create_model, read_checkpoint, save_checkpoint
from train.augment import AugmentConfig, DetectionDataset, collate
from train.config import TrainConfig, save_config
from train.dataset import image_size_stats, load_split
from train.ema import ModelEMA
from train.losses import DetectionLoss, wiou_momentum
from train.optim import LRSchedule, build_optimizer, choose_optimizer
from train.results import ResultsLog, resolve_run_dir, rng_state, run_validation, set_rng_state
from train.sampler import DSCBSM, EpochSampler

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(name: str, local_rank: int, world: int) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {name} requested but CUDA is not available (use --device cpu)")
    return torch.device("cuda", local_rank if world > 1 else torch.device(name).index or 0)


class Trainer:
    """Builds everything from a TrainConfig; `fit()` trains and returns the run folder."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.rank, self.world, local_rank = _dist_env()
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
        self.run_dir = resolve_run_dir(cfg)
        ckpt: dict[str, Any] | None = None
        if cfg.resume:
            ckpt = self._load_resume(cfg)
            cfg = self._resumed_config(cfg, ckpt)
        cfg.validate()
        if cfg.batch % self.world:
            raise ValueError(f"batch: {cfg.batch} is not divisible by the {self.world} DDP processes")
        self.cfg = cfg
        self.device = _device(cfg.device, local_rank, self.world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self._seed(cfg.seed, cfg.deterministic)
        self._build_data()
        self._build_model()
        self.start_epoch, self.best_fitness, self.stale_epochs = 0, -1.0, 0
        self._epoch_t0 = self._last_progress = 0.0  # progress lines without a terminal
        self.best_eval: Any = None  # EvalResult of best.pt, plotted at the end (this session's best only)
        if ckpt is not None:
            self._restore(ckpt)
        self.results = ResultsLog(self.run_dir / "results.csv", self.class_names, enabled=self.rank == 0)

    # ----------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _seed(seed: int, deterministic: bool) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def _build_data(self) -> None:
        cfg = self.cfg
        self.train_split = load_split(Path(cfg.data), "train")
        self.val_split = load_split(Path(cfg.data), "val")
        self.class_names = list(self.train_split.class_names)
        try:
            hyp = AugmentConfig(**cfg.augment)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"augment: {exc}") from None
        self.dataset = DetectionDataset(self.train_split, cfg.imgsz, augment=True, hyp=hyp, seed=cfg.seed)
        self.use_mosaic = self.dataset.mosaic
        use_dscbsm = cfg.sampler == "ds-cbsm" or (cfg.sampler == "auto" and cfg.model.startswith("grace"))
        cfg.sampler = "ds-cbsm" if use_dscbsm else "uniform"
        self.dscbsm: DSCBSM | None = None
        weights = None
        if use_dscbsm:
            image_classes = [r.class_ids.tolist() for r in self.train_split.records]
            self.dscbsm = DSCBSM(image_classes, len(self.class_names), cfg.dscbsm)
            dscbsm = self.dscbsm

            def weights() -> torch.Tensor:
                return dscbsm.image_weights

        self.batch = cfg.batch // self.world
        self.sampler = EpochSampler(
            len(self.dataset), seed=cfg.seed, weights=weights, rank=self.rank, world_size=self.world, chunk=cfg.batch
        )
        self.nb = math.ceil(len(self.sampler) / self.batch)

    def _build_model(self) -> None:
        cfg = self.cfg
        model = create_model(cfg.model, nc=len(self.class_names))
        if cfg.weights and not cfg.resume:
            _init_from_checkpoint(model, Path(cfg.weights), cfg.model)
        model = model.to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model = model.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        if cfg.box_loss == "auto":
            cfg.box_loss = model.default_box_loss
        self.model: nn.Module = model
        self.detector = model
        self.ema = ModelEMA(model, decay=cfg.ema_decay, tau=cfg.ema_tau)
        iterations = math.ceil(len(self.train_split.records) / max(cfg.batch, 64)) * cfg.epochs
        self.choice = choose_optimizer(
            cfg.optimizer,
            lr0=cfg.lr0,
            momentum=cfg.momentum,
            warmup_bias_lr=cfg.warmup_bias_lr,
            nc=len(self.class_names),
            iterations=iterations,
        )
        accumulate = max(round(cfg.nbs / cfg.batch), 1)
        weight_decay = cfg.weight_decay * cfg.batch * accumulate / cfg.nbs
        self.optimizer = build_optimizer(model, self.choice, weight_decay=weight_decay)
        self.schedule = LRSchedule(
            lr0=self.choice.lr0,
            lrf=cfg.lrf,
            epochs=cfg.epochs,
            batches_per_epoch=self.nb,
            warmup_epochs=cfg.warmup_epochs,
            warmup_bias_lr=self.choice.warmup_bias_lr,
            warmup_momentum=cfg.warmup_momentum,
            momentum=self.choice.momentum,
            cos_lr=cfg.cos_lr,
            accumulate=accumulate,
        )
        self.criterion = DetectionLoss(
            model.nc,
            model.stride,
            reg_max=model.reg_max,
            box_loss=cfg.box_loss,
            config=cfg.loss,
            conf_min=cfg.dscbsm.conf_min,
        ).to(self.device)
        self.criterion.wiou.momentum = cfg.loss.wiou_momentum or wiou_momentum(self.nb, cfg.epochs)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if self.world > 1:
            if cfg.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # type: ignore[no-untyped-call]  # unannotated in torch
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # ---------------------------------------------------------------------------------------------- resume
    def _load_resume(self, cfg: TrainConfig) -> dict[str, Any]:
        path = self.run_dir / "last.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from (run without --resume, or pass --out RUN)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "train_config" not in ckpt:
            raise ValueError(f"{path}: not a resumable training checkpoint (no optimizer/train_config)")
        return ckpt

    @staticmethod
    def _resumed_config(cli: TrainConfig, ckpt: dict[str, Any]) -> TrainConfig:
        from train.config import config_from_dict

        cfg = config_from_dict(ckpt["train_config"])
        # Where the run happens may change on resume; what it computes may not.
        cfg.device, cfg.workers, cfg.threads, cfg.resume, cfg.out = cli.device, cli.workers, cli.threads, True, cli.out
        return cfg

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.detector.load_state_dict(ckpt["model_state"])
        self.ema.load_state_dict(ckpt["ema"], ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.criterion.load_state_dict(ckpt["loss_state"], strict=False)
        if self.dscbsm is not None and ckpt.get("sampler"):
            self.dscbsm.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.best_fitness = float(ckpt["best_fitness"])
        self.stale_epochs = int(ckpt.get("stale_epochs", 0))
        if self.start_epoch >= self.cfg.epochs:
            raise ValueError(f"{self.run_dir / 'last.pt'}: run already finished {self.cfg.epochs} epochs")
        logger.info("resuming %s from epoch %d", self.run_dir, self.start_epoch + 1)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self, stop_after: int | None = None) -> Path:
        """Train from `start_epoch` to `epochs` (or only `stop_after` epochs, to simulate an interruption)."""
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml", self._resolved())
            logger.info("training %s on %s -> %s (%s)", cfg.model, cfg.data, self.run_dir, self._resolved())
        end = cfg.epochs if stop_after is None else min(cfg.epochs, self.start_epoch + stop_after)
        times: list[float] = []
        for epoch in range(self.start_epoch, end):
            t0 = time.perf_counter()
            losses = self._train_epoch(epoch)
            times.append(time.perf_counter() - t0)
            stop = self._end_epoch(epoch, losses, times)
            if stop:
                break
        if self.rank == 0:
            self._final_plots()
        if self.world > 1:
            dist.barrier()
        return self.run_dir

    def _resolved(self) -> dict[str, Any]:
        return {
            "optimizer": self.choice.name,
            "lr0": self.choice.lr0,
            "momentum": self.choice.momentum,
            "warmup_bias_lr": self.choice.warmup_bias_lr,
            "accumulate": self.schedule.accumulate,
            "warmup_iters": self.schedule.warmup_iters,
            "wiou_momentum": self.criterion.wiou.momentum,
            "batches_per_epoch": self.nb,
            "world_size": self.world,
            "class_names": self.class_names,
        }

    def _prepare_epoch(self, epoch: int) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        self.detector.train()
        self.detector.set_epoch(epoch)
        self.ema.model.set_epoch(epoch)  # type: ignore[operator]
        self.dataset.mosaic = self.use_mosaic and epoch < self.cfg.epochs - self.cfg.close_mosaic
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if self.dscbsm is not None:
            self.dscbsm.set_epoch(epoch)
            self.dataset.set_image_weights(self.dscbsm.image_weights.numpy())
        return DataLoader(
            self.dataset,
            batch_size=self.batch,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def _train_epoch(self, epoch: int) -> torch.Tensor:
        loader = self._prepare_epoch(epoch)
        mean_items = torch.zeros(3, device=self.device)
        pending = 0
        bar = self._progress(loader, epoch)
        for i, (images, targets) in enumerate(bar):
            ni = i + self.nb * epoch
            accumulate = self.schedule.apply(self.optimizer, ni, epoch)
            images = images.to(self.device, non_blocking=True).float().div_(255.0)
            images = images.contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, enabled=self.amp):
                feats = self.model(images)
            loss, items, stats = self.criterion([f.float() for f in feats], targets.to(self.device))
            self.scaler.scale(loss * self.world).backward()  # DDP averages gradients; the recipe sums them
            pending += 1
            if pending >= accumulate or i == self.nb - 1:
                self._optimizer_step()
                pending = 0
            if self.dscbsm is not None and self.dscbsm.update(stats):
                self.dataset.set_image_weights(self.dscbsm.image_weights.numpy())
            mean_items = (mean_items * i + items) / (i + 1)
            if hasattr(bar, "set_postfix_str"):
                box, cls, dfl = mean_items.tolist()
                bar.set_postfix_str(f"box {box:.3f} cls {cls:.3f} dfl {dfl:.3f}")
            elif self.rank == 0:
                self._log_progress(epoch, i + 1, mean_items)
        return mean_items.cpu()

    def _log_progress(self, epoch: int, done: int, mean_items: torch.Tensor, every_s: float = 30.0) -> None:
        """Without a terminal (CI logs, nohup, a container), a progress line every ``every_s`` seconds instead of
        the tqdm bar: a 9-minute epoch must not be silent."""
        now = time.monotonic()
        if done == 1:
            self._epoch_t0 = self._last_progress = now
            return
        if now - self._last_progress < every_s or done == self.nb:
            return
        self._last_progress = now
        rate = (done - 1) / max(now - self._epoch_t0, 1e-9)
        box, cls, dfl = mean_items.tolist()
        logger.info(
            "epoch %d/%d: batch %d/%d (%.0f%%), %.2f batch/s, epoch ETA %.0f s; box %.3f cls %.3f dfl %.3f",
            epoch + 1, self.cfg.epochs, done, self.nb, 100 * done / self.nb, rate, (self.nb - done) / max(rate, 1e-9),
            box, cls, dfl,
        )  # fmt: skip

    def _progress(self, loader: DataLoader[Any], epoch: int) -> Iterable[Any]:
        """The epoch's batches: a tqdm bar over the loader on a terminal (rank 0), else the loader's iterator."""
        if self.rank != 0 or not sys.stderr.isatty():
            return iter(loader)
        from tqdm import tqdm

        bar: Iterable[Any] = tqdm(
            loader, total=self.nb, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=True, unit="batch"
        )
        return bar

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)

    # ------------------------------------------------------------------------------------------- epoch end
    def _end_epoch(self, epoch: int, losses: torch.Tensor, times: list[float]) -> bool:
        cfg = self.cfg
        stop = torch.zeros(1)
        if self.rank == 0:
            validate = (epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs
            metrics, result = (
                run_validation(self.ema.model, self.val_split, cfg, self.device) if validate else (None, None)
            )
            improved = metrics is not None and metrics["fitness"] > self.best_fitness
            if improved:
                self.best_eval = result
                self.best_fitness, self.stale_epochs = float(metrics["fitness"]), 0  # type: ignore[index]
            elif metrics is not None:
                self.stale_epochs += cfg.val_interval
            lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
            weights = self.dscbsm.class_weights.tolist() if self.dscbsm is not None else None
            self.results.append(epoch + 1, losses.tolist(), metrics, lrs, times[-1], weights)
            self._save(epoch, metrics, improved)
            eta = (cfg.epochs - epoch - 1) * sum(times) / len(times)
            logger.info(
                "epoch %d/%d  box %.4f cls %.4f dfl %.4f  %s  %.1fs/epoch  ETA %s",
                epoch + 1,
                cfg.epochs,
                *losses.tolist(),
                f"mAP50 {metrics['map50']:.4f} mAP50-95 {metrics['map50_95']:.4f}" if metrics else "(no val)",
                times[-1],
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
            if self.stale_epochs >= cfg.patience:
                logger.info("no improvement for %d epochs: stopping early", self.stale_epochs)
                stop[0] = 1
        if self.world > 1:
            dist.broadcast(stop, 0)
        return bool(stop.item())

    def _save(self, epoch: int, metrics: dict[str, float] | None, improved: bool) -> None:
        extra = {
            "train_summary": {
                "epoch": epoch + 1,
                "epochs": self.cfg.epochs,
                "best_fitness": self.best_fitness,
                "metrics": metrics or {},
                "dataset": Path(self.cfg.data).name,
                "image_size": image_size_stats(self.train_split),
            },
            "epoch": epoch,
            "model_state": {k: v.detach().cpu() for k, v in self.detector.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.dscbsm.state_dict() if self.dscbsm is not None else {},
            "loss_state": {k: v.detach().cpu() for k, v in self.criterion.state_dict().items()},
            "rng": rng_state(),
            "best_fitness": self.best_fitness,
            "stale_epochs": self.stale_epochs,
            "train_config": self.cfg.to_dict(),
        }
        model = self.ema.model
        kw = {"class_names": self.class_names, "imgsz": self.cfg.imgsz, "extra": extra}
        save_checkpoint(self.run_dir / "last.pt", model, **kw)  # type: ignore[arg-type]
        if improved:
            save_checkpoint(self.run_dir / "best.pt", model, **kw)  # type: ignore[arg-type]

    def _final_plots(self) -> None:
        from train.plots import plot_eval, plot_results

        try:
            plot_results(self.run_dir)
            if self.best_eval is not None:
                plot_eval(self.best_eval, self.run_dir)
        except Exception as exc:  # plots are a convenience: never lose a finished run to a plotting error
            logger.warning("plotting %s failed: %s", self.run_dir, exc)


def _init_from_checkpoint(model: nn.Module, path: Path, variant: str) -> None:
    """Copy every tensor of the checkpoint's (EMA) ``state_dict`` whose name and shape match into ``model``.

    ``path`` is one of our checkpoints or an Ultralytics ``best.pt`` (read without running it, see docs/byom.md).
    Layers whose shape differs (the class branch when the new data has another number of classes) keep their fresh
    initialisation, like Ultralytics' pretrained-weight transfer.

    Raises:
        CheckpointError: the file is missing, unreadable, an unsupported Ultralytics model, or holds another variant.
    """
    ckpt = read_checkpoint(path)
    if ckpt.get("variant") != variant:
        raise CheckpointError(path, f"holds variant {ckpt.get('variant')!r}, but --model is {variant!r}")
    if ckpt.get("fused"):
        raise CheckpointError(path, "holds fused (Conv+BN folded) weights, which cannot be fine-tuned")
    own = model.state_dict()
    matched = {k: v for k, v in ckpt["state_dict"].items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    logger.info("initialised %d/%d tensors from %s", len(matched), len(own), path)
