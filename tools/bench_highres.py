"""High-resolution cost of DINOv3 backbones on CPU; prints JSON.

For DINOv3 ViT-S/16 and ViT-L/16 (random init: the cost does not depend on the weights) at
short sides 480 and 960 on a DAVIS-shaped 854 x 480 frame (both sides rounded to a multiple of
16, as the ``patch`` resize rule does):

- the backbone forward: seconds per frame and peak extra memory (each in its own process, so the
  peak of one does not hide another's), with the token count;
- the feature-cache size per frame (fp16 patch grid, as ``eval/cache.py`` stores it);
- the propagation step at that geometry (``LabelPropagator``: first frame + 7 recent frames,
  radius 12, top-5, 4 label channels): seconds per frame and peak extra memory. The engine keeps
  only the first frame and the context queue, so nothing grows with the number of frames.

    OMP_NUM_THREADS=1 python tools/bench_highres.py [--models dinov3_vits16,dinov3_vitl16]
                                                    [--short-sides 480,960] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FRAME = (480, 854)  # DAVIS 480p (H, W)
PATCH = 16
CONTEXT, CLASSES = 7, 4


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _input_size(short_side: int) -> tuple[int, int]:
    from dino_vos.spec import resized_frame_size

    return resized_frame_size(*FRAME, short_side, "patch", PATCH)


def backbone(name: str, short_side: int, repeats: int) -> dict:
    """Forward one frame through a random-init backbone; time and peak memory in this process."""
    import torch

    from dino_vos.backbones import load_backbone

    torch.manual_seed(0)
    model = load_backbone(name, pretrained=False)
    height, width = _input_size(short_side)
    images = torch.randn(1, 3, height, width)
    baseline = _memory_kib("VmRSS")
    with torch.inference_mode():
        features = model(images)  # warm-up (and the peak, which later forwards repeat)
        start = time.perf_counter()
        for _ in range(repeats):
            features = model(images)
        seconds = (time.perf_counter() - start) / repeats
    h, w, dim = features.shape[1:]
    return {
        "model": name,
        "short_side": short_side,
        "input": [height, width],
        "grid": [h, w],
        "tokens": h * w + model.num_prefix_tokens,
        "dim": dim,
        "forward_s_per_frame": round(seconds, 3),
        "forward_peak_extra_mib": round((_memory_kib("VmHWM") - baseline) / 1024, 1),
        "cache_mib_per_frame": round(h * w * dim * 2 / 2**20, 2),
    }


def propagation(grid: list[int], dim: int, repeats: int) -> dict:
    """One propagation step at ``grid`` x ``dim`` with a full context; time and peak memory."""
    import torch
    import torch.nn.functional as F

    from dino_vos.propagation import LabelPropagator, PropagationConfig

    generator = torch.Generator().manual_seed(0)

    def features() -> torch.Tensor:
        return F.normalize(torch.randn(*grid, dim, generator=generator), dim=-1)

    def labels() -> torch.Tensor:
        return torch.softmax(3 * torch.randn(CLASSES, *grid, generator=generator), 0)

    engine = LabelPropagator(PropagationConfig(context=CONTEXT))
    engine.reset(features(), labels())
    for _ in range(CONTEXT):
        engine.add_context(features(), labels())
    target = features()
    baseline = _memory_kib("VmRSS")
    engine.step(target)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        engine.step(target)
    seconds = (time.perf_counter() - start) / repeats
    return {
        "propagation_s_per_frame": round(seconds, 3),
        "propagation_peak_extra_mib": round((_memory_kib("VmHWM") - baseline) / 1024, 1),
    }


def _child(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--inner", *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dinov3_vits16,dinov3_vitl16")
    parser.add_argument("--short-sides", default="480,960")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--inner", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        kind, *rest = args.inner
        if kind == "backbone":
            print(json.dumps(backbone(rest[0], int(rest[1]), args.repeats)))
        else:
            grid = [int(rest[0]), int(rest[1])]
            print(json.dumps(propagation(grid, int(rest[2]), args.repeats)))
        return
    import torch

    rows = []
    for name in args.models.split(","):
        for short_side in map(int, args.short_sides.split(",")):
            row = _child("backbone", name, str(short_side), "--repeats", str(args.repeats))
            grid, dim = row["grid"], row["dim"]
            row |= _child("propagation", str(grid[0]), str(grid[1]), str(dim),
                          "--repeats", str(args.repeats))  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    report = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "frame": list(FRAME),
        "context": {"first": 1, "recent": CONTEXT, "radius": 12, "topk": 5, "classes": CLASSES},
        "rows": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
