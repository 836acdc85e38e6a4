"""The copy-first-mask baseline: write the first annotation as the result of every frame.

    python tools/copy_first_mask.py DAVIS_ROOT OUT [--resolution 480p] [--split val]

Then score it like any result: ``dino-vos eval davis --davis-root DAVIS_ROOT --results OUT``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dino_vos.masks import read_mask, write_indexed_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("davis_root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    split_files = sorted((args.davis_root / "ImageSets").glob(f"*/{args.split}.txt"))
    sequences = split_files[-1].read_text().split()
    for sequence in sequences:
        frames = sorted((args.davis_root / "JPEGImages" / args.resolution / sequence).glob("*.jpg"))
        annotations = args.davis_root / "Annotations" / args.resolution / sequence
        first = read_mask(annotations / f"{frames[0].stem}.png")
        (args.out / sequence).mkdir(parents=True, exist_ok=True)
        for frame in frames:
            write_indexed_png(args.out / sequence / f"{frame.stem}.png", first)
    print(f"wrote the first mask of {len(sequences)} sequences to every frame under {args.out}")


if __name__ == "__main__":
    main()
