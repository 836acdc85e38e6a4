"""ViT backbones by name: official DINO weights, any timm ViT, local checkpoint files.

The :class:`Backbone` wraps a timm ``VisionTransformer`` and runs its own token preparation so
that position embeddings for arbitrary frame sizes follow the DINO reference formula by default
(docs/protocol.md#backbones) instead of timm's explicit-size resampling.
"""

from __future__ import annotations

import functools
import hashlib
import math
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from dino_vos.checkpoints import BackboneWeights, load_backbone_weights, summarize_keys
from dino_vos.device import resolve_device
from dino_vos.errors import BackboneError, PartialWeightsWarning
from dino_vos.registry import (
    DEFAULT_BACKBONE,
    SHIPPED_BACKBONE,
    backbone_names,
    registered_backbone,
)
from dino_vos.spec import POS_EMBED_MODES, PosEmbedMode

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
#: Head counts of the standard ViT widths (Ti, S, B, L, H, g, DINOv2's g): the weights do not
#: store the head count, so an inferred architecture takes it from here (or from the name the
#: checkpoint records), and only for other widths assumes 64-dimensional heads.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}


class Backbone(nn.Module):
    """A timm ViT with DINO-style token preparation and patch-feature outputs."""

    def __init__(
        self,
        vit: VisionTransformer,
        name: str,
        pos_embed: PosEmbedMode = "reference",
        arch: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if pos_embed not in POS_EMBED_MODES:
            raise BackboneError(f"unknown position-embedding mode '{pos_embed}': reference or timm")
        self.vit = vit
        self.name = name
        self.pos_embed_mode = pos_embed
        self.arch = dict(arch) if arch is not None else None
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.depth = len(vit.blocks)
        # A hash-friendly description of the weights, filled by ``load_backbone``.
        self.weights_id = "random"
        # What the weights file was recognised as (and what was dropped), for messages.
        self.source = ""

    @property
    def device(self) -> torch.device:
        return self.vit.pos_embed.device if self.vit.pos_embed is not None else torch.device("cpu")

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

    def _reference_patch_pos(
        self, grid: tuple[int, int], image_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Patch position embeddings resized with the DINO reference formula (scale factors)."""
        vit = self.vit
        pos = vit.pos_embed
        patch_pos = pos if vit.no_embed_class else pos[:, vit.num_prefix_tokens :]
        stored_h, stored_w = vit.patch_embed.grid_size
        num_stored = patch_pos.shape[1]
        h, w = grid
        if h * w == num_stored and image_hw[0] == image_hw[1]:
            return patch_pos
        dim = patch_pos.shape[-1]
        grid_pos = patch_pos.reshape(1, stored_h, stored_w, dim).permute(0, 3, 1, 2)
        # The reference adds 0.1 and resizes by a scale factor (not a size); keep that quirk.
        resized = F.interpolate(
            grid_pos.float(),
            scale_factor=((h + 0.1) / math.sqrt(num_stored), (w + 0.1) / math.sqrt(num_stored)),
            mode="bicubic",
            align_corners=False,
        ).to(patch_pos.dtype)
        if resized.shape[-2:] != (h, w):
            raise BackboneError(f"position embedding resize gave {tuple(resized.shape[-2:])}")
        return resized.permute(0, 2, 3, 1).reshape(1, h * w, dim)

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed ``images`` (B,3,H,W), add prefix tokens and position embeddings."""
        vit = self.vit
        image_hw = (images.shape[-2], images.shape[-1])
        x = vit.patch_embed(images)  # (B, h, w, D): built with dynamic_img_size
        batch, h, w, dim = x.shape
        if self.pos_embed_mode == "timm" or vit.pos_embed is None:
            return vit._pos_embed(x), (h, w)
        patch_pos = self._reference_patch_pos((h, w), image_hw)
        x = x.reshape(batch, h * w, dim)
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(batch, -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(batch, -1, -1))
        if vit.no_embed_class:
            x = torch.cat([*prefix, x + patch_pos], dim=1)
        else:
            prefix_pos = vit.pos_embed[:, : vit.num_prefix_tokens]
            x = torch.cat([*prefix, x], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)
        return vit.pos_drop(x), (h, w)

    def forward_tokens(
        self, images: torch.Tensor, layers: Sequence[int] | None = None, norm: bool = True
    ) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Token sequences (B, prefix + h*w, D) after the given blocks (default: the last).

        ``layers`` are block indices (negative counts from the end); ``norm`` applies the final
        LayerNorm to each returned sequence. Returns the list and the patch grid (h, w).
        """
        wanted = sorted({i % self.depth for i in (layers if layers else [-1])})
        x, grid = self.prepare_tokens(images)
        x = self.vit.patch_drop(x)
        x = self.vit.norm_pre(x)
        outputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.vit.blocks):
            x = block(x)
            if index in wanted:
                outputs[index] = self.vit.norm(x) if norm else x
            if index >= wanted[-1]:
                break
        order = [i % self.depth for i in (layers if layers else [-1])]
        return [outputs[i] for i in order], grid

    def split_tokens(
        self, tokens: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Split (B, T, D) tokens into (CLS (B, D) or zeros, patch grid (B, h, w, D))."""
        batch, _, dim = tokens.shape
        patches = tokens[:, self.num_prefix_tokens :].reshape(batch, grid[0], grid[1], dim)
        cls = tokens[:, 0] if self.vit.cls_token is not None else patches.mean(dim=(1, 2))
        return cls, patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features: last block, final LayerNorm, prefix tokens removed -> (B, h, w, D)."""
        (tokens,), grid = self.forward_tokens(images)
        return self.split_tokens(tokens, grid)[1]


def weights_fingerprint(backbone: Backbone) -> str:
    """A content hash (hex) of the backbone's parameters and buffers: equal weights, equal hash,
    whatever file (or random seed) they came from."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(backbone.vit.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _create_vit(timm_name: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model`` for ViTs: no classifier, any input size; non-ViTs are refused."""
    _refuse_eva(timm_name)
    try:
        model = timm.create_model(
            timm_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **kwargs
        )
    except TypeError as exc:  # non-ViT families do not take dynamic_img_size
        raise BackboneError(
            f"'{timm_name}' is not a ViT: pick a timm vit_* model "
            "(for example vit_small_patch8_224.dino)"
        ) from exc
    return _require_vit(model, timm_name)


def _refuse_eva(timm_name: str) -> None:
    """DINOv3 (and EVA) models are timm ``Eva`` models: refused before building them."""
    base = timm.models.split_model_name_tag(timm_name)[0]
    if not timm.models.is_model(base):
        return
    if timm.models.model_entrypoint(base).__module__.endswith(".eva"):
        what = (
            "a DINOv3 model, which timm builds as an Eva with rotary position embeddings (RoPE)"
            if "dinov3" in base
            else "a timm Eva model (rotary position embeddings in EVA-02)"
        )
        raise BackboneError(
            f"'{timm_name}' is {what}, not supported: dino-vos needs a timm VisionTransformer "
            "with absolute position embeddings, which it resizes to any frame size (use a DINO "
            "or DINOv2 ViT, e.g. vit_small_patch14_reg4_dinov2)"
        )


def build_vit(arch: Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """A random-init timm ViT from ``{"model": timm name, "kwargs": {...}}`` (plus overrides)."""
    try:
        return _create_vit(arch["model"], **{**dict(arch.get("kwargs", {})), **overrides})
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError/...
        raise BackboneError(f"cannot build architecture {dict(arch)}: {exc}") from exc


def _require_vit(model: nn.Module, name: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"'{name}' is a {type(model).__name__}, not a ViT: pick a timm vit_* model "
            "(for example vit_small_patch8_224.dino)"
        )
    return model


def _heads_for(embed_dim: int) -> int:
    """The standard head count of a width, else one head per 64 channels (a divisor)."""
    heads = STANDARD_HEADS.get(embed_dim) or max(1, embed_dim // 64)
    while embed_dim % heads:
        heads -= 1
    return heads


def infer_arch(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Guess the timm ViT of a state dict with timm or DINOv2 keys.

    Width and patch come from ``patch_embed.proj.weight``, depth from the block indices, the MLP
    (ratio, SwiGLU) from block 0, layer scale from ``ls1.gamma``, prefix tokens and the stored
    grid from ``cls_token``/``reg_token``/``register_tokens``/``pos_embed``. The head count is
    not in the weights: ``num_heads`` (from the checkpoint's recorded architecture), else
    :data:`STANDARD_HEADS` for the width, else one head per 64 channels.
    """
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
    except KeyError as exc:
        conv_stem = "patch_embed.proj.0.weight" in state  # e.g. MoCo v3 vit_conv_*
        stem = " (a convolutional stem is not supported)" if conv_stem else ""
        raise BackboneError(
            f"weights have no '{exc.args[0]}' entry: not a ViT state dict{stem} (keys such as "
            f"{', '.join(list(state)[:5])})"
        ) from exc
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    fc1 = state.get("blocks.0.mlp.fc1.weight", state.get("blocks.0.mlp.w12.weight"))
    fc2 = state.get("blocks.0.mlp.fc2.weight", state.get("blocks.0.mlp.w3.weight"))
    if depth == 0 or fc1 is None or fc2 is None:
        raise BackboneError(
            "weights have no transformer blocks with an MLP (blocks.0.mlp.fc1/fc2): not a ViT "
            f"state dict (keys such as {', '.join(list(state)[:5])})"
        )
    hidden = int(fc1.shape[0])
    swiglu = hidden == 2 * int(fc2.shape[1])  # SwiGLU packs both projections in fc1 (w12)
    mlp_ratio = hidden / embed_dim
    if int(embed_dim * mlp_ratio) != hidden:  # timm floors embed_dim * mlp_ratio
        mlp_ratio = (hidden + 0.5) / embed_dim
    has_cls = "cls_token" in state
    dinov2 = "mask_token" in state  # DINOv2 layout: the CLS position is always stored
    reg_key = "register_tokens" if dinov2 else "reg_token"
    num_reg = int(state[reg_key].shape[1]) if reg_key in state else 0
    length = int(pos.shape[1])
    if dinov2:  # DINOv2 stores the CLS position, never registers; timm folds it for registers
        layouts = [(length - 1, num_reg > 0)]
    else:  # timm: prefix positions stored (no_embed_class False) or patch positions only
        layouts = [(length - int(has_cls) - num_reg, False), (length, True)]
        layouts = layouts[::-1] if num_reg else layouts  # registers: timm's DINOv2 convention
    grid = next(((n, flag) for n, flag in layouts if n > 0 and math.isqrt(n) ** 2 == n), None)
    if grid is None:
        raise BackboneError(f"cannot infer the patch grid from pos_embed of length {length}")
    side, no_embed_class = math.isqrt(grid[0]), grid[1]
    kwargs: dict[str, Any] = {
        "img_size": side * patch,
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads or _heads_for(embed_dim),
        "mlp_ratio": mlp_ratio,
        "class_token": has_cls,
        "reg_tokens": num_reg,
        "no_embed_class": no_embed_class,
    }
    if "blocks.0.ls1.gamma" in state:
        kwargs["init_values"] = 1e-5  # layer scale (DINOv2); the value is loaded
    if "blocks.0.attn.qkv.weight" in state and "blocks.0.attn.qkv.bias" not in state:
        kwargs["qkv_bias"] = False
    model = "vit_giant_patch14_dinov2" if swiglu else "vit_base_patch16_224"
    return {"model": model, "kwargs": kwargs}


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _misfit(
    source: str, weights: BackboneWeights, problems: list[str], partial: bool, named: bool
) -> str:
    fix = (
        "pass the matching --backbone, or omit it to infer the architecture from the weights"
        if named
        else "the architecture was inferred from the weights, so the file lacks parts of a ViT "
        "or holds other modules: check it, or name the architecture with --backbone"
    )
    hint = " (--allow-partial loads the matching keys anyway)" if partial else ""
    return (
        f"weights {source} ({weights.describe()}) do not fit this architecture "
        f"({'; '.join(problems)}): {fix}{hint}"
    )


def _timm_layout(
    vit: VisionTransformer, weights: BackboneWeights, source: str, named: bool
) -> dict[str, torch.Tensor]:
    """The state dict with timm keys: DINOv2's layout goes through timm's own checkpoint filter
    (``mask_token`` dropped, ``register_tokens`` -> ``reg_token`` with the CLS position folded
    into ``cls_token``, SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``)."""
    state = dict(weights.state)
    if not weights.dinov2_layout:
        return state
    # timm's filter resamples another patch size or grid and assumes the register layout of
    # the model: check those first, so that a mismatch is refused instead of resampled
    problems = []
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    own_proj = vit.patch_embed.proj.weight
    if proj is not None and proj.shape != own_proj.shape:
        problems.append(
            f"patch_embed.proj.weight is {tuple(proj.shape)} not {tuple(own_proj.shape)}"
        )
    if pos is not None and pos.shape[1] - 1 != vit.patch_embed.num_patches:
        problems.append(
            f"pos_embed holds {pos.shape[1] - 1} patch positions not {vit.patch_embed.num_patches}"
        )
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    own_registers = int(getattr(vit, "num_reg_tokens", 0))
    if registers != own_registers or (registers and not vit.no_embed_class):
        if registers:
            problems.append(
                f"unexpected register_tokens ({registers}, the model has {own_registers})"
            )
        else:
            problems.append(f"missing register_tokens (the model has {own_registers})")
    if problems:
        raise BackboneError(_misfit(source, weights, problems, partial=False, named=named))
    return checkpoint_filter_fn(state, vit)


def _load_state(
    build: Callable[[], VisionTransformer],
    weights: BackboneWeights,
    source: str,
    allow_partial: bool = False,
    named: bool = True,
) -> VisionTransformer:
    """The model ``build`` makes, holding ``weights``: every key must match unless
    ``allow_partial``; a tensor of the wrong shape is always refused.

    The model is built on the meta device (no random init, which takes seconds for a large ViT
    on a CPU) and receives the loaded tensors; only a partial load builds it for real, so that
    the keys missing from the file keep timm's initialisation. ``named``: the architecture was
    named by the user (not inferred), for the advice of an error.
    """
    with torch.device("meta"):
        vit = build()
    state = _timm_layout(vit, weights, source, named)
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {summarize_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {summarize_keys(unexpected)}")
    if wrong_shape:
        k = wrong_shape[0]
        more = f" (and {len(wrong_shape) - 1} more)" if len(wrong_shape) > 1 else ""
        problems.append(f"{k} is {tuple(state[k].shape)} not {tuple(own[k].shape)}{more}")
    if wrong_shape or (problems and not allow_partial):
        raise BackboneError(_misfit(source, weights, problems, not wrong_shape, named))
    if problems:
        ignored = [
            f"{_count(len(missing), 'missing key')}, left random: {summarize_keys(missing)}"
            if missing
            else "",
            f"{_count(len(unexpected), 'unexpected key')}, ignored: {summarize_keys(unexpected)}"
            if unexpected
            else "",
        ]
        warnings.warn(
            f"--allow-partial: loaded {source} with {'; '.join(p for p in ignored if p)}",
            PartialWeightsWarning,
            stacklevel=3,
        )
    if missing:
        vit = build()
        vit.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return vit
    tensors = {k: state[k].to(own[k].dtype).contiguous() for k in own}
    vit.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*vit.parameters(), *vit.buffers()]):  # non-persistent buffers
        vit = build()
        vit.load_state_dict(tensors, strict=True)
    return vit


def _hub_cached_file(timm_name: str) -> Path | None:
    """A locally cached copy of a timm model's pretrained weights, if any."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str):
                    return Path(found)
        except ImportError:
            pass
    if cfg.url:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if hub_file.is_file():
            return hub_file
    return None


def _online(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _resolve_name(name: str) -> tuple[str, str | None]:
    """Map a user-facing name to (timm model name, registered short name or None)."""
    entry = registered_backbone(name)
    if entry is not None and entry.timm_name is not None:
        return entry.timm_name, name
    if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
        raise BackboneError(
            f"unknown backbone '{name}': use one of {', '.join(available_backbones())}, a timm ViT "
            "name such as vit_small_patch14_reg4_dinov2.lvd142m, or a weights file path"
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
    default_timm = registered_backbone(DEFAULT_BACKBONE).timm_name  # type: ignore[union-attr]
    if shipped is None or _hub_cached_file(default_timm) is not None:
        return DEFAULT_BACKBONE
    return DEFAULT_BACKBONE if _online() else SHIPPED_BACKBONE


def _pretrained_vit(timm_name: str, short_name: str | None) -> tuple[VisionTransformer, str]:
    cached = _hub_cached_file(timm_name)
    if cached is not None:
        overlay = {"file": str(cached)}
        return _create_vit(timm_name, True, pretrained_cfg_overlay=overlay), str(cached)
    entry = registered_backbone(short_name) if short_name else None
    official = entry.checkpoint_file if entry and entry.checkpoint_file else "the weights file"
    hint = (
        f"download {official} (or the timm weights of {timm_name}) on a connected machine and "
        "pass --weights PATH"
    )
    if not _online():
        raise BackboneError(f"no network and no cached weights for '{timm_name}': {hint}")
    try:
        model = _create_vit(timm_name, True)
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise BackboneError(
            f"could not download weights for '{timm_name}' ({exc}): {hint}"
        ) from exc
    return model, f"timm:{timm_name}"


def load_backbone(
    name: str | None = None,
    weights: str | Path | None = None,
    checkpoint_key: str | None = None,
    device: str | torch.device = "cpu",
    pos_embed: PosEmbedMode = "reference",
    pretrained: bool = True,
    allow_partial: bool = False,
) -> Backbone:
    """Build a backbone by name and/or weights file, in eval mode on ``device``.

    - ``name``: an official DINO short name (``dino_vits8`` ...), a model shipped with dino-vos,
      any timm ViT name, or a path to a weights file. ``None`` infers the architecture from
      ``weights``, or without weights takes :func:`default_backbone_name`.
    - ``weights``: a local file: DINO, DINOv2, iBOT, MoCo v3, MAE and timm checkpoints, bare
      state dicts, ``.safetensors``, dino-vos checkpoints (docs/backbones.md).
    - ``checkpoint_key``: the network of a file that holds several (``teacher``/``student``,
      MoCo v3's ``base_encoder``/``momentum_encoder``); None takes ``teacher`` or
      ``base_encoder``.
    - ``pretrained=False`` gives a random-init model of the named architecture.
    - ``allow_partial``: load a file whose keys do not all match the architecture, warning with
      the keys ignored and the ones left random (otherwise a :class:`BackboneError`). Heads,
      decoders and masked-modelling tokens are always dropped on purpose.
    """
    if name is None and weights is None:
        name = default_backbone_name()
    if name is not None and (Path(name).suffix in WEIGHT_SUFFIXES or Path(name).is_file()):
        if weights is not None:
            raise BackboneError("give the weights file either as the backbone or as --weights")
        name, weights = None, name
    shipped = _shipped_file(name) if name else None
    if not pretrained and weights is not None:
        raise BackboneError("random init takes no weights file: drop --weights or --random-init")
    if weights is None and shipped is not None and shipped.is_file():
        if not pretrained:  # the shipped architecture, freshly initialised
            recorded = load_backbone_weights(shipped)
            arch = recorded.arch or infer_arch(recorded.state, recorded.num_heads)
            backbone = Backbone(build_vit(arch), f"{name} (random init)", pos_embed, arch)
            backbone.weights_id = "random"
            return backbone.to(resolve_device(device)).eval()
        weights = shipped
    if weights is not None:
        loaded = load_backbone_weights(weights, checkpoint_key)
        named = name is not None and not (shipped is not None and Path(weights) == shipped)
        if named:
            timm_name, _ = _resolve_name(name)
            arch: Mapping[str, Any] = {"model": timm_name.split(".")[0], "kwargs": {}}
            build = functools.partial(_create_vit, timm_name)
        else:
            arch = loaded.arch or infer_arch(loaded.state, loaded.num_heads)
            build = functools.partial(build_vit, arch)
        vit = _load_state(build, loaded, str(weights), allow_partial, named)
        label = name or Path(weights).stem
        weights_id = f"file:{Path(weights).resolve()}:{Path(weights).stat().st_size}"
        source = loaded.describe()
    else:
        timm_name, short_name = _resolve_name(name)
        if pretrained:
            vit, weights_id = _pretrained_vit(timm_name, short_name)
        else:
            vit = _create_vit(timm_name)
            weights_id = "random"
        arch = {"model": timm_name.split(".")[0], "kwargs": {}}
        label = name if pretrained else f"{name} (random init)"
        source = ""
    backbone = Backbone(vit, label, pos_embed=pos_embed, arch=arch)
    backbone.weights_id = weights_id
    backbone.source = source
    return backbone.to(resolve_device(device)).eval()
