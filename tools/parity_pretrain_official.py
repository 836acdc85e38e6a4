"""Side by side: dino-vos pretraining steps against the official ``main_dino.train_one_epoch``.

    python tools/parity_pretrain_official.py --dino-src DIR [--steps 6] [--local-crops 4]

``DIR`` is a checkout of github.com/facebookresearch/dino (or a bare git dir of it, whose HEAD
is extracted to a temp folder); its code is imported from there at run time, never copied. On
CPU, in one process (a gloo group of size 1; the official code's hard-coded CUDA transfers are
patched into no-ops in this tool's process only, dino-vos itself takes a device argument), both
sides start from the same weights (dino-vos's initialisation copied into the official modules),
see the same fixed
crops (2 global 224 px + ``--local-crops`` 96 px, batch 2) and the same schedules, and take
``--steps`` steps. Printed as JSON: per configuration the max abs difference of the student and
teacher parameters after each step, and of the losses. Drop-path is 0 on both sides (the two
implementations draw its random masks differently).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from official_dino import official_source  # tools/official_dino.py (the script's folder)

from dino_vos.distributed import DistInfo
from dino_vos.pretrain.config import resolve_config
from dino_vos.pretrain.train import _Trainer
from dino_vos.synthetic import make_clip

CONFIGS = [
    # name, timm arch, official arch, head overrides, freeze_last_layer epochs
    ("vit_tiny16", "vit_tiny_patch16_224", "vit_tiny", {}, 1),
    ("vit_small16", "vit_small_patch16_224", "vit_small", {"norm_last_layer": False}, 0),
    ("vit_tiny16_bn", "vit_tiny_patch16_224", "vit_tiny", {"use_bn": True}, 0),
]
BATCH = 2
#: AdamW divides each gradient element by its own running scale, so where the gradient is ~0
#: (exactly 0 in theory for the query bias, or a bias before batch norm) float rounding of the
#: gradient becomes a step difference up to the lr. Elements whose official gradient ever fell
#: below this are reported apart.
NOISE_GRADIENT = 1e-6
LR = 5e-4  # per step, whatever the batch (both sides get lr * 256 / batch as base lr)


def _import_official(source: Path) -> SimpleNamespace:
    sys.path.insert(0, str(source))
    import main_dino  # type: ignore[import-not-found]
    import utils  # type: ignore[import-not-found]
    import vision_transformer  # type: ignore[import-not-found]

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code's transfers
    torch.cuda.synchronize = lambda *args, **kwargs: None
    utils.SmoothedValue.synchronize_between_processes = lambda self: None  # uses CUDA tensors
    return SimpleNamespace(main=main_dino, utils=utils, vits=vision_transformer)


def _official_state(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dino-vos wrapper keys -> official keys (weight-norm parametrisation names differ)."""
    renamed = {
        ".parametrizations.weight.original0": ".weight_g",
        ".parametrizations.weight.original1": ".weight_v",
    }
    state = {}
    for key, value in ours.items():
        for old, new in renamed.items():
            key = key.replace(old, new)
        state[key] = value
    return state


def _write_images(folder: Path, count: int) -> None:
    make_clip(count, (40, 40), seed=0).write(folder)
    for mask in (folder / "masks").iterdir():
        mask.unlink()


