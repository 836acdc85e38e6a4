"""Export the teacher of a pretraining run as the shipped fp16 backbone of dino-vos.

    python tools/ship_backbone.py RUN_DIR [--name dino_vos_tiny] [--out dino_vos/weights]

Writes ``<out>/<name>.safetensors`` (fp16, architecture and training facts in the metadata) and
copies the run's resolved config and JSON log next to the model card in ``docs/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from dino_vos.checkpoints import (
    extract_backbone_weights,
    read_checkpoint,
    save_backbone_safetensors,
)

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 12 * 2**20


def training_facts(run_dir: Path, checkpoint: dict) -> dict[str, str]:
    """Steps, epochs, images seen and wall time from the run's log."""
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in steps if entry.get("type") == "step"]
    batch = checkpoint["config"]["optim"]["batch_size_per_gpu"]
    last = steps[-1] if steps else {}
    return {
        "steps": str(checkpoint["step"]),
        "epochs_completed": str(checkpoint["epoch"]),
        "images_seen": str(int(checkpoint["step"]) * int(batch)),
        "wall_minutes": f"{float(last.get('elapsed_s', 0)) / 60:.1f}",
        "data": "DAVIS-2016 train, 240p (30 sequences, 2,079 frames)",
        "recipe": "dino-vos pretrain --preset cpu_tiny",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", default="dino_vos_tiny")
    parser.add_argument("--out", type=Path, default=REPO / "dino_vos" / "weights")
    args = parser.parse_args()
    checkpoint, _ = read_checkpoint(args.run_dir / "checkpoint.pth")
    teacher = extract_backbone_weights(checkpoint, "teacher")
    state, arch = teacher.state, teacher.arch
    facts = training_facts(args.run_dir, checkpoint)
    path = args.out / f"{args.name}.safetensors"
    save_backbone_safetensors(state, path, arch or {}, dtype=torch.float16, extra_metadata=facts)
    if path.stat().st_size > MAX_BYTES:
        raise SystemExit(f"{path} is {path.stat().st_size} bytes, over the 12 MB budget")
    card_dir = REPO / "docs" / args.name
    card_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "log.jsonl"):
        shutil.copy2(args.run_dir / name, card_dir / name)
    print(json.dumps({"weights": str(path), "bytes": path.stat().st_size, **facts}, indent=2))


if __name__ == "__main__":
    main()
