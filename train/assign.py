"""Task-aligned label assignment (TOOD, Feng et al. 2021, as used by YOLOv8/YOLO11) and the box IoU it ranks by.

Fully vectorised over (batch, ground truth, anchor): no Python loop over boxes. Parameters follow
docs/models.md, design note D4: top-k 10, alpha 0.5, beta 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AssignResult", "TaskAlignedAssigner", "bbox_iou"]


def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, *, ciou: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """IoU (or Complete-IoU, Zheng et al. 2020) of broadcastable xyxy boxes.

    Args:
        box1: (..., 4) xyxy, any unit (both boxes in the same unit).
        box2: (..., 4) xyxy, broadcastable against ``box1``.
        ciou: return CIoU = IoU - rho^2 / c^2 - v * a (range [-1.5, 1]); plain IoU otherwise.
        eps: keeps divisions finite for degenerate boxes.

    Returns:
        (...,) tensor.
    """
    b1x1, b1y1, b1x2, b1y2 = box1.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = box2.unbind(-1)
    w1, h1 = b1x2 - b1x1, (b1y2 - b1y1).clamp_min(eps)
    w2, h2 = b2x2 - b2x1, (b2y2 - b2y1).clamp_min(eps)
    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp_min(0) * (
        torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)
    ).clamp_min(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not ciou:
        return iou
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)  # enclosing box
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    c2 = cw.pow(2) + ch.pow(2) + eps
    rho2 = ((b2x1 + b2x2 - b1x1 - b1x2).pow(2) + (b2y1 + b2y2 - b1y1 - b1y2).pow(2)) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


@dataclass(frozen=True)
class AssignResult:
    """Targets for every anchor of a batch (A = anchors over all levels)."""

    labels: torch.Tensor  # (B, A) int64 class of the assigned GT (0 where background)
    bboxes: torch.Tensor  # (B, A, 4) xyxy of the assigned GT, same unit as the GT boxes given
    scores: torch.Tensor  # (B, A, nc) soft targets: one-hot * normalised alignment metric
    fg_mask: torch.Tensor  # (B, A) bool, anchor has a positive assignment
    gt_index: torch.Tensor  # (B, A) int64 index of the assigned GT within its image (0 where background)


class TaskAlignedAssigner:
    """Assigns ground-truth boxes to anchors by the alignment metric t = s^alpha * u^beta.

    s = predicted score of the GT's class at the anchor, u = CIoU(GT, predicted box) clamped at 0. Candidates are
    anchor centres strictly inside the GT box; each GT keeps its top-k candidates by t; an anchor claimed by several
    GTs goes to the one with the highest IoU. Target scores are one-hot(class) scaled so that, per GT, the largest
    target equals that GT's best IoU among its positives.
    """

    def __init__(self, nc: int, *, topk: int = 10, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9) -> None:
        self.nc, self.topk, self.alpha, self.beta, self.eps = nc, topk, alpha, beta, eps

    @torch.no_grad()
    def __call__(
        self,
        pd_scores: torch.Tensor,  # (B, A, nc) sigmoid scores
        pd_bboxes: torch.Tensor,  # (B, A, 4) predicted xyxy, pixels
        anchor_points: torch.Tensor,  # (A, 2) anchor centres (x, y), pixels
        gt_labels: torch.Tensor,  # (B, M) int64
        gt_bboxes: torch.Tensor,  # (B, M, 4) xyxy pixels
        mask_gt: torch.Tensor,  # (B, M) bool, real (non-padding) GT
    ) -> AssignResult:
        """Assign targets; see the class docstring. M = max GT count per image (rows past an image's count padded)."""
        bsz, num_anchors = pd_scores.shape[:2]
        if gt_bboxes.shape[1] == 0:
            z = torch.zeros(bsz, num_anchors, dtype=torch.long, device=pd_scores.device)
            return AssignResult(
                z, pd_bboxes.new_zeros(bsz, num_anchors, 4), torch.zeros_like(pd_scores), z.bool(), z.clone()
            )
        gt_labels = gt_labels.long()
        # (B, M, A) anchor centre strictly inside the GT, for real GTs only.
        lt = anchor_points[None, None] - gt_bboxes[:, :, None, :2]
        rb = gt_bboxes[:, :, None, 2:] - anchor_points[None, None]
        mask_in = (torch.cat((lt, rb), -1).amin(-1) > self.eps) & mask_gt[:, :, None]

        overlaps = bbox_iou(gt_bboxes[:, :, None, :], pd_bboxes[:, None, :, :], ciou=True).clamp_min(0)
        overlaps = overlaps * mask_in
        idx = gt_labels.clamp(0, self.nc - 1)[:, :, None].expand(-1, -1, num_anchors)  # (B, M, A)
        scores = pd_scores.permute(0, 2, 1).gather(1, idx) * mask_in  # (B, M, A)
        align = scores.pow(self.alpha) * overlaps.pow(self.beta)

        k = min(self.topk, num_anchors)
        top_idx = align.topk(k, dim=-1).indices  # (B, M, k)
        mask_topk = torch.zeros_like(mask_in).scatter_(-1, top_idx, True)
        mask_pos = mask_topk & mask_in  # (B, M, A)

        # Resolve anchors claimed by several GTs: keep the GT with the highest IoU.
        multi = mask_pos.sum(1) > 1  # (B, A)
        if multi.any():
            best = overlaps.argmax(1)  # (B, A)
            best_onehot = torch.zeros_like(mask_pos).scatter_(1, best[:, None, :], True)
            mask_pos = torch.where(multi[:, None, :], best_onehot & mask_in, mask_pos)
        fg_mask = mask_pos.any(1)  # (B, A)
        gt_index = mask_pos.float().argmax(1)  # (B, A)

        labels = gt_labels.gather(1, gt_index)  # (B, A)
        bboxes = gt_bboxes.gather(1, gt_index[..., None].expand(-1, -1, 4))  # (B, A, 4)
        labels = torch.where(fg_mask, labels, torch.zeros_like(labels)).clamp(0, self.nc - 1)
        target_scores = torch.nn.functional.one_hot(labels, self.nc).to(pd_scores.dtype)
        target_scores = target_scores * fg_mask[..., None]

        align = align * mask_pos
        pos_align_max = align.amax(-1, keepdim=True)  # (B, M, 1)
        pos_iou_max = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (align * pos_iou_max / (pos_align_max + self.eps)).amax(1)  # (B, A)
        return AssignResult(labels, bboxes, target_scores * norm[..., None], fg_mask, gt_index)
