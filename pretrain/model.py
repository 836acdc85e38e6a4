"""Student and teacher networks: a timm ViT backbone and the DINO projection head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dino_vos.backbones import Backbone, build_vit
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


def cls_features(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ViT's final-norm CLS token (B, D) with the patch position embeddings resized by the
    DINO reference formula (scale factors ``(h + 0.1) / sqrt(N)``, bicubic, no antialias;
    docs/protocol.md#backbones), as ``vision_transformer.py`` does for the 96 px local crops.

    The formula lives in :class:`dino_vos.backbones.Backbone` (inference uses the same code);
    this is the one place pretraining reaches into it.
    """
    (tokens,), _ = Backbone(vit, name="pretrain", pos_embed="reference").forward_tokens(images)
    return tokens[:, 0]


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per group of same-size crops, then the head on all outputs.

    A timm ViT backbone gives the CLS token of :func:`cls_features`. The state dict has
    ``backbone.*`` (timm ViT keys) and ``head.*`` entries.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, VisionTransformer):
            return cls_features(self.backbone, images)
        return self.backbone(images)  # any other network: its own output

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self._features(torch.cat(list(crops[start:end]))))
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
    """Student (drop-path) and teacher (no drop-path, no gradients) starting from equal weights.

    The CLS token starts as ``trunc_normal_(std=0.02)`` like the reference ViT (timm draws it
    with std 1e-6). The teacher stays in training mode, as in the reference: a head with batch
    norm normalises the teacher's batch with its own statistics.
    """
    arch = config.arch()
    student_vit: Any = build_vit(arch, drop_path_rate=config.student.drop_path_rate)
    if student_vit.cls_token is not None:
        trunc_normal_(student_vit.cls_token, std=0.02)
    student = MultiCropWrapper(student_vit, build_head(config, student_vit.embed_dim))
    teacher_vit: Any = build_vit(arch, drop_path_rate=0.0)
    teacher = MultiCropWrapper(teacher_vit, build_head(config, teacher_vit.embed_dim))
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA: ``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter."""
    teacher_params: list[torch.Tensor] = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise RuntimeError("student and teacher have different parameter lists")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
