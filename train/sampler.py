"""Training samplers: seeded uniform shuffling and DS-CBSM++ (GRACE paper, Chen et al., Sci. Rep. 2026, eqs. 6-10).

Both draw from a generator seeded by (seed, epoch), so an epoch's order is reproducible and a resumed run draws the
same images, and both split the draws across DDP ranks like `DistributedSampler` (rank r takes every world-th index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from train.losses import ClassStats

__all__ = [
    "DSCBSM",
    "EpochSampler",
    "SamplerConfig",
    "base_class_weights",
    "dynamic_class_weights",
    "epoch_seed",
    "mix_class_weights",
]


@dataclass
class SamplerConfig:
    """DS-CBSM++ constants: the paper's values; `ema_momentum` and the image mapping are our (unstated) choices."""

    alpha: float = 0.22
    beta: float = 0.14
    w_min: float = 0.85
    w_max: float = 1.35
    gamma_max: float = 0.60
    e_ramp: int = 30
    refresh: int = 20  # mini-batches between EMA / weight refreshes
    conf_min: float = 0.01
    ema_momentum: float = 0.9  # ema <- m * ema + (1 - m) * window mean
    eps: float = 1e-6


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the generator used in one epoch: distinct per (seed, epoch), identical on every rank."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def base_class_weights(freq: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 6: Normalize(1 / sqrt(f_c + eps)), Normalize = divide by the mean so the weights average to 1."""
    w = 1.0 / torch.sqrt(freq.double() + eps)
    return w / w.mean()


def dynamic_class_weights(
    base: torch.Tensor, g_ema: torch.Tensor, c_ema: torch.Tensor, cfg: SamplerConfig
) -> torch.Tensor:
    """Eqs. 7-8: clip(Normalize(w_base * exp(alpha log(1 + g) + beta (1 - c))), w_min, w_max)."""
    delta = cfg.alpha * torch.log1p(g_ema.double()) + cfg.beta * (1.0 - c_ema.double())
    w = base.double() * torch.exp(delta)
    return (w / w.mean()).clamp(cfg.w_min, cfg.w_max)


def mix_class_weights(base: torch.Tensor, dyn: torch.Tensor, epoch: int, cfg: SamplerConfig) -> torch.Tensor:
    """Eqs. 9-10: gamma_e = gamma_max * min(1, (e + 1) / E_ramp); w = (1 - gamma_e) w_base + gamma_e w_dyn."""
    gamma = cfg.gamma_max * min(1.0, (epoch + 1) / cfg.e_ramp)
    return (1.0 - gamma) * base.double() + gamma * dyn.double()


