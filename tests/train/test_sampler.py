"""DS-CBSM++ weights against hand-computed numbers (GRACE eqs. 6-10) and the seeded, rank-split samplers."""

from __future__ import annotations

import pytest
import torch

from train.losses import ClassStats
from train.sampler import (
    DSCBSM,
    EpochSampler,
    SamplerConfig,
    base_class_weights,
    dynamic_class_weights,
    mix_class_weights,
)

# f = (100, 64, 81): 1/sqrt(f) = (1/10, 1/8, 1/9), mean 0.1120370 -> base weights below.
BASE = [0.8925619847, 1.1157024778, 0.9917355374]
# g_ema = (0.5, 1.0, 0.2), c_ema = (0.9, 0.2, 0.5): Delta = 0.22 ln(1+g) + 0.14 (1-c); base*exp(Delta) mean-normalised
# = (0.83621, 1.22822, 0.93557) -> clip to [0.85, 1.35]:
DYN = [0.85, 1.2282170760, 0.9355683390]


def test_base_dynamic_and_mixed_weights_hand_computed() -> None:
    cfg = SamplerConfig()
    base = base_class_weights(torch.tensor([100.0, 64.0, 81.0]))
    assert base.tolist() == pytest.approx(BASE, abs=1e-8)
    assert base.mean().item() == pytest.approx(1.0)
    dyn = dynamic_class_weights(base, torch.tensor([0.5, 1.0, 0.2]), torch.tensor([0.9, 0.2, 0.5]), cfg)
    assert dyn.tolist() == pytest.approx(DYN, abs=1e-8)
    # gamma_0 = 0.6 * 1/30 = 0.02; gamma_29 = gamma_50 = 0.6
    assert mix_class_weights(base, dyn, 0, cfg).tolist() == pytest.approx([0.8917107451, 1.1179527698, 0.9906121935])
    assert mix_class_weights(base, dyn, 29, cfg).tolist() == pytest.approx([0.8670247939, 1.1832112367, 0.9580352184])
    assert mix_class_weights(base, dyn, 50, cfg).tolist() == pytest.approx([0.8670247939, 1.1832112367, 0.9580352184])


def _stats(loss: list[float], n: list[float], conf: list[float], m: list[float]) -> ClassStats:
    t = torch.tensor
    return ClassStats(t(loss), t(n), t(conf), t(m))


def test_dscbsm_ema_refresh_and_image_mapping() -> None:
    cfg = SamplerConfig(refresh=2, ema_momentum=0.9)
    images = [[0], [1, 2], [], [2, 2]]  # class 0 in 1 image, class 1 in 1, class 2 in 3 instances
    state = DSCBSM(images, 3, cfg)
    assert state.freq.tolist() == [1, 1, 3]
    # Before any feedback: Delta = beta for all -> dyn = clip(base) ; image weight = max over its classes, empty -> 1
    base = base_class_weights(torch.tensor([1.0, 1.0, 3.0]))
    assert state.image_weights[2].item() == 1.0
    assert state.image_weights[1].item() == pytest.approx(state.class_weights[1:].max().item())
    # window 1 (2 batches): class 0 loss mean (1+2)/(1+1)=1.5, conf (0.5)/1; class 1 loss 0.4/2, conf none counted
    assert not state.update(_stats([1.0, 0.4, 0.0], [1, 2, 0], [0.5, 0.0, 0.0], [1, 0, 0]))
    assert state.update(_stats([2.0, 0.0, 0.0], [1, 0, 0], [0.0, 0.0, 0.0], [0, 0, 0]))
    assert state.g_ema.tolist() == pytest.approx([1.5, 0.2, 0.0])  # first observation initialises the EMA
    assert state.c_ema.tolist() == pytest.approx([0.5, 0.0, 0.0])
    # window 2: class 0 loss 0.5 -> EMA 0.9*1.5 + 0.1*0.5 = 1.4; conf 0.9 -> 0.9*0.5 + 0.1*0.9 = 0.54
    state.update(_stats([0.5, 0.0, 0.0], [1, 0, 0], [0.9, 0.0, 0.0], [1, 0, 0]))
    assert state.update(_stats([0.0, 0.0, 0.0], [0, 0, 0], [0.0, 0.0, 0.0], [0, 0, 0]))
    assert state.g_ema.tolist() == pytest.approx([1.4, 0.2, 0.0])
    assert state.c_ema.tolist() == pytest.approx([0.54, 0.0, 0.0])
    state.set_epoch(5)
    dyn = dynamic_class_weights(base, state.g_ema, state.c_ema, cfg)
    expected = mix_class_weights(base, dyn, 5, cfg)
    assert state.class_weights.tolist() == pytest.approx(expected.tolist())
    assert state.image_weights.tolist() == pytest.approx(
        [expected[0].item(), expected[1:].max().item(), 1.0, expected[2].item()]
    )
    # state round trip
    clone = DSCBSM(images, 3, cfg)
    clone.load_state_dict(state.state_dict())
    assert torch.equal(clone.class_weights, state.class_weights) and clone.batches == state.batches


def test_epoch_sampler_seeded_and_rank_split() -> None:
    uni = EpochSampler(10, seed=3)
    uni.set_epoch(1)
    first = list(uni)
    assert sorted(first) == list(range(10)) and first == list(uni)
    uni.set_epoch(2)
    assert list(uni) != first
    r0 = EpochSampler(10, seed=3, rank=0, world_size=2)
    r1 = EpochSampler(10, seed=3, rank=1, world_size=2)
    assert sorted(list(r0) + list(r1)) == list(range(10)) and len(r0) == 5

    weights = torch.tensor([0.0, 1.0, 0.0, 3.0])
    ws = EpochSampler(4, seed=0, weights=lambda: weights, chunk=2)
    draws = list(ws)
    assert len(draws) == 4 and set(draws) <= {1, 3} and draws == list(ws)
    big = EpochSampler(4000, seed=0, weights=lambda: torch.tensor([1.0, 3.0]).repeat(2000), chunk=64)
    odd_share = sum(i % 2 for i in big) / 4000
    assert 0.72 < odd_share < 0.78  # P(odd index) = 3/4
    w0 = EpochSampler(9, seed=1, weights=lambda: torch.ones(9), rank=0, world_size=2, chunk=4)
    w1 = EpochSampler(9, seed=1, weights=lambda: torch.ones(9), rank=1, world_size=2, chunk=4)
    assert len(list(w0)) == len(list(w1)) == 5
