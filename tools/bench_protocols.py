"""The named protocols (docs/protocol.md#protocols) measured with ``eval davis``.

    python tools/bench_protocols.py --out /tmp/protocols [--max-frames 30] \\
        [--backbones dino_vos_tiny,dinov3_vits16:random] [--short-side 240] [--workers 1]

Runs ``dino-vos eval davis --davis-root ../shared/data/davis2016-val-dev --split val
--short-side S --protocol P`` once per (backbone, protocol). The two protocols preprocess frames
differently (frame size rule, bicubic, std), so each run computes its own features. Prints a
JSON list: backbone, protocol, short side, network input size of a DAVIS frame, J&F / J / F and
seconds per frame. Development numbers (10 of the 20 val sequences), not comparable to
published DAVIS-2017 results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_DEV = SHARED / "davis2016-val-dev"
PROTOCOLS = ("dino", "dinov3")


def backbone_args(backbone: str) -> list[str]:
    """``name`` or ``name:random`` (random init, seed 0) as ``eval davis`` options."""
    name, _, mode = backbone.partition(":")
    return ["--backbone", name, *(["--random-init"] if mode == "random" else [])]


def run(out: Path, backbone: str, protocol: str, args: argparse.Namespace) -> dict:
    """One ``eval davis`` run; its row of the table."""
    run_dir = out / backbone.replace(":", "-") / f"{protocol}-{args.short_side}"
    command = [
        sys.executable, "-m", "dino_vos", "eval", "davis", "--davis-root", str(VAL_DEV),
        "--split", "val", "--out", str(run_dir), "--short-side", str(args.short_side),
        "--protocol", protocol, "--workers", str(args.workers), *backbone_args(backbone),
        *(["--max-frames", str(args.max_frames)] if args.max_frames else []),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    payload = json.loads((run_dir / "davis_results-val.json").read_text())
    scores, timing, settings = payload["global"], payload["timing"], payload["settings"]
    return {
        "backbone": backbone,
        "protocol": protocol,
        "short_side": args.short_side,
        "resize": settings["resize"],
        "propagation": settings["propagation"],
        "J&F": round(scores["J&F-Mean"], 4),
        "J": round(scores["J-Mean"], 4),
        "F": round(scores["F-Mean"], 4),
        "seconds_per_frame": timing["seconds_per_frame"],
        "max_frames": args.max_frames,
        "command": " ".join(command[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder of the runs.")
    parser.add_argument("--backbones", default="dino_vos_tiny", help="Comma-separated.")
    parser.add_argument("--short-side", type=int, default=240)
    parser.add_argument("--max-frames", type=int, default=None, help="Per sequence.")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if not VAL_DEV.is_dir():
        sys.exit(f"DAVIS val-dev not found at {VAL_DEV} (see ../shared/data/README.md)")
    rows = [
        run(args.out, backbone, protocol, args)
        for backbone in args.backbones.split(",")
        for protocol in PROTOCOLS
    ]
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
