"""Start-up cost of the command line: how long until ``dino-vos`` answers.

    python tools/bench_startup.py [--repeats 5]

Times (median wall seconds over fresh processes) ``dino-vos --help``, ``dino-vos propagate
--help``, the missing-input error of every command that reads inputs (propagate, demo, eval
davis|youtube-vos|knn, pretrain) and ``python -c "import torch, timm"`` for comparison, and
prints JSON with the ratio of each command to the torch import.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall_seconds(command: list[str], repeats: int, expect: int = 0) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode != expect:
            raise SystemExit(f"{command} exited {result.returncode}: {result.stderr[-300:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cli = shutil.which("dino-vos") or str(Path(sys.executable).parent / "dino-vos")
    with tempfile.TemporaryDirectory() as tmp:
        nope, out = f"{tmp}/nope", f"{tmp}/out"
        missing = {
            "propagate": ["propagate", f"{nope}.mp4", "--mask", f"{tmp}/x.png", "--out", out],
            "demo": ["demo", "--video", f"{nope}.mp4", "--mask", f"{tmp}/x.png", "--out", out],
            "eval davis": ["eval", "davis", "--davis-root", nope, "--out", out],
            "eval youtube-vos": ["eval", "youtube-vos", "--root", nope, "--out", out],
            "eval knn": ["eval", "knn", "--train", nope, "--val", nope, "--out", out],
            "pretrain": ["pretrain", "--preset", "cpu_tiny", "--data", nope, "--out", out],
        }
        rows = {
            "dino-vos --help": wall_seconds([cli, "--help"], args.repeats),
            "dino-vos propagate --help": wall_seconds([cli, "propagate", "--help"], args.repeats),
            **{
                f"missing input error: {name}": wall_seconds([cli, *command], args.repeats, 2)
                for name, command in missing.items()
            },
            "import torch, timm": wall_seconds(
                [sys.executable, "-c", "import torch, timm"], args.repeats
            ),
        }
    torch_seconds = rows["import torch, timm"]
    report = {
        "repeats": args.repeats,
        "seconds": {name: round(value, 3) for name, value in rows.items()},
        "ratio_to_torch_import": {
            name: round(value / torch_seconds, 3)
            for name, value in rows.items()
            if name != "import torch, timm"
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
