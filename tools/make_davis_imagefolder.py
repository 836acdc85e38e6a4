"""Build an ImageFolder from DAVIS frames: class = sequence, first half -> train, second -> val.

python tools/make_davis_imagefolder.py OUT [--src ../shared/data/davis2016-train-240p]
    [--stride 1] [--copy]

Frames are linked (symlinks, or copies with ``--copy``) into ``OUT/train/<seq>/`` and
``OUT/val/<seq>/``; ``--stride N`` keeps every N-th frame. The folder is built under a temporary
name and renamed at the end, so an ``OUT`` that exists is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from dino_vos.errors import InputError
from dino_vos.sources import IMAGE_SUFFIXES, natural_key

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data" / "davis2016-train-240p"


def sequence_frames(src: Path) -> dict[str, list[Path]]:
    """Frames of every sequence under ``src/JPEGImages/<res>/`` (natural order)."""
    roots = sorted((src / "JPEGImages").glob("*")) if (src / "JPEGImages").is_dir() else []
    if not roots:
        raise InputError(f"no JPEGImages/<resolution>/ folder in {src}: expected a DAVIS root")
    sequences = {}
    for folder in sorted(p for p in roots[0].iterdir() if p.is_dir()):
        frames = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        if len(frames) >= 2:
            sequences[folder.name] = sorted(frames, key=lambda p: natural_key(p.name))
    if not sequences:
        raise InputError(f"no sequences with at least 2 frames in {roots[0]}")
    return sequences


def build(src: Path, out: Path, stride: int = 1, copy: bool = False) -> dict[str, int]:
    """Write the ImageFolder into ``out`` (atomically); returns image counts per split."""
    if out.exists():
        raise InputError(f"{out} exists: remove it or choose another output folder")
    sequences = sequence_frames(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    counts = {"classes": len(sequences), "train": 0, "val": 0}
    try:
        for name, frames in sequences.items():
            half = len(frames) // 2
            for split, part in (("train", frames[:half]), ("val", frames[half:])):
                target = tmp / split / name
                target.mkdir(parents=True)
                for frame in part[::stride]:
                    if copy:
                        shutil.copy2(frame, target / frame.name)
                    else:
                        (target / frame.name).symlink_to(frame.resolve())
                    counts[split] += 1
        (tmp / "source.json").write_text(json.dumps({"src": str(src), "stride": stride, **counts}))
        tmp.chmod(0o755)  # mkdtemp creates a private folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="DAVIS root folder.")
    parser.add_argument("--stride", type=int, default=1, help="Keep every N-th frame.")
    parser.add_argument("--copy", action="store_true", help="Copy frames instead of symlinks.")
    args = parser.parse_args()
    counts = build(args.src, args.out, max(1, args.stride), args.copy)
    print(json.dumps({"out": str(args.out), **counts}))


if __name__ == "__main__":
    main()
