"""The dense formulation of docs/protocol.md#propagation: the independent check of the engine.

Full N x N affinity per context frame, multiplied by the square window mask, joint top-k over
all context frames (ties with the k-th kept), normalised to sum 1, weighted vote. It mirrors the
DINO reference script's ``label_propagation`` and ``restrict_neighborhood``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_mask(height: int, width: int, radius: int | None) -> torch.Tensor:
    """(N, N) mask: 1 where the source lies in the target's square window (None: all)."""
    if radius is None:
        return torch.ones(height * width, height * width)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near_y = (ys[:, None] - ys[None, :]).abs() <= radius
    near_x = (xs[:, None] - xs[None, :]).abs() <= radius
    return (near_y & near_x).float()


def dense_propagate(
    target: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    topk: int = 5,
    radius: int | None = 12,
    temperature: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """target (h, w, D), keys (M, h, w, D), labels (M, C, h, w) -> soft labels (C, h, w)."""
    height, width, dim = target.shape
    num_ctx, num_cls = labels.shape[:2]
    tar = F.normalize(target.reshape(-1, dim), dim=1)  # N x D
    src = F.normalize(keys.reshape(num_ctx, -1, dim), dim=2)  # M x N x D
    aff = torch.exp(torch.bmm(tar.expand(num_ctx, -1, -1), src.transpose(1, 2)) / temperature)
    if mask is None:
        mask = window_mask(height, width, radius)
    aff = aff * mask  # M x N(tar) x N(src)
    aff = aff.transpose(2, 1).reshape(-1, height * width)  # M*N(src) x N(tar)
    top = torch.topk(aff, dim=0, k=topk).values
    aff[aff < top.min(dim=0).values] = 0
    aff = aff / aff.sum(dim=0, keepdim=True)
    segs = labels.reshape(num_ctx, num_cls, -1).transpose(2, 1).reshape(-1, num_cls).T
    return torch.mm(segs, aff).reshape(num_cls, height, width)
