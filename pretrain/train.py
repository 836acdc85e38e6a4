"""The DINO training loop (docs/protocol.md#pretraining), single process or DDP.

Per step: set lr / weight decay from their cosine schedules, teacher forward on the 2 global
crops (no gradients), student forward on all crops, DINO loss (stop on a non-finite value),
backward (fp16 with a grad scaler or bf16 on CUDA, fp32 on CPU), per-tensor gradient clipping,
last-layer gradients dropped during the first epoch(s), AdamW step, EMA teacher update.
Only rank 0 writes (config, JSON-lines log, checkpoints, exported backbones: the teacher at the
end and the initial weights at the start, a random-init baseline of the same architecture).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dino_vos import distributed, errors
from dino_vos.atomic import atomic_write_text
from dino_vos.checkpoints import save_backbone_safetensors
from dino_vos.console import console, progress_bar
from dino_vos.distributed import DistInfo
from dino_vos.errors import DinoVosError, InputError
from dino_vos.pretrain.augment import MultiCropAugmentation
from dino_vos.pretrain.checkpoint import (
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dino_vos.pretrain.config import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    INIT_EXPORT_NAME,
    LOG_NAME,
    TEACHER_EXPORT_NAME,
    PretrainConfig,
    load_config_file,
    save_config,
)
from dino_vos.pretrain.data import (
    EpochSampler,
    MultiCropDataset,
    collate_crops,
    loader_worker_init,
    scan_paths,
)
from dino_vos.pretrain.loss import DINOLoss
from dino_vos.pretrain.model import MultiCropWrapper, build_student_teacher, update_teacher
from dino_vos.pretrain.schedules import cosine_schedule, teacher_temp_schedule
from dino_vos.spec import BackboneSpec


class TrainingDiverged(DinoVosError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """How a run ended and its final networks."""

    run_dir: Path
    epoch: int
    step: int
    stopped: str  # finished, max_steps or time_limit
    student: MultiCropWrapper
    teacher: MultiCropWrapper
    center: torch.Tensor
    last_loss: float | None
    backbone: BackboneSpec | None = None  # the exported teacher (None on ranks other than 0)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups: weights with decay; biases and norm parameters (1-d) without."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model: nn.Module, clip: float) -> None:
    """Rescale each parameter's gradient to L2 norm at most ``clip`` (per tensor)."""
    for param in model.parameters():
        if param.grad is None:
            continue
        norm = param.grad.norm(2)
        param.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """Drop the head's last-layer gradients while ``epoch < freeze_epochs``."""
    if epoch >= freeze_epochs:
        return
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


#: Below this patch size the reference advises ``--use_fp16 false`` (fp16 is unstable there).
FP16_MIN_PATCH = 16


