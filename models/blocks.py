"""Shared YOLO11 building blocks: Conv (+BN+SiLU), DWConv, Concat, Bottleneck, C2f/C3k/C3k2, SPPF, C2PSA, DFL.

Semantics follow Ultralytics YOLO11 (Jocher & Qiu, 2024) as restated in docs/models.md, design note D1; the
code is our own. Submodule names (``conv``, ``bn``, ``act``, ``cv1``, ``m``, ...) match YOLO11 so that converted YOLO11
state_dicts load by key.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from models.fuse import fold_conv_bn

__all__ = [
    "C2PSA",
    "DFL",
    "SPPF",
    "Attention",
    "Bottleneck",
    "C2f",
    "C3k",
    "C3k2",
    "Concat",
    "Conv",
    "DWConv",
    "MatMul",
    "PSABlock",
    "autopad",
    "make_divisible",
]


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round ``x`` up to a multiple of ``divisor`` (YOLO width scaling)."""
    return int(math.ceil(x / divisor) * divisor)


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """'Same' padding for an odd kernel ``k`` with dilation ``d`` when ``p`` is None."""
    if p is not None:
        return p
    k_eff = d * (k - 1) + 1 if d > 1 else k
    return k_eff // 2


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation (SiLU by default, ``act=False`` for none, or a module)."""

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        d: int = 1,
        act: bool | nn.Module = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2)
        if isinstance(act, nn.Module):
            self.act: nn.Module = act
        else:
            self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.act(self.bn(self.conv(x))))

    def fuse(self) -> None:
        """Fold ``bn`` into ``conv`` (eval statistics); ``bn`` becomes Identity and leaves the state_dict."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fold_conv_bn(self.conv, self.bn)
            self.bn = nn.Identity()


class DWConv(Conv):
    """Depthwise-style Conv: ``groups = gcd(c1, c2)`` (true depthwise when c1 == c2)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, d: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dim`` (channels by default)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class MatMul(nn.Module):
    """``a @ b`` as a module, so FLOP counting can hook the attention matmuls like it hooks convolutions."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Bottleneck(nn.Module):
    """Two convs with a residual when ``shortcut`` and c1 == c2; hidden width ``int(c2 * e)``."""

    def __init__(
        self, c1: int, c2: int, shortcut: bool = True, g: int = 1, k: tuple[int, int] = (3, 3), e: float = 0.5
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block with ``n`` chained inner blocks whose every output is kept (YOLOv8 C2f)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut, g, k=(3, 3), e=1.0) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            ys.append(block(ys[-1]))
        return cast(torch.Tensor, self.cv2(torch.cat(ys, 1)))


class C3k(nn.Module):
    """C3 block whose inner bottlenecks use k x k convs at full hidden width."""

    def __init__(
        self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5, k: int = 3
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, k=(k, k), e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1)))


class C3k2(C2f):
    """YOLO11 C3k2: a C2f whose inner blocks are C3k(n=2) when ``c3k`` else a Bottleneck with the default e=0.5.

    The half-width inner Bottleneck (3x3 convs at c/2 channels) is what gives the published parameter counts.
    """

    def __init__(
        self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5, g: int = 1, shortcut: bool = True
    ) -> None:
        super().__init__(c1, c2, n, shortcut, g, e)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut, g) if c3k else Bottleneck(self.c, self.c, shortcut, g) for _ in range(n)
        )


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained k x k max-pools, concatenated with the input."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = [self.cv1(x)]
        for _ in range(3):
            ys.append(self.m(ys[-1]))
        return cast(torch.Tensor, self.cv2(torch.cat(ys, 1)))


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions with a depthwise positional conv on v (YOLO11 C2PSA)."""

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, g=dim, act=False)
        self.qk = MatMul()
        self.av = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.num_heads, -1, h * w).split([self.key_dim, self.key_dim, self.head_dim], 2)
        attn = (self.qk(q.transpose(-2, -1), k) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
        out = self.av(v, attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return cast(torch.Tensor, self.proj(out))


class PSABlock(nn.Module):
    """Attention then a 2x feed-forward, each with a residual."""

    def __init__(self, c: int, attn_ratio: float = 0.5, num_heads: int = 4, shortcut: bool = True) -> None:
        super().__init__()
        self.attn = Attention(c, attn_ratio=attn_ratio, num_heads=num_heads)
        self.ffn = nn.Sequential(Conv(c, c * 2, 1), Conv(c * 2, c, 1, act=False))
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x) if self.add else self.attn(x)
        y: torch.Tensor = self.ffn(x)
        return x + y if self.add else y


class C2PSA(nn.Module):
    """CSP wrapper around ``n`` PSABlocks on half the channels (heads = channels // 64)."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5) -> None:
        super().__init__()
        if c1 != c2:
            raise ValueError(f"C2PSA needs c1 == c2, got {c1} and {c2}")
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.m = nn.Sequential(*(PSABlock(self.c, attn_ratio=0.5, num_heads=max(self.c // 64, 1)) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return cast(torch.Tensor, self.cv2(torch.cat((a, self.m(b)), 1)))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over ``c1`` bins, expectation with a frozen 0..c1-1 1x1 conv.

    Input (B, 4*c1, A) logits, output (B, 4, A) side distances in grid units. The 16 weights are parameters with
    ``requires_grad=False`` (counted in the published totals).
    """

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1))
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        out: torch.Tensor = self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1))
        return out.view(b, 4, a)
