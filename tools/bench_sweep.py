"""Benchmark of ``dino-vos eval davis --sweep`` on the 10 ``davis2016-val-dev`` sequences.

Runs one sweep (default: the shipped ``dino_vos_tiny`` at 240 short side, the grid
``topk=5,10 context=7,20 temperature=0.1,0.07``, 8 settings) in a subprocess with a fresh output
folder, and prints one JSON object: the command, wall time, load average, every setting's J&F and
seconds (sorted by J&F), and the first (feature-computing) setting's seconds against the others.

    python tools/bench_sweep.py [--out DIR] [--sweep topk=5,10 ...] > bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "davis2016-val-dev"
DEFAULT_GRID = ["topk=5,10", "context=7,20", "temperature=0.1,0.07"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--davis-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--out", type=Path, default=None, help="Sweep folder [default: a temp].")
    parser.add_argument("--backbone", default="dino_vos_tiny")
    parser.add_argument("--short-side", type=int, default=240)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sweep", nargs="+", default=DEFAULT_GRID)
    args = parser.parse_args()
    if not (args.davis_root / "JPEGImages").is_dir():
        print(f"skipped: DAVIS data not found at {args.davis_root}", file=sys.stderr)
        return 0
    temporary = args.out is None
    out = Path(tempfile.mkdtemp(prefix="bench-sweep-")) / "sweep" if temporary else args.out
    command = [
        sys.executable, "-m", "dino_vos", "eval", "davis",
        "--davis-root", str(args.davis_root), "--out", str(out),
        "--backbone", args.backbone, "--short-side", str(args.short_side),
        "--device", args.device, "--sweep", *args.sweep,
    ]  # fmt: skip
    load_before = os.getloadavg()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
        return result.returncode
    report = json.loads((out / "sweep.json").read_text())
    rows = report["rows"]
    first, others = rows[0], rows[1:]
    print(
        json.dumps(
            {
                "command": " ".join(["dino-vos", *command[3:]]),
                "wall_seconds": round(wall, 1),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                "cpu_count": os.cpu_count(),
                "frames_computed": sum(row["cache_misses"] for row in rows),
                # meaningful for a fresh --out: the first setting computes the features
                "first_setting": {
                    "tag": first["tag"],
                    "seconds": first["seconds"],
                    "status": first["status"],
                },
                "other_settings_mean_seconds": round(
                    sum(row["seconds"] for row in others) / max(1, len(others)), 2
                ),
                "influence": report["influence"],
                "heatmap": report["heatmap"],
                "table": [
                    {
                        key: row[key]
                        for key in ("tag", "J&F-Mean", "J-Mean", "F-Mean", "seconds", "status")
                    }
                    for row in sorted(rows, key=lambda r: -r["J&F-Mean"])
                ],
            },
            indent=2,
        )
    )
    if temporary:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