def auto_precision(device: torch.device, patch_size: int) -> str:
    """What ``precision: auto`` means (docs/protocol.md#pretraining): fp32 on CPU; on CUDA fp16
    for patch >= 16, and below that bf16 where the GPU supports it, else fp32."""
    if device.type != "cuda":
        return "fp32"
    if patch_size >= FP16_MIN_PATCH:
        return "fp16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def resolve_precision(
    precision: str, device: torch.device, patch_size: int = FP16_MIN_PATCH
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether to use a grad scaler)."""
    if precision == "auto":
        precision = auto_precision(device, patch_size)
    if precision == "fp16" and device.type != "cuda":
        raise InputError(
            "fp16 training needs a CUDA device: use "
            f"{errors.param('train.precision', 'fp32')} (or bf16)"
        )
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision], (
        precision == "fp16"
    )


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class RunWriter:
    """Everything a run writes (rank 0 only): config, JSON-lines log, checkpoints, export."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / LOG_NAME
        remove_stale_temp_files(run_dir)

    def save_config(self, config: PretrainConfig) -> None:
        save_config(config, self.run_dir / CONFIG_NAME)

    def log(self, record: dict[str, Any]) -> None:
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def trim_log(self, step: int) -> None:
        """Drop records after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.log_path.is_file():
            return
        lines = self.log_path.read_text().splitlines()
        kept = [line for line in lines if _record_step(line) <= step]
        atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))

    def checkpoint(self, content: dict[str, Any], keep_name: str | None = None) -> None:
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, content)
        if keep_name is not None:
            save_checkpoint(self.run_dir / keep_name, content)

    def export_backbone(
        self, network: MultiCropWrapper, arch: dict[str, Any], name: str
    ) -> BackboneSpec:
        """Save ``network``'s backbone as dino-vos safetensors; returns the spec that loads it
        (what ``--weights FILE`` gives every command)."""
        path = self.run_dir / name
        save_backbone_safetensors(network.backbone.state_dict(), path, arch)
        return BackboneSpec(weights=str(path))


def _record_step(line: str) -> float:
    """The step of a log line (a torn or empty line sorts last, so trimming drops it)."""
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError):
        return math.inf


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _build_loader(
    config: PretrainConfig, info: DistInfo
) -> tuple[DataLoader, EpochSampler, dict[str, int]]:
    scan = scan_paths(config.data.paths, config.data.video_stride)
    dataset = MultiCropDataset(scan.samples, MultiCropAugmentation.from_config(config.crops))
    sampler = EpochSampler(dataset, info.world_size, info.rank, config.train.seed)
    workers = config.train.num_workers
    loader = DataLoader(
        dataset,
        batch_size=config.optim.batch_size_per_gpu,
        sampler=sampler,
        num_workers=workers,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        collate_fn=collate_crops,
        worker_init_fn=loader_worker_init,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    counts = {
        "samples": len(dataset),
        "images": scan.images,
        "videos": scan.videos,
        "unreadable_videos": scan.unreadable_videos,
    }
    return loader, sampler, counts


class _Schedules:
    """Per-iteration lr / wd / momentum and per-epoch teacher temperature."""

    def __init__(self, config: PretrainConfig, iters_per_epoch: int, world_size: int) -> None:
        optim, teacher = config.optim, config.teacher
        epochs = optim.epochs
        self.lr = cosine_schedule(
            config.lr(world_size), optim.min_lr, epochs, iters_per_epoch, optim.warmup_epochs
        )
        self.wd = cosine_schedule(
            optim.weight_decay, optim.weight_decay_end, epochs, iters_per_epoch
        )
        self.momentum = cosine_schedule(
            teacher.momentum, teacher.final_momentum, epochs, iters_per_epoch
        )
        self.teacher_temp = teacher_temp_schedule(
            teacher.warmup_temp, teacher.temp, teacher.warmup_temp_epochs, epochs
        )

    def at(self, it: int, epoch: int) -> dict[str, float]:
        it = min(it, len(self.lr) - 1)
        return {
            "lr": float(self.lr[it]),
            "wd": float(self.wd[it]),
            "momentum": float(self.momentum[it]),
            "teacher_temp": float(self.teacher_temp[min(epoch, len(self.teacher_temp) - 1)]),
        }


class _Interval:
    """Metric sums between two log lines."""

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.start, self.steps, self.images = now, 0, 0
        self.sums = np.zeros(3)

    def add(self, metrics: Iterable[float], images: int) -> None:
        self.sums += np.asarray(list(metrics))
        self.steps += 1
        self.images += images

    def summary(self, now: float) -> dict[str, float]:
        loss, entropy, kl = (self.sums / max(self.steps, 1)).tolist()
        rate = self.images / max(now - self.start, 1e-9)
        return {"loss": loss, "entropy": entropy, "kl": kl, "images_per_s": rate}


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run was started with (config.yaml, else the checkpoint's copy); None
    when ``run_dir`` holds no checkpoint."""
    if not (run_dir / CHECKPOINT_NAME).is_file():
        return None
    if (run_dir / CONFIG_NAME).is_file():
        return load_config_file(run_dir / CONFIG_NAME)
    return load_checkpoint(run_dir / CHECKPOINT_NAME)["config"]


