"""The backbone interface and its builder: official DINO/DINOv2/DINOv3 weights, any timm model
a family runs, local checkpoint files.

:class:`Backbone` is the interface (patch grid, prefix tokens, tokens of chosen blocks,
last-block CLS attention); ``dino_vos.families`` holds one implementation per family, each with
its own position-embedding rule by default (docs/protocol.md#backbones). :func:`load_backbone`
builds one by name or file: architectures are inferred in ``dino_vos.arch``, files read in
``dino_vos.checkpoints``, weights fitted in ``dino_vos.models``, caches found by ``dino_vos.hub``.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import timm
import torch
from torch import nn

from dino_vos import hub
from dino_vos.arch import GUESSED_HEADS, STANDARD_HEADS, infer_arch
from dino_vos.checkpoints import BackboneWeights, load_backbone_weights
from dino_vos.device import resolve_device
from dino_vos.errors import ArchitectureGuessWarning, BackboneError, param
from dino_vos.models import build_vit, create_model, load_state
from dino_vos.registry import (
    DEFAULT_BACKBONE,
    SHIPPED_BACKBONE,
    backbone_names,
    registered_backbone,
)
from dino_vos.spec import POS_EMBED_MODES, PosEmbedMode

__all__ = [
    "STANDARD_HEADS",
    "Backbone",
    "available_backbones",
    "build_vit",
    "default_backbone_name",
    "family_for",
    "infer_arch",
    "load_backbone",
    "weights_fingerprint",
]

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class Backbone(nn.Module):
    """The backbone interface: a timm model (``vit``) with patch grid, prefix tokens, tokens of
    chosen blocks and last-block CLS attention.

    One subclass per family (``dino_vos.families``) implements the three family-specific parts:
    the position-embedding rule (:meth:`resolve_pos_embed`), :meth:`forward_tokens`, and the
    last block's CLS attention (:meth:`last_block_input`, :meth:`cls_attention_row`).
    ``Backbone(vit, ...)`` builds the family that runs ``vit``.

    ``pos_embed``: ``auto`` (the family's own rule, docs/protocol.md#backbones), or a forced
    ``reference`` (DINO formula) / ``timm`` resize; :attr:`pos_embed_mode` is the rule in use.
    """

    family: ClassVar[str] = ""
    #: Position-embedding rules a family can run (``auto`` resolves to one of them).
    pos_embed_rules: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, vit: nn.Module | None = None, *args: Any, **kwargs: Any) -> Backbone:
        if cls is Backbone and vit is not None:  # (copy and pickle call it without arguments)
            cls = family_for(vit, kwargs.get("arch", args[2] if len(args) > 2 else None))
        return super().__new__(cls)

    def __init__(
        self,
        vit: Any,  # a timm ViT or Eva: its submodules are read by name
        name: str,
        pos_embed: PosEmbedMode = "auto",
        arch: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pos_embed not in POS_EMBED_MODES:
            raise BackboneError(
                f"unknown position-embedding mode '{pos_embed}': {', '.join(POS_EMBED_MODES)}"
            )
        self.vit = vit
        self.name = name
        self.arch = dict(arch) if arch is not None else None
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.depth = len(vit.blocks)
        self.pos_embed_mode = self.resolve_pos_embed(pos_embed)
        # A hash-friendly description of the weights, filled by ``load_backbone``.
        self.weights_id = "random"
        # What the weights file was recognised as (and what was dropped), for messages.
        self.source = ""

    # -- what each family implements ----------------------------------------------------------
    @classmethod
    def accepts(cls, vit: nn.Module, arch: Mapping[str, Any] | None) -> bool:
        """Whether this family runs the timm model ``vit`` (built from ``arch``)."""
        raise NotImplementedError

    def resolve_pos_embed(self, mode: str) -> str:
        """The position-embedding rule for a requested ``mode`` (``auto``: the family's own)."""
        raise NotImplementedError

    def forward_tokens(
        self, images: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = True
    ) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Token sequences (B, prefix + h*w, D) after the given blocks (default: the last).

        ``layers`` are block indices (negative counts from the end); ``norm`` applies the final
        LayerNorm to each returned sequence. Returns the list and the patch grid (h, w).
        """
        raise NotImplementedError

    def last_block_input(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens (B, T, D) entering the last block, and the patch grid (h, w)."""
        raise NotImplementedError

    def cls_attention_row(
        self, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Softmax(q_cls k^T * scale) of the last block over all tokens -> (B, heads, T), from
        the last block's input ``tokens`` (docs/protocol.md#attention-maps)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def has_cls(self) -> bool:
        return getattr(self.vit, "cls_token", None) is not None

    @property
    def device(self) -> torch.device:
        return next(iter(self.vit.parameters())).device

    def describe(self) -> str:
        """One line: name, patch size, width, heads, weights, device and the file's format."""
        text = (
            f"{self.name} (patch {self.patch_size}, dim {self.embed_dim}, {self.num_heads} heads, "
            f"weights {self.weights_id}) on {self.device}"
        )
        return f"{text}; {self.source}" if self.source else text

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch-grid shape for an input image of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def require_cls_attention(self) -> None:
        """Raise a :class:`BackboneError` when the model has no CLS token to attend from."""
        if not self.has_cls:
            raise BackboneError(
                f"backbone {self.name} has no CLS token, so it has no CLS attention: pick a ViT "
                "with a class token (for example dino_vits8)"
            )

    def split_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split (B, T, D) tokens into (CLS (B, D) or zeros, patch grid (B, h, w, D))."""
        batch, _, dim = tokens.shape
        patches = tokens[:, self.num_prefix_tokens :].reshape(batch, grid[0], grid[1], dim)
        cls = tokens[:, 0] if self.has_cls else patches.mean(dim=(1, 2))
        return cls, patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features: last block, final LayerNorm, prefix tokens removed -> (B, h, w, D)."""
        (tokens,), grid = self.forward_tokens(images)
        return self.split_tokens(tokens, grid)[1]


def family_for(vit: nn.Module, arch: Mapping[str, Any] | None = None) -> type[Backbone]:
    """The backbone family that runs ``vit``; a :class:`BackboneError` when none does."""
    from dino_vos.families import FAMILIES

    for family in FAMILIES:
        if family.accepts(vit, arch):
            return family
    name = (arch or {}).get("model", type(vit).__name__)
    raise BackboneError(
        f"'{name}' is a {type(vit).__name__}, which no backbone family runs: pick a DINO, DINOv2 "
        "or DINOv3 ViT (a timm vit_* model such as vit_small_patch8_224.dino, or "
        "vit_small_patch16_dinov3)"
    )


def weights_fingerprint(backbone: Backbone) -> str:
    """A content hash (hex) of the backbone's parameters and buffers: equal weights, equal hash,
    whatever file (or random seed) they came from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(backbone.vit.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _resolve_name(name: str) -> tuple[str, str | None]:
    """Map a user-facing name to (timm model name, registered short name or None)."""
    entry = registered_backbone(name)
    if entry is not None and entry.timm_name is not None:
        return entry.timm_name, name
    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise BackboneError(
            f"unknown backbone '{name}': use one of {', '.join(available_backbones())}, a timm "
            "ViT name such as vit_small_patch14_reg4_dinov2.lvd142m or vit_small_patch16_dinov3, "
            "or a weights file path"
        )
    return name, None


def available_backbones() -> list[str]:
    """Short names accepted by :func:`load_backbone` besides timm names and file paths."""
    return backbone_names()


def _shipped_file(name: str) -> Path | None:
    """The weights file of a model shipped in the package, when it is there."""
    entry = registered_backbone(name)
    path = entry.shipped_file if entry is not None else None
    return path if path is not None and path.is_file() else None


def default_backbone_name() -> str:
    """The backbone used when none is named: ``dino_vits8`` when its weights are cached or can
    be downloaded, else the model shipped with dino-vos (when present)."""
    shipped = _shipped_file(SHIPPED_BACKBONE)
    entry = registered_backbone(DEFAULT_BACKBONE)
    assert entry is not None and entry.timm_name is not None  # registered with its timm name
    default_timm = entry.timm_name
    if shipped is None or hub.hub_cached_file(default_timm) is not None:
        return DEFAULT_BACKBONE
    return DEFAULT_BACKBONE if hub.online() else SHIPPED_BACKBONE


def _cached_release(name: str) -> Path | None:
    """The official release file of a short name in torch hub's cache (a ``torch.hub``
    download), used when timm's copy of the weights is not cached."""
    timm_name, short_name = _resolve_name(name)
    entry = registered_backbone(short_name) if short_name else None
    if entry is None or not entry.checkpoint_file or hub.hub_cached_file(timm_name) is not None:
        return None
    return hub.torch_hub_file(entry.checkpoint_file)


def _pretrained_model(timm_name: str, short_name: str | None) -> tuple[nn.Module, str]:
    cached = hub.hub_cached_file(timm_name)
    if cached is not None:
        overlay = {"file": str(cached)}
        return create_model(timm_name, True, pretrained_cfg_overlay=overlay), str(cached)
    entry = registered_backbone(short_name) if short_name else None
    official = entry.checkpoint_file if entry and entry.checkpoint_file else "the weights file"
    hint = (
        f"download {official} (or the timm weights of {timm_name}) on a connected machine and "
        f"pass {param('weights', 'PATH')}"
    )
    if not hub.online():
        raise BackboneError(f"no network and no cached weights for '{timm_name}': {hint}")
    try:
        model = create_model(timm_name, True)
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise BackboneError(
            f"could not download weights for '{timm_name}' ({exc}): {hint}"
        ) from exc
    return model, f"timm:{timm_name}"


def _warn_guessed_heads(arch: Mapping[str, Any], weights: BackboneWeights, path: Path) -> None:
    """One warning line when the head count of an inferred architecture came from the width."""
    kwargs = arch["kwargs"]
    width, heads = kwargs["embed_dim"], kwargs["num_heads"]
    warnings.warn(
        f"{path.name} does not record its architecture: assumed {heads} heads for width {width} "
        f"(the DINO/DINOv2 convention; MoCo v3's ViT-S has 12); if that is wrong, name the "
        f"architecture with {param('name')} (a timm name with the right head count, or "
        "mocov3_vits16)",
        ArchitectureGuessWarning,
        stacklevel=3,
    )


def _from_file(
    name: str | None,
    path: Path,
    checkpoint_key: str | None,
    allow_partial: bool,
    shipped: Path | None,
) -> tuple[nn.Module, Mapping[str, Any], str, str]:
    """The model of a weights file: (model, arch, label, description of the file)."""
    loaded = load_backbone_weights(path, checkpoint_key)
    named = name is not None and not (shipped is not None and path == shipped)
    if named and name is not None:
        timm_name, short_name = _resolve_name(name)
        entry = registered_backbone(short_name) if short_name else None
        kwargs: dict[str, Any] = dict(entry.timm_kwargs) if entry is not None else {}
        arch: dict[str, Any] = {"model": timm_name.split(".")[0], "kwargs": kwargs}
        build = functools.partial(create_model, timm_name, **kwargs)
    else:
        arch = dict(loaded.arch or infer_arch(loaded.state, loaded.num_heads))
        if arch.pop(GUESSED_HEADS, False):
            _warn_guessed_heads(arch, loaded, path)
        build = functools.partial(build_vit, arch)
    model = load_state(build, loaded, str(path), allow_partial, named)
    return model, arch, name or path.stem, loaded.describe()


def load_backbone(
    name: str | None = None,
    weights: str | Path | None = None,
    checkpoint_key: str | None = None,
    device: str | torch.device = "cpu",
    pos_embed: PosEmbedMode = "auto",
    pretrained: bool = True,
    allow_partial: bool = False,
) -> Backbone:
    """Build a backbone by name and/or weights file, in eval mode on ``device``.

    - ``name``: an official DINO or DINOv3 short name (``dino_vits8``, ``dinov3_vits16`` ...), a
      model shipped with dino-vos, any timm ViT or DINOv3 name, or a path to a weights file.
      ``None`` infers the architecture from ``weights``, or without weights takes
      :func:`default_backbone_name`.
    - ``weights``: a local file: DINO, DINOv2, DINOv3, iBOT, MoCo v3, MAE and timm checkpoints,
      bare state dicts, ``.safetensors``, dino-vos checkpoints (docs/backbones.md).
    - ``checkpoint_key``: the network of a file that holds several (``teacher``/``student``,
      MoCo v3's ``base_encoder``/``momentum_encoder``); None takes ``teacher`` or
      ``base_encoder``.
    - ``pos_embed``: ``auto`` (the family's own rule) or a forced ``reference``/``timm`` resize.
    - ``pretrained=False`` gives a random-init model of the named architecture.
    - ``allow_partial``: load a file whose keys do not all match the architecture, warning with
      the keys ignored and the ones left random (otherwise a :class:`BackboneError`). Heads,
      decoders and masked-modelling tokens are always dropped on purpose.
    """
    if name is None and weights is None:
        name = default_backbone_name()
    if name is not None and (Path(name).suffix in WEIGHT_SUFFIXES or Path(name).is_file()):
        if weights is not None:
            raise BackboneError(
                f"give the weights file either as {param('name')} or as {param('weights')}"
            )
        name, weights = None, name
    shipped = _shipped_file(name) if name else None
    if not pretrained and weights is not None:
        raise BackboneError(
            f"random init takes no weights file: drop {param('weights')} or "
            f"{param('pretrained', False)}"
        )
    if weights is None and shipped is not None:
        if not pretrained:  # the shipped architecture, freshly initialised
            recorded = load_backbone_weights(shipped)
            arch: Mapping[str, Any] = recorded.arch or infer_arch(
                recorded.state, recorded.num_heads
            )
            backbone = Backbone(build_vit(arch), f"{name} (random init)", pos_embed, arch)
            backbone.weights_id = "random"
            return backbone.to(resolve_device(device)).eval()
        weights = shipped
    if weights is None and pretrained and name is not None:
        weights = _cached_release(name)
    if weights is not None:
        path = Path(weights)
        model, arch, label, source = _from_file(name, path, checkpoint_key, allow_partial, shipped)
        weights_id = f"file:{path.resolve()}:{path.stat().st_size}"
    else:
        assert name is not None  # no weights file: a name (or the default) was resolved above
        timm_name, short_name = _resolve_name(name)
        entry = registered_backbone(short_name) if short_name else None
        if pretrained and entry is not None and not entry.hub:
            raise BackboneError(
                f"'{name}' has no downloadable weights: pass its checkpoint with "
                f"{param('weights', 'PATH')} (or {param('pretrained', False)})"
            )
        kwargs: dict[str, Any] = dict(entry.timm_kwargs) if entry is not None else {}
        if pretrained:
            model, weights_id = _pretrained_model(timm_name, short_name)
        else:
            model, weights_id = create_model(timm_name, **kwargs), "random"
        arch = {"model": timm_name.split(".")[0], "kwargs": kwargs}
        label = name if pretrained else f"{name} (random init)"
        source = ""
    backbone = Backbone(model, label, pos_embed=pos_embed, arch=arch)
    backbone.weights_id = weights_id
    backbone.source = source
    return backbone.to(resolve_device(device)).eval()
