"""``torchrun --nproc_per_node 2`` on CPU (gloo): a few DINO steps with DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dino_vos.synthetic import make_clip

REPO_ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from dino_vos import distributed
    from dino_vos.pretrain import train as train_module
    from dino_vos.pretrain.config import resolve_config
    from dino_vos.pretrain.loss import DINOLoss

    run_dir, data, result_path = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    writers = []
    original_init = train_module.RunWriter.__init__

    def counting_init(self, *args, **kwargs):
        writers.append(info.rank)
        original_init(self, *args, **kwargs)

    train_module.RunWriter.__init__ = counting_init
    config = resolve_config(
        "cpu_tiny",
        assignments=[
            "student.kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3, img_size: 32}",
            "crops.global_size=32", "crops.local_size=16", "crops.local_number=2",
            "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
            "optim.batch_size_per_gpu=2", "optim.epochs=2", "optim.warmup_epochs=1",
            "train.num_workers=0", "train.log_every=1", "train.save_every=2",
            f"data.paths=[{data}]",
        ],
    )
    result = train_module.train(config, run_dir, progress=False)
    flat = lambda module: torch.cat([v.flatten().float() for v in module.state_dict().values()])
    probe = DINOLoss(out_dim=2, num_crops=2, center_momentum=0.9)
    probe.update_center(torch.tensor([[float(info.rank), 0.0]]))  # global mean: (0.5, 0)
    gathered = distributed.all_gather_objects(
        {
            "rank": info.rank,
            "world": dist.get_world_size(),
            "teacher": flat(result.teacher),
            "student": flat(result.student),
            "center": result.center,
            "probe_center": probe.center,
            "writers": writers,
            "step": result.step,
        }
    )
    if info.rank == 0:
        torch.save(gathered, result_path)
    dist.destroy_process_group()
    """
)


def test_torchrun_two_cpu_processes(tmp_path):
    data = tmp_path / "data"
    make_clip(12, (56, 72), seed=4).write(data)
    for mask in (data / "masks").iterdir():
        mask.unlink()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_dir, result_path = tmp_path / "run", tmp_path / "ranks.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(script), str(run_dir), str(data), str(result_path)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = torch.load(result_path, weights_only=True)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world"] == 2
    assert ranks[0]["step"] == ranks[1]["step"] == 6  # 12 images / (2 ranks x 2) x 2 epochs
    for key in ("teacher", "student", "center"):
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs across ranks"
    for rank in ranks:  # the center is the EMA of the mean over *all* ranks
        torch.testing.assert_close(rank["probe_center"], torch.tensor([[0.05, 0.0]]))
    assert [r["writers"] for r in ranks] == [[0], []]  # rank 0 alone writes

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert records[0]["world_size"] == 2 and records[0]["global_batch"] == 4
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pth",
        "config.yaml",
        "init_backbone.safetensors",
        "log.jsonl",
        "teacher_backbone.safetensors",
    ]
    ckpt = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["step"] == 6
    saved = torch.cat([v.flatten().float() for v in ckpt["teacher"].values()])
    assert torch.equal(saved, ranks[0]["teacher"])
