"""Named evaluation protocols: each the video-segmentation evaluation code of a paper.

A :class:`Protocol` is a record: the frame preprocessing, the default propagation values (which
explicit options override) and the few algorithm switches in which the protocols differ. The
code reads the switches from the record (``PropagationConfig.rules``); nothing else branches on
a protocol's name. The protocols and their differences: docs/protocol.md#protocols.

No torch import here: the command line reads this module before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Candidate source patches of a target patch: ``square`` |dy|, |dx| <= r (DINO), ``circle``
#: dy^2 + dx^2 <= r^2 (DINOv3's notebook, ``make_neighborhood_mask(shape="circle")``).
Neighbourhood = Literal["square", "circle"]
#: How a label mask is brought to the patch grid: ``pil-nearest`` (PIL NEAREST, the DINO
#: reference) or ``nearest-exact`` (torch ``F.interpolate(mode="nearest-exact")``, DINOv3).
MaskDownsample = Literal["pil-nearest", "nearest-exact"]
#: Per-channel normalisation of the upsampled soft maps before the arg-max: ``norm-mask``
#: (the DINO reference's ``norm_mask``: channels whose max is positive, a constant positive
#: channel wins) or ``min-max`` (every channel, a constant channel becomes 0: DINOv3's
#: ``postprocess_probs``).
SoftNormalisation = Literal["norm-mask", "min-max"]


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol (docs/protocol.md#protocols).

    Frames: ``short_side``, ``resize_rule`` and ``interpolation`` of
    :class:`~dino_vos.spec.ResizeSpec`, ``normalisation`` constants (``video``: std 0.228 for
    red, ``imagenet``: 0.229). Propagation values: ``topk``, ``context``, ``radius``,
    ``temperature`` (options override them). Switches: ``neighbourhood``, ``renormalise``
    (divide each propagated soft vector by its sum), ``mask_downsample``, ``upsample`` (the
    default of ``PropagationConfig.upsample``: ``bilinear`` by the patch size, or ``nearest``
    straight to the frame size) and ``soft_normalisation``.
    """

    name: str
    source: str
    short_side: int
    resize_rule: str
    interpolation: str
    normalisation: str
    topk: int
    context: int
    radius: int | None
    temperature: float
    neighbourhood: Neighbourhood
    renormalise: bool
    mask_downsample: MaskDownsample
    upsample: str
    soft_normalisation: SoftNormalisation

    def propagation_values(self) -> dict[str, int | float | None]:
        """The propagation parameters that options may override."""
        return {
            "topk": self.topk,
            "context": self.context,
            "radius": self.radius,
            "temperature": self.temperature,
        }


PROTOCOLS: dict[str, Protocol] = {
    "dino": Protocol(
        name="dino",
        source="DINO (Caron et al. 2021), eval_video_segmentation.py",
        short_side=480,
        resize_rule="reference",
        interpolation="bilinear",
        normalisation="video",
        topk=5,
        context=7,
        radius=12,
        temperature=0.1,
        neighbourhood="square",
        renormalise=False,
        mask_downsample="pil-nearest",
        upsample="bilinear",
        soft_normalisation="norm-mask",
    ),
    "dinov3": Protocol(
        name="dinov3",
        source="DINOv3 (Simeoni et al. 2025), notebooks/segmentation_tracking.ipynb",
        short_side=960,
        resize_rule="ceil",
        interpolation="bicubic",
        normalisation="imagenet",
        topk=5,
        context=7,
        radius=12,
        temperature=0.2,
        neighbourhood="circle",
        renormalise=True,
        mask_downsample="nearest-exact",
        upsample="nearest",
        soft_normalisation="min-max",
    ),
}
#: The default protocol: the records of its runs are those of earlier versions.
DEFAULT_PROTOCOL = "dino"


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}") from None
