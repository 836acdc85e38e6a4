"""The DINO self-distillation loss with output centering (docs/protocol.md#pretraining)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dino_vos.distributed import all_reduce_sum, world_size


@dataclass(frozen=True)
class LossStats:
    """Collapse diagnostics (paper Fig. 7), averaged like the loss."""

    entropy: torch.Tensor  # mean entropy of the teacher's per-image distributions
    kl: torch.Tensor  # mean KL(teacher || student) over the loss pairs


def _widen(values: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) outputs -> float32; float32/float64 stay as they are."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher outputs and student outputs.

    For each teacher (global) crop ``i`` and student crop ``v != i``: ``-sum softmax((t_i - c) /
    T_t) * log_softmax(s_v / T_s)``, averaged over the batch, summed over pairs and divided by the
    number of pairs. The center ``c`` is an EMA of the teacher outputs over the global batch,
    updated after the loss.
    """

    def __init__(
        self,
        out_dim: int,
        num_crops: int,
        num_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.center: torch.Tensor
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> tuple[torch.Tensor, LossStats]:
        """``student_output``: (num_crops * B, K); ``teacher_output``: (num_global * B, K)."""
        student_output, teacher_output = _widen(student_output), _widen(teacher_output)
        student_all = F.log_softmax(student_output / self.student_temp, dim=-1)
        student_logp = student_all.chunk(self.num_crops)
        teacher_all = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach()
        teacher_p = teacher_all.chunk(self.num_global_crops)
        total = student_output.new_zeros(())
        pairs = 0
        for i, q in enumerate(teacher_p):
            for v, logp in enumerate(student_logp):
                if v == i:
                    continue
                total = total + torch.sum(-q * logp, dim=-1).mean()
                pairs += 1
        loss = total / pairs
        with torch.no_grad():
            # Each teacher crop enters the same number of pairs, so the mean cross-entropy is
            # the mean teacher entropy plus the mean KL(teacher || student).
            entropy = torch.stack([torch.special.entr(q).sum(-1).mean() for q in teacher_p]).mean()
            stats = LossStats(entropy=entropy, kl=loss.detach() - entropy)
        self.update_center(teacher_output)
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """``c <- m c + (1 - m) * mean`` of the teacher outputs over all ranks."""
        batch_center = all_reduce_sum(_widen(teacher_output).sum(dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_output) * world_size())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