def _one_config(
    official: SimpleNamespace,
    spec: tuple,
    steps: int,
    local_crops: int,
    scratch: Path,
    dtype: torch.dtype,
) -> dict[str, Any]:
    name, timm_arch, official_arch, head, freeze = spec
    data = scratch / f"data_{name}"
    _write_images(data, steps * BATCH)
    config = resolve_config(
        None,
        overrides={
            "data.paths": [str(data)],
            "student.arch": timm_arch,
            "student.drop_path_rate": 0.0,
            "crops.local_number": local_crops,
            "optim.batch_size_per_gpu": BATCH,
            "optim.base_lr": LR,
            "optim.scaling_rule": "none",
            "optim.epochs": 2,
            "optim.warmup_epochs": 0,
            "optim.freeze_last_layer_epochs": freeze,
            "train.num_workers": 0,
            "train.device": "cpu",
            **{f"head.{k}": v for k, v in head.items()},
        },
    )
    trainer = _Trainer(config, scratch / f"run_{name}", DistInfo(), progress=False)
    assert trainer.iters_per_epoch == steps

    vits = official.vits
    student = official.utils.MultiCropWrapper(
        vits.__dict__[official_arch](patch_size=16, drop_path_rate=0.0),
        vits.DINOHead(vits.__dict__[official_arch]().embed_dim, config.head.out_dim, **head),
    )
    teacher = official.utils.MultiCropWrapper(
        vits.__dict__[official_arch](patch_size=16),
        vits.DINOHead(student.backbone.embed_dim, config.head.out_dim, **head),
    )
    student.load_state_dict(_official_state(trainer.student_module.state_dict()))
    teacher.load_state_dict(student.state_dict())
    for network in (student, teacher, trainer.student_module, trainer.teacher):
        network.to(dtype)
    student = torch.nn.parallel.DistributedDataParallel(student)
    for param in teacher.parameters():
        param.requires_grad = False
    ncrops = 2 + local_crops
    loss_fn = official.main.DINOLoss(
        config.head.out_dim,
        ncrops,
        config.teacher.warmup_temp,
        config.teacher.temp,
        config.teacher.warmup_temp_epochs,
        config.optim.epochs,
    )
    optimizer = torch.optim.AdamW(official.utils.get_params_groups(student))
    utils = official.utils
    lr = utils.cosine_scheduler(
        LR * 256 / BATCH * BATCH / 256,
        config.optim.min_lr,
        config.optim.epochs,
        steps,
        warmup_epochs=0,
    )
    wd = utils.cosine_scheduler(
        config.optim.weight_decay, config.optim.weight_decay_end, config.optim.epochs, steps
    )
    momentum = utils.cosine_scheduler(config.teacher.momentum, 1, config.optim.epochs, steps)
    args = SimpleNamespace(
        epochs=config.optim.epochs, clip_grad=config.optim.clip_grad, freeze_last_layer=freeze
    )

    generator = torch.Generator().manual_seed(1)
    batches = [
        [torch.randn(BATCH, 3, 224, 224, generator=generator, dtype=dtype) for _ in range(2)]
        + [
            torch.randn(BATCH, 3, 96, 96, generator=generator, dtype=dtype)
            for _ in range(local_crops)
        ]
        for _ in range(steps)
    ]
    official_params: list[list[torch.Tensor]] = []
    official_losses: list[float] = []

    class Loader:  # records the networks after each official step (when the next is asked for)
        def __len__(self) -> int:
            return steps

        def __iter__(self):
            for index, crops in enumerate(batches):
                if index:
                    official_params.append(_snapshot(student.module, teacher))
                yield crops, None

    original_forward = loss_fn.forward

    def recording_forward(*a: Any) -> torch.Tensor:
        loss = original_forward(*a)
        official_losses.append(loss.item())
        return loss

    loss_fn.forward = recording_forward  # type: ignore[method-assign]
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines
        official.main.train_one_epoch(
            student, teacher, teacher, loss_fn, Loader(), optimizer, lr, wd, momentum, 0, None, args
        )
    official_params.append(_snapshot(student.module, teacher))

    rows = []
    tiny = [torch.zeros_like(p, dtype=torch.bool) for p in trainer.student_module.parameters()]
    for index, crops in enumerate(batches):
        metrics = trainer._train_step(crops, trainer.schedules.at(index, 0))
        theirs_s, theirs_t, grads = official_params[index]
        student_diff = _diff_list(trainer.student_module, theirs_s)
        tiny = [
            t | ((g.abs() < NOISE_GRADIENT) & (g != 0)) for t, g in zip(tiny, grads, strict=True)
        ]
        conditioned = max(
            (a.detach() - b).abs().where(~t, 0).max().item()
            for a, b, t in zip(trainer.student_module.parameters(), theirs_s, tiny, strict=True)
        )
        teacher_diff = _diff_list(trainer.teacher, theirs_t)
        rows.append(
            {
                "step": index + 1,
                "student_max_abs": student_diff[0],
                "student_worst": student_diff[1],
                "student_max_abs_gradient_above_1e-6": conditioned,
                "student_elements_gradient_below_1e-6": int(sum(int(t.sum()) for t in tiny)),
                "teacher_max_abs": teacher_diff[0],
                "loss_abs": abs(metrics[0] - official_losses[index]),
            }
        )
    return {
        "config": name,
        "dtype": str(dtype),
        "arch": timm_arch,
        "head": head,
        "freeze_last_layer": freeze,
        "local_crops": local_crops,
        "student_elements": sum(p.numel() for p in trainer.student_module.parameters()),
        "batch": BATCH,
        "steps": rows,
    }


def _snapshot(student: torch.nn.Module, teacher: torch.nn.Module) -> list[list[torch.Tensor]]:
    """Student and teacher parameters, and the student's gradients of the step (what AdamW
    saw; zeros where there was none)."""
    return [
        [p.detach().clone() for p in student.parameters()],
        [p.detach().clone() for p in teacher.parameters()],
        [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in student.parameters()],
    ]


def _diff_list(ours: torch.nn.Module, theirs: list[torch.Tensor]) -> tuple[float, str]:
    """Max abs difference over all parameters, and the parameter where it occurs."""
    named = list(ours.named_parameters())
    assert len(named) == len(theirs)
    diffs = [(a.detach() - b).abs().max().item() for (_, a), b in zip(named, theirs, strict=True)]
    worst = int(np.argmax(diffs))
    return float(diffs[worst]), named[worst][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dino-src", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--configs", nargs="*", default=[c[0] for c in CONFIGS])
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="float64 shows what float32 rounding hides (AdamW turns the ~1e-8 gradient noise "
        "of near-zero gradients into parameter differences up to the learning rate)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            official = _import_official(official_source(args.dino_src, Path(tmp)))
            results = []
            for spec in CONFIGS:
                if spec[0] in args.configs:
                    torch.manual_seed(0)
                    np.random.seed(0)
                    results.append(
                        _one_config(
                            official,
                            spec,
                            args.steps,
                            args.local_crops,
                            Path(tmp),
                            getattr(torch, args.dtype),
                        )
                    )
    finally:
        dist.destroy_process_group()
    print(json.dumps({"bench": "parity_pretrain_official", "results": results}, indent=1))


if __name__ == "__main__":
    main()
