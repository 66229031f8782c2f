"""Detection losses: BCE classification, CIoU or Wise-IoU v3 box regression, Distribution Focal Loss.

`DetectionLoss` follows the YOLOv8/YOLO11 recipe of docs/models.md, design note D4 (gains 7.5 / 0.5 / 1.5, loss
scaled by the batch size). Wise-IoU v3 follows Tong et al., arXiv 2301.10051 (design note D8 of the same file). It
also collects the per-class statistics that drive the DS-CBSM++ sampler (`train/sampler.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import make_anchors
from train.assign import AssignResult, TaskAlignedAssigner, bbox_iou

__all__ = ["ClassStats", "DetectionLoss", "LossConfig", "WiseIoU", "dfl_loss", "wiou_momentum"]


@dataclass
class LossConfig:
    """Loss gains, assigner and Wise-IoU constants (docs/models.md, design notes D4 and D8)."""

    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    topk: int = 10
    tal_alpha: float = 0.5
    tal_beta: float = 6.0
    wiou_alpha: float = 1.9
    wiou_delta: float = 3.0
    wiou_momentum: float = 0.0  # 0 = from the formula 1 - 0.05^(1/(n*t)), t = 30% of the planned epochs


@dataclass(frozen=True)
class ClassStats:
    """Per-class sums over the positive anchors of one batch (detached, shape (nc,) each)."""

    cls_loss_sum: torch.Tensor  # sum of BCE(logit_c, target_c) over positives assigned to class c
    cls_count: torch.Tensor  # number of those positives
    conf_sum: torch.Tensor  # sum of sigmoid(logit_c) over those positives with sigmoid >= conf_min
    conf_count: torch.Tensor


def wiou_momentum(batches_per_epoch: int, epochs: int) -> float:
    """Running-mean momentum m = 1 - 0.05^(1/(n*t)) of Wise-IoU, with t = 30% of the planned epochs.

    n is the number of batches per epoch; the formula is the paper's (docs/models.md, design note D8).
    """
    steps = max(1, round(batches_per_epoch * max(1.0, 0.3 * epochs)))
    return float(1.0 - 0.05 ** (1.0 / steps))


class WiseIoU(nn.Module):
    """Wise-IoU v3 box loss with a dynamic non-monotonic focusing mechanism.

    L_IoU = 1 - IoU; R = exp(centre distance^2 / (enclosing W^2 + H^2)*) with * = detached; L_v1 = R * L_IoU;
    beta = L_IoU* / mean, r = beta / (delta * alpha^(beta - delta)); loss = r * L_v1. The running mean of L_IoU is a
    buffer (so it is checkpointed) and is updated only in training mode, before beta is computed.
    """

    iou_mean: torch.Tensor

    def __init__(self, alpha: float = 1.9, delta: float = 3.0, momentum: float = 0.01) -> None:
        super().__init__()
        self.alpha, self.delta, self.momentum = alpha, delta, momentum
        self.register_buffer("iou_mean", torch.tensor(1.0))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-box loss (N,) for xyxy boxes (N, 4) in the same unit."""
        l_iou = 1.0 - bbox_iou(pred, target, ciou=False)
        if self.training and l_iou.numel():
            self.iou_mean.mul_(1.0 - self.momentum).add_(self.momentum * l_iou.detach().mean())
        cx_p, cy_p = (pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2
        cx_t, cy_t = (target[:, 0] + target[:, 2]) / 2, (target[:, 1] + target[:, 3]) / 2
        wg = torch.maximum(pred[:, 2], target[:, 2]) - torch.minimum(pred[:, 0], target[:, 0])
        hg = torch.maximum(pred[:, 3], target[:, 3]) - torch.minimum(pred[:, 1], target[:, 1])
        r_wiou = torch.exp(((cx_p - cx_t) ** 2 + (cy_p - cy_t) ** 2) / (wg**2 + hg**2 + 1e-7).detach())
        beta = l_iou.detach() / self.iou_mean
        focus = beta / (self.delta * torch.pow(self.alpha, beta - self.delta))
        return focus * r_wiou * l_iou


def dfl_loss(pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution Focal Loss (Li et al. 2020), mean over the 4 sides.

    Args:
        pred_dist: (N, 4, reg_max) logits over the bins 0..reg_max-1.
        target: (N, 4) side distances in grid cells, already clamped to [0, reg_max - 1.01].

    Returns:
        (N,) loss: CE to the left bin weighted by (right - t) plus CE to the right bin weighted by (t - left).
    """
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = 1.0 - w_left
    logp = F.log_softmax(pred_dist.float(), -1)
    ce_left = -logp.gather(-1, left[..., None]).squeeze(-1)
    ce_right = -logp.gather(-1, right[..., None]).squeeze(-1)
    return (ce_left * w_left + ce_right * w_right).mean(-1)


class DetectionLoss(nn.Module):
    """YOLO11 training loss over the raw head maps: (7.5 box + 0.5 cls + 1.5 DFL) * batch size."""

    def __init__(
        self,
        nc: int,
        strides: torch.Tensor,
        *,
        reg_max: int = 16,
        box_loss: str = "ciou",
        config: LossConfig | None = None,
        conf_min: float = 0.01,
    ) -> None:
        super().__init__()
        if box_loss not in ("ciou", "wiou3"):
            raise ValueError(f"box_loss: expected 'ciou' or 'wiou3', got {box_loss!r}")
        self.cfg = config or LossConfig()
        self.nc, self.reg_max, self.box_loss, self.conf_min = nc, reg_max, box_loss, conf_min
        self.strides = [float(s) for s in strides]
        self.assigner = TaskAlignedAssigner(nc, topk=self.cfg.topk, alpha=self.cfg.tal_alpha, beta=self.cfg.tal_beta)
        self.wiou = WiseIoU(self.cfg.wiou_alpha, self.cfg.wiou_delta, self.cfg.wiou_momentum or 0.01)
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        self._anchor_cache: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def _anchors(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        key = (*(tuple(f.shape[2:]) for f in feats), feats[0].device, feats[0].dtype)
        if key not in self._anchor_cache:
            strides = torch.tensor(self.strides, device=feats[0].device)
            points, stride = make_anchors(feats, strides, 0.5)
            self._anchor_cache[key] = (points.float(), stride.float())
        return self._anchor_cache[key]

    @staticmethod
    def _targets(targets: torch.Tensor, bsz: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M, 6) [batch_idx, cls, x1, y1, x2, y2] -> labels (B, m), boxes (B, m, 4), mask (B, m); m = max per image."""
        device = targets.device
        if targets.shape[0] == 0:
            return (
                torch.zeros(bsz, 0, dtype=torch.long, device=device),
                torch.zeros(bsz, 0, 4, device=device),
                torch.zeros(bsz, 0, dtype=torch.bool, device=device),
            )
        bidx = targets[:, 0].long()
        counts = torch.bincount(bidx, minlength=bsz)
        m = int(counts.max())
        order = torch.argsort(bidx, stable=True)
        bidx = bidx[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(bidx.numel(), device=device) - starts[bidx]
        labels = torch.zeros(bsz, m, dtype=torch.long, device=device)
        boxes = torch.zeros(bsz, m, 4, device=device)
        mask = torch.zeros(bsz, m, dtype=torch.bool, device=device)
        labels[bidx, slot] = targets[order, 1].long()
        boxes[bidx, slot] = targets[order, 2:6].float()
        mask[bidx, slot] = True
        return labels, boxes, mask

    def forward(
        self, feats: list[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, ClassStats]:
        """Compute the loss.

        Args:
            feats: raw head maps [(B, 4*reg_max + nc, H_i, W_i)] for strides 8, 16, 32.
            targets: (M, 6) [batch_idx, class_id, x1, y1, x2, y2] in input pixels (train.augment.collate).

        Returns:
            loss: scalar to back-propagate = (gains . [box, cls, dfl]) * B.
            items: (3,) detached [box, cls, dfl] after gains, per image (for logging).
            stats: per-class statistics for DS-CBSM++.
        """
        bsz = feats[0].shape[0]
        no = 4 * self.reg_max + self.nc
        pred = torch.cat([f.reshape(bsz, no, -1) for f in feats], 2).float()
        pred_distri, pred_logits = pred.split((4 * self.reg_max, self.nc), 1)  # type: ignore[no-untyped-call]  # unannotated in torch
        pred_distri = pred_distri.permute(0, 2, 1).contiguous()  # (B, A, 64)
        pred_logits = pred_logits.permute(0, 2, 1).contiguous()  # (B, A, nc)
        anchor_points, stride = self._anchors(feats)  # grid units (A, 2), (A, 1)
        num_anchors = anchor_points.shape[0]

        dist = pred_distri.view(bsz, num_anchors, 4, self.reg_max).softmax(-1) @ self.bins  # (B, A, 4)
        pred_bboxes = torch.cat((anchor_points - dist[..., :2], anchor_points + dist[..., 2:]), -1)  # grid units

        gt_labels, gt_bboxes, mask_gt = self._targets(targets, bsz)
        res = self.assigner(
            pred_logits.detach().sigmoid(),
            pred_bboxes.detach() * stride,
            anchor_points * stride,
            gt_labels,
            gt_bboxes,
            mask_gt,
        )
        target_scores_sum = res.scores.sum().clamp_min(1.0)
        bce = F.binary_cross_entropy_with_logits(pred_logits, res.scores, reduction="none")  # (B, A, nc)
        loss_cls = bce.sum() / target_scores_sum

        loss_box = pred.new_zeros(())
        loss_dfl = pred.new_zeros(())
        fg = res.fg_mask
        if fg.any():
            weight = res.scores.sum(-1)[fg]  # (P,)
            target_bboxes = res.bboxes / stride  # grid units
            p_box, t_box = pred_bboxes[fg], target_bboxes[fg]
            per_box = self.wiou(p_box, t_box) if self.box_loss == "wiou3" else 1.0 - bbox_iou(p_box, t_box, ciou=True)
            loss_box = (per_box * weight).sum() / target_scores_sum
            anchors_fg = anchor_points.expand(bsz, -1, -1)[fg]
            ltrb = torch.cat((anchors_fg - t_box[:, :2], t_box[:, 2:] - anchors_fg), -1)
            ltrb = ltrb.clamp(0, self.reg_max - 1 - 0.01)
            d = dfl_loss(pred_distri[fg].view(-1, 4, self.reg_max), ltrb)
            loss_dfl = (d * weight).sum() / target_scores_sum

        parts = torch.stack((loss_box * self.cfg.box, loss_cls * self.cfg.cls, loss_dfl * self.cfg.dfl))  # (3,)
        stats = self._class_stats(pred_logits.detach(), bce.detach(), res)
        return parts.sum() * bsz, parts.detach(), stats

    def _class_stats(self, logits: torch.Tensor, bce: torch.Tensor, res: AssignResult) -> ClassStats:
        """Per-class classification-loss and confidence sums over positive anchors (the DS-CBSM++ feedback)."""
        fg, labels = res.fg_mask, res.labels
        lab = labels[fg]  # (P,)
        loss_c = bce[fg].gather(1, lab[:, None]).squeeze(1)  # BCE on the true class's logit
        conf_c = logits[fg].gather(1, lab[:, None]).squeeze(1).sigmoid()
        keep = conf_c >= self.conf_min
        zeros = torch.zeros(self.nc, device=logits.device)
        ones = torch.ones_like(loss_c)
        return ClassStats(
            cls_loss_sum=zeros.index_add(0, lab, loss_c),
            cls_count=zeros.index_add(0, lab, ones),
            conf_sum=zeros.index_add(0, lab[keep], conf_c[keep]),
            conf_count=zeros.index_add(0, lab[keep], ones[keep]),
        )
