"""Write a generated clip (JPEG frames, indexed PNG masks, mp4) with known masks.

python tools/make_clip.py OUT_DIR [--frames 24] [--objects 3] [--size 240x352] [--style colour]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dino_vos.synthetic import CLIP_STYLES, make_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--size", default="240x352", help="HEIGHTxWIDTH")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=sorted(CLIP_STYLES), default="colour")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    clip = make_clip(args.frames, (height, width), args.objects, seed=args.seed, style=args.style)
    frames, masks = clip.write(args.out, video=args.out / "clip.mp4")
    print(f"frames: {frames}\nmasks: {masks}\nvideo: {args.out / 'clip.mp4'}")


if __name__ == "__main__":
    main()
