"""Student and teacher networks: a timm ViT backbone and the DINO projection head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dino_vos.backbones import build_vit
from dino_vos.pretrain.config import PretrainConfig


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer (the prototypes).

    With ``norm_last_layer`` the weight norm ``g`` of the last layer is frozen at 1, so its
    outputs are cosine similarities between the bottleneck feature and each prototype.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per group of same-size crops, then the head on all outputs.

    Its state dict has ``backbone.*`` (timm ViT keys) and ``head.*`` entries.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))


def build_head(config: PretrainConfig, in_dim: int) -> DINOHead:
    head = config.head
    return DINOHead(
        in_dim,
        head.out_dim,
        use_bn=head.use_bn,
        norm_last_layer=head.norm_last_layer,
        nlayers=head.nlayers,
        hidden_dim=head.hidden_dim,
        bottleneck_dim=head.bottleneck_dim,
    )


def build_student_teacher(config: PretrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student (drop-path) and teacher (no drop-path, no gradients) starting from equal weights."""
    arch = config.arch()
    student_vit = build_vit(arch, drop_path_rate=config.student.drop_path_rate)
    student = MultiCropWrapper(student_vit, build_head(config, student_vit.embed_dim))
    teacher_vit = build_vit(arch, drop_path_rate=0.0)
    teacher = MultiCropWrapper(teacher_vit, build_head(config, teacher_vit.embed_dim))
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA: ``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise RuntimeError("student and teacher have different parameter lists")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
