"""Training speed of a pretraining preset here (default cpu_tiny): images/s as JSON.

    python tools/bench_pretrain.py [--data DIR] [--steps 20] [--warmup 3] [--set KEY=VALUE ...]

Uses ``../shared/data/davis2016-train-240p`` frames when present, else generated 240p images.
The first ``--warmup`` steps (loader start-up, allocator warm-up) are not timed. The machine's
load matters: on 2 shared cores, other jobs can halve the number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from dino_vos.pretrain.config import resolve_config
from dino_vos.pretrain.train import LOG_NAME, train
from dino_vos.synthetic import make_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
DAVIS_TRAIN = REPO_ROOT.parent / "shared" / "data" / "davis2016-train-240p" / "JPEGImages" / "240p"


def _generated_images(folder: Path, count: int = 96) -> Path:
    for index in range(0, count, 24):
        make_clip(24, (240, 427), seed=index).write(folder / f"clip{index}")
    for mask_dir in folder.glob("*/masks"):
        for mask in mask_dir.iterdir():
            mask.unlink()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu_tiny")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--set", dest="assignments", action="append", default=[])
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = DAVIS_TRAIN if DAVIS_TRAIN.is_dir() else _generated_images(Path(tmp) / "data")
        overrides = {
            "data.paths": [str(data)],
            "train.max_steps": args.steps,
            "train.log_every": 1,
            "train.save_every": 0,
            "train.num_workers": args.num_workers,
        }
        config = resolve_config(args.preset, overrides=overrides, assignments=args.assignments)
        result = train(config, Path(tmp) / "run", progress=False)
        lines = (Path(tmp) / "run" / LOG_NAME).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    per_epoch = next(r["iters_per_epoch"] for r in records if r["type"] == "start")
    steps = [r for r in records if r["type"] == "step"]
    timed = steps[args.warmup :]
    seconds = timed[-1]["elapsed_s"] - steps[args.warmup - 1]["elapsed_s"]
    batch = config.optim.batch_size_per_gpu
    report = {
        "bench": "pretrain",
        "preset": args.preset,
        "data": str(data),
        "arch": config.arch(),
        "crops": [config.crops.global_size, config.crops.local_size, config.crops.local_number],
        "batch": batch,
        "steps_timed": len(timed),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(timed) * batch / seconds, 2),
        "seconds_per_step": round(seconds / len(timed), 3),
        "num_workers": config.train.num_workers,
        "torch_threads": torch.get_num_threads(),
        # Epochs of this data that fit a 55-minute run at this speed (for --epochs).
        "epochs_in_55_min": int(55 * 60 * len(timed) * batch / seconds // (per_epoch * batch)),
        "loss_first": round(steps[0]["loss"], 4),
        "loss_last": round(result.last_loss or float("nan"), 4),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