class DSCBSM:
    """DS-CBSM++ state: class statistics EMAs, class weights and the image weights derived from them.

    Feedback (the paper's Fig. 5): the gradient surrogate g_c is the mean per-anchor BCE loss of the class-c logit over
    the positive anchors assigned to class c; the confidence c_c is the mean sigmoid score of the class-c logit over
    those anchors, counting only scores >= `conf_min`. Both are averaged over a window of `refresh` mini-batches, then
    folded into their EMA (the first observation of a class initialises its EMA). An image's weight is the max of its
    classes' weights (1.0 for an image without objects).
    """

    def __init__(self, image_classes: Sequence[Sequence[int]], nc: int, cfg: SamplerConfig | None = None) -> None:
        self.cfg = cfg or SamplerConfig()
        self.nc = nc
        freq = torch.zeros(nc, dtype=torch.float64)
        for classes in image_classes:
            for c in classes:
                freq[int(c)] += 1
        self.freq = freq
        self.base = base_class_weights(freq, self.cfg.eps)
        # Image -> class membership as a dense (N, nc) bool matrix: the mapping is one masked max, no Python loop.
        member = torch.zeros(len(image_classes), nc, dtype=torch.bool)
        for i, classes in enumerate(image_classes):
            if len(classes):
                member[i, torch.as_tensor(np.asarray(classes, dtype=np.int64))] = True
        self.member = member
        self.g_ema = torch.zeros(nc, dtype=torch.float64)
        self.c_ema = torch.zeros(nc, dtype=torch.float64)
        self.g_seen = torch.zeros(nc, dtype=torch.bool)
        self.c_seen = torch.zeros(nc, dtype=torch.bool)
        self._acc = torch.zeros(4, nc, dtype=torch.float64)  # window sums: loss, loss count, conf, conf count
        self.batches = 0
        self.epoch = 0
        self.class_weights = self.base.clone()
        self.image_weights = self._image_weights(self.class_weights)
        self._recompute()

    def _image_weights(self, class_w: torch.Tensor) -> torch.Tensor:
        w = torch.where(self.member, class_w[None, :], torch.zeros(1, dtype=class_w.dtype)).amax(1)
        return torch.where(self.member.any(1), w, torch.ones_like(w))

    def _recompute(self) -> None:
        dyn = dynamic_class_weights(self.base, self.g_ema, self.c_ema, self.cfg)
        self.class_weights = mix_class_weights(self.base, dyn, self.epoch, self.cfg)
        self.image_weights = self._image_weights(self.class_weights)

    def set_epoch(self, epoch: int) -> None:
        """Move the progressive mixing (eq. 9) to `epoch` (counted from 0) and recompute the weights."""
        self.epoch = epoch
        self._recompute()

    def update(self, stats: ClassStats) -> bool:
        """Accumulate one mini-batch of feedback; every `refresh` batches fold it into the EMAs. Returns True then."""
        self._acc += torch.stack((stats.cls_loss_sum, stats.cls_count, stats.conf_sum, stats.conf_count)).double().cpu()
        self.batches += 1
        if self.batches % self.cfg.refresh:
            return False
        acc = self._acc
        if dist.is_available() and dist.is_initialized():
            acc = acc.float().to(_dist_device())
            dist.all_reduce(acc)
            acc = acc.double().cpu()
        self._fold(acc)
        self._acc.zero_()
        self._recompute()
        return True

    def _fold(self, acc: torch.Tensor) -> None:
        m = self.cfg.ema_momentum
        for value_row, count_row, ema, seen in ((0, 1, self.g_ema, self.g_seen), (2, 3, self.c_ema, self.c_seen)):
            count = acc[count_row]
            has = count > 0
            mean = acc[value_row] / count.clamp_min(1)
            new = torch.where(seen, m * ema + (1 - m) * mean, mean)
            ema.copy_(torch.where(has, new, ema))
            seen |= has

    def state_dict(self) -> dict[str, object]:
        return {
            "g_ema": self.g_ema.clone(),
            "c_ema": self.c_ema.clone(),
            "g_seen": self.g_seen.clone(),
            "c_seen": self.c_seen.clone(),
            "acc": self._acc.clone(),
            "batches": self.batches,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        for key in ("g_ema", "c_ema", "g_seen", "c_seen"):
            getattr(self, key).copy_(state[key])
        self._acc.copy_(state["acc"])  # type: ignore[arg-type]
        self.batches = int(state["batches"])  # type: ignore[call-overload]
        self.set_epoch(int(state["epoch"]))  # type: ignore[call-overload]


def _dist_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class EpochSampler(Sampler[int]):
    """Per-epoch seeded sampler, uniform (a permutation) or weighted (with replacement), split over DDP ranks.

    Weighted mode draws lazily, `chunk` global indices at a time, from whatever `weights()` returns at that moment, so a
    DS-CBSM++ refresh mid-epoch steers the rest of the epoch (the DataLoader pulls indices as batches are consumed,
    `prefetch_factor * workers` batches ahead, which is deterministic for a given worker count).
    """

    def __init__(
        self,
        num_images: int,
        *,
        seed: int,
        weights: Callable[[], torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 16,
    ) -> None:
        if num_images <= 0:
            raise ValueError("the training split is empty")
        self.n, self.seed, self.weights, self.rank, self.world = num_images, seed, weights, rank, world_size
        self.per_rank = math.ceil(num_images / world_size)
        self.total = self.per_rank * world_size
        self.chunk = max(world_size, chunk - chunk % world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            perm = torch.randperm(self.n, generator=gen)
            if self.total > self.n:
                perm = torch.cat((perm, perm[: self.total - self.n]))
            yield from perm[self.rank :: self.world].tolist()
            return
        drawn = 0
        while drawn < self.total:
            size = min(self.chunk, self.total - drawn)
            w = self.weights().double()
            idx = torch.multinomial(w, size, replacement=True, generator=gen)
            drawn += size
            yield from idx[self.rank :: self.world].tolist()