def train(
    config: PretrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Run (or, with ``resume``, continue) DINO pretraining into ``run_dir``."""
    config.validate()
    info = distributed.init_distributed(config.train.device)
    try:
        return _Trainer(config, Path(run_dir), info, progress).run(resume)
    finally:
        distributed.cleanup(info)


class _Trainer:
    def __init__(
        self, config: PretrainConfig, run_dir: Path, info: DistInfo, progress: bool
    ) -> None:
        self.config, self.run_dir, self.info = config, run_dir, info
        self.device = info.device
        self.show_progress = progress and info.is_main
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        # Same seed on every rank for the initial weights; per-rank seeds afterwards.
        _seed_everything(config.train.seed)
        self.loader, self.sampler, self.counts = _build_loader(config, info)
        self.iters_per_epoch = len(self.sampler) // config.optim.batch_size_per_gpu
        if self.iters_per_epoch == 0:
            raise InputError(
                f"{self.counts['samples']} training images cannot fill one batch of "
                f"{config.optim.batch_size_per_gpu} per process on {info.world_size} "
                f"process(es): lower {errors.param('optim.batch_size_per_gpu')} or add data"
            )
        student, teacher = build_student_teacher(config)
        vit: Any = student.backbone
        patch = int(vit.patch_embed.patch_size[0])
        self.autocast_dtype, use_scaler = resolve_precision(
            config.train.precision, self.device, patch
        )
        if use_scaler and patch < FP16_MIN_PATCH and info.is_main:
            console.print(
                f"note: fp16 with patch {patch}: the reference advises against fp16 below patch "
                f"{FP16_MIN_PATCH} (unstable); "
                f"{errors.render(errors.param('train.precision', 'auto'))} picks bf16 or fp32 there"
            )
        if info.world_size > 1 and self.device.type == "cuda" and has_batchnorms(student):
            # As main_dino.py: batch norm over the global batch (SyncBatchNorm is CUDA-only, so
            # CPU processes keep per-process statistics).
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        self.student_module = student.to(self.device)
        # The teacher stays in training mode like the reference's (it has no dropout or
        # drop-path; a batch-norm head uses batch statistics, docs/protocol.md#pretraining).
        self.teacher = teacher.to(self.device)
        self.student: nn.Module = self.student_module
        if info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = DistributedDataParallel(self.student_module, device_ids=ids)
        self.teacher.load_state_dict(self.student_module.state_dict())
        self.optimizer = torch.optim.AdamW(param_groups(self.student_module))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.loss_fn = DINOLoss(
            config.head.out_dim,
            num_crops=2 + config.crops.local_number,
            student_temp=config.loss.student_temp,
            center_momentum=config.loss.center_momentum,
        ).to(self.device)
        self.schedules = _Schedules(config, self.iters_per_epoch, info.world_size)
        self.writer = RunWriter(run_dir) if info.is_main else None
        self.epoch, self.epoch_step, self.step = 0, 0, 0
        _seed_everything(config.train.seed + info.rank)

    # -- checkpoints ----------------------------------------------------------------------------
    def _content(self) -> dict[str, Any]:
        return {
            "arch": self.config.arch(),
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "center": self.loss_fn.center.detach().cpu(),
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "step": self.step,
            "iters_per_epoch": self.iters_per_epoch,
            "rng": distributed.all_gather_objects(rng_state()),
            "config": self.config.to_dict(),
        }

    def save(self, keep_epoch: bool = False) -> None:
        """Checkpoint (a collective call: every rank contributes its RNG state)."""
        content = self._content()
        if self.writer is not None:
            freq = self.config.train.saveckp_freq
            keep = keep_epoch and freq > 0 and self.epoch % freq == 0
            keep_name = f"checkpoint_epoch{self.epoch:04d}.pth" if keep else None
            self.writer.checkpoint(content, keep_name)

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state["arch"] != self.config.arch():
            raise InputError(
                f"checkpoint {path} holds architecture {state['arch']}, but the config asks for "
                f"{self.config.arch()}: resume with the run's own config"
            )
        try:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(
                f"checkpoint {path} does not fit this config ({str(exc).splitlines()[0][:160]}): "
                "resume with the run's own config"
            ) from exc
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.center.copy_(state["center"].to(self.device))
        self.epoch, self.epoch_step, self.step = state["epoch"], state["epoch_step"], state["step"]
        if state["iters_per_epoch"] != self.iters_per_epoch:
            self._note(
                f"steps per epoch changed ({state['iters_per_epoch']} -> {self.iters_per_epoch}): "
                "resuming at the start of the next epoch"
            )
            self.epoch, self.epoch_step = self.epoch + int(self.epoch_step > 0), 0
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            _seed_everything(self.config.train.seed + self.step * 1000 + self.info.rank)

    def _note(self, text: str) -> None:
        if self.info.is_main:
            console.print(text)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, resume: bool) -> TrainResult:
        checkpoint = self.run_dir / CHECKPOINT_NAME
        if checkpoint.is_file():
            if not resume:
                raise InputError(
                    f"{self.run_dir} already holds a run ({CHECKPOINT_NAME}): pass "
                    f"{errors.param('resume', True)} to continue it, or choose another "
                    f"{errors.param('out_dir')}"
                )
            self.restore(checkpoint)
            self._note(f"Resuming from {checkpoint} (epoch {self.epoch}, step {self.step})")
        elif resume:
            self._note(f"No checkpoint in {self.run_dir}: starting a new run")
        if self.writer is not None:
            self.writer.save_config(self.config)
            self.writer.trim_log(self.step)
            self.writer.log(self._start_record())
            if self.step == 0:  # the random-init baseline of exactly this run
                self.writer.export_backbone(self.teacher, self.config.arch(), INIT_EXPORT_NAME)
        self._announce()
        return self._loop()

    def _start_record(self) -> dict[str, Any]:
        return {
            "type": "start",
            "step": self.step,
            "epoch": self.epoch,
            "out_dim": self.config.head.out_dim,
            "world_size": self.info.world_size,
            "global_batch": self.config.optim.batch_size_per_gpu * self.info.world_size,
            "iters_per_epoch": self.iters_per_epoch,
            "device": str(self.device),
            **self.counts,
        }

    def _announce(self) -> None:
        counts, config = self.counts, self.config
        global_batch = config.optim.batch_size_per_gpu * self.info.world_size
        unreadable = counts["unreadable_videos"]
        self._note(
            f"DINO pretraining ({config.preset}): {counts['samples']} training images "
            f"({counts['images']} image files, {counts['videos']} videos"
            f"{f', {unreadable} unreadable videos skipped' if unreadable else ''}), "
            f"global batch {global_batch}, {self.iters_per_epoch} steps/epoch x "
            f"{config.optim.epochs} epochs, peak lr {config.lr(self.info.world_size):.3g}, "
            f"{self.info.world_size} process(es) on {self.device}"
        )

    def _train_step(self, crops: list[torch.Tensor], values: dict[str, float]) -> list[float]:
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if index == 0:
                group["weight_decay"] = values["wd"]
        crops = [c.to(self.device, non_blocking=True) for c in crops]
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with autocast:
            with torch.no_grad():
                teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
            loss, stats = self.loss_fn(student_output, teacher_output, values["teacher_temp"])
        stacked = torch.stack([loss.detach(), stats.entropy, stats.kl])
        metrics: list[float] = (distributed.all_reduce_sum(stacked) / self.info.world_size).tolist()
        if not math.isfinite(metrics[0]):
            raise TrainingDiverged(
                f"loss is {metrics[0]} at step {self.step + 1} (epoch {self.epoch}): training "
                f"stopped; the last good checkpoint stays in {self.run_dir}; lower "
                f"{errors.param('optim.base_lr')} or use {errors.param('train.precision', 'fp32')}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.config.optim.clip_grad
        freeze = self.config.optim.freeze_last_layer_epochs
        self.scaler.scale(loss).backward()
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.student_module, clip)
        cancel_last_layer_gradients(self.student_module, self.epoch, freeze)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        update_teacher(self.student_module, self.teacher, values["momentum"])
        return metrics

    def _log_step(self, interval: _Interval, values: dict[str, float], skipped: int) -> None:
        now = time.perf_counter()
        record = {"type": "step", "step": self.step, "epoch": self.epoch}
        record.update(interval.summary(now))
        record.update(values)
        record.update(skipped=skipped, elapsed_s=round(now - self.t0, 3))
        interval.reset(now)
        if self.writer is not None:
            self.writer.log(record)

    def _total_steps(self) -> int:
        total = self.config.optim.epochs * self.iters_per_epoch
        if self.config.train.max_steps is not None:
            total = min(total, self.config.train.max_steps)
        return total

    def _count_unreadable(self, bad: int, skipped: int) -> int:
        """Add this step's unreadable files (summed over ranks) to ``skipped`` and say so."""
        newly = int(distributed.all_reduce_sum(torch.tensor(bad)).item())
        if newly:
            skipped += newly
            self._note(
                f"skipped {newly} unreadable file{'s' * (newly != 1)} at step "
                f"{self.step} ({skipped} so far; the count is in the log)"
            )
        return skipped

    def _loop(self) -> TrainResult:
        config, per_epoch = self.config, self.iters_per_epoch
        epochs, batch = config.optim.epochs, config.optim.batch_size_per_gpu
        total = self._total_steps()
        global_batch = batch * self.info.world_size
        self.t0 = time.perf_counter()
        interval, epoch_sums = _Interval(), _Interval()
        skipped, last_loss, stopped = 0, None, ""
        values: dict[str, float] = {}
        context = progress_bar("images") if self.show_progress else nullcontext()
        with context as bar:
            task = None
            if bar is not None:
                task = bar.add_task("DINO", total=max(total - self.step, 0) * global_batch)
            while self.epoch < epochs and not stopped:
                self.sampler.set_epoch(self.epoch, start=self.epoch_step * batch)
                for crops, bad in self.loader:
                    values = self.schedules.at(self.epoch * per_epoch + self.epoch_step, self.epoch)
                    metrics = self._train_step(crops, values)
                    skipped = self._count_unreadable(bad, skipped)
                    self.step += 1
                    self.epoch_step += 1
                    last_loss = metrics[0]
                    interval.add(metrics, global_batch)
                    epoch_sums.add(metrics, global_batch)
                    if bar is not None and task is not None:
                        description = f"epoch {self.epoch} loss {last_loss:.3f}"
                        bar.update(task, advance=global_batch, description=description)
                    if self.step % config.train.log_every == 0:
                        self._log_step(interval, values, skipped)
                    stopped = self._stop_reason(total)
                    if stopped:
                        break
                    if config.train.save_every and self.step % config.train.save_every == 0:
                        self.save()
                if interval.steps and (stopped or self.epoch_step >= per_epoch):
                    self._log_step(interval, values, skipped)
                if self.epoch_step >= per_epoch:
                    self._end_epoch(epoch_sums)
        if stopped or self.epoch_step > 0 or self.step == 0:
            self.save()  # end-of-epoch checkpoints are already written
        stopped = stopped or "finished"
        exported = self._finish(stopped)
        return TrainResult(
            self.run_dir,
            self.epoch,
            self.step,
            stopped,
            self.student_module,
            self.teacher,
            self.loss_fn.center.detach().clone(),
            last_loss,
            exported,
        )

    def _stop_reason(self, total: int) -> str:
        """'' to go on, else why the run stops early."""
        limit = self.config.train.max_minutes
        if limit is not None and time.perf_counter() - self.t0 > limit * 60:
            return "time_limit"
        if self.step >= total and total < self.config.optim.epochs * self.iters_per_epoch:
            return "max_steps"
        return ""

    def _end_epoch(self, epoch_sums: _Interval) -> None:
        summary = epoch_sums.summary(time.perf_counter()) if epoch_sums.steps else {}
        epoch_sums.reset(time.perf_counter())
        done = self.epoch
        self.epoch, self.epoch_step = self.epoch + 1, 0
        self.save(keep_epoch=True)
        if self.writer is not None and summary:
            self.writer.log({"type": "epoch", "step": self.step, "epoch": done, **summary})

    def _finish(self, stopped: str) -> BackboneSpec | None:
        if self.writer is None:
            return None
        exported = self.writer.export_backbone(
            self.teacher, self.config.arch(), TEACHER_EXPORT_NAME
        )
        self.writer.log(
            {
                "type": "end",
                "step": self.step,
                "epoch": self.epoch,
                "stopped": stopped,
                "elapsed_s": round(time.perf_counter() - self.t0, 3),
            }
        )
        console.print(
            f"Stopped ({stopped}) at epoch {self.epoch}, step {self.step}; checkpoint "
            f"{self.run_dir / CHECKPOINT_NAME}; teacher backbone: "
            f"{errors.render(errors.param('weights', exported.weights))}"
        )
        return exported
