"""A few tiny DINO training steps: checkpoints, exact resume, atomic writes, CLI, plot."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import PRETRAIN_TINY_OVERRIDES

from dino_vos.backbones import load_backbone
from dino_vos.cli import main
from dino_vos.pretrain import loss as loss_module
from dino_vos.pretrain.checkpoint import load_checkpoint, save_checkpoint
from dino_vos.pretrain.config import CHECKPOINT_NAME, resolve_config
from dino_vos.pretrain.train import TrainingDiverged, train
from dino_vos.spec import BackboneSpec
from dino_vos.synthetic import make_clip

REPO_ROOT = Path(__file__).resolve().parents[1]

# cpu_tiny shrunk for tests: 1 block of 48-d, crops 32/16 px, batch 4, 12 images -> 3 steps/epoch.
TINY = [
    *PRETRAIN_TINY_OVERRIDES,
    "optim.batch_size_per_gpu=4",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "train.num_workers=0",
    "train.log_every=1",
    "train.save_every=0",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 generated frames in nested folders (no masks: only training images)."""
    root = tmp_path_factory.mktemp("images")
    clip = make_clip(12, (56, 72), num_objects=2, seed=5)
    frames, _ = clip.write(root / "video_a")
    for mask in (root / "video_a" / "masks").iterdir():
        mask.unlink()
    (root / "video_a" / "masks").rmdir()
    nested = root / "deeper" / "level"
    nested.mkdir(parents=True)
    for frame in sorted(frames.iterdir())[8:]:
        frame.rename(nested / frame.name)
    return root


def tiny_config(data: Path, *extra: str):
    return resolve_config("cpu_tiny", assignments=[*TINY, f"data.paths=[{data}]", *extra])


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "step"}


def test_tiny_run_checkpoint_log_and_backbone_loading(images, tmp_path):
    result = train(tiny_config(images), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.stopped == "finished" and result.step == 6 and result.epoch == 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    keys = {"loss", "lr", "wd", "momentum", "teacher_temp", "entropy", "kl", "images_per_s"}
    assert all(keys <= set(r) and all(math.isfinite(r[k]) for k in keys) for r in steps)
    assert all(0 < r["entropy"] < math.log(64) + 1e-4 and r["kl"] >= -1e-4 for r in steps)
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [0, 1]
    start = records[0]
    assert start["type"] == "start" and start["samples"] == 12 and start["out_dim"] == 64
    assert resolve_config(config_file=run / "config.yaml").to_dict() == result_config(run)

    ckpt = torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "dino-vos-pretrain" and ckpt["version"] == 1
    assert ckpt["arch"] == tiny_config(images).arch()
    assert {"optimizer", "scaler", "center", "rng", "config"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6) and ckpt["center"].shape == (1, 64)
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert set(ckpt["teacher"]) == set(ckpt["student"])

    for key, network in (("teacher", result.teacher), ("student", result.student)):
        backbone = load_backbone(weights=run / CHECKPOINT_NAME, checkpoint_key=key)
        expected = network.backbone.state_dict()
        assert set(backbone.vit.state_dict()) == set(expected)
        for name, value in backbone.vit.state_dict().items():
            torch.testing.assert_close(value, expected[name])
        assert backbone.patch_size == 8 and backbone(torch.zeros(1, 3, 48, 64)).shape == (
            1,
            6,
            8,
            48,
        )
    exported = load_backbone(str(run / "teacher_backbone.safetensors"))
    torch.testing.assert_close(exported.vit.cls_token, result.teacher.backbone.cls_token)
    assert result.backbone == BackboneSpec(weights=str(run / "teacher_backbone.safetensors"))
    built = result.backbone.build_backbone()  # what --weights gives every command
    for name, value in result.teacher.backbone.state_dict().items():
        torch.testing.assert_close(built.vit.state_dict()[name], value)
    initial = load_backbone(str(run / "init_backbone.safetensors"))  # random-init baseline
    assert initial.vit.patch_embed.proj.weight.shape == (48, 3, 8, 8)
    assert not torch.equal(
        initial.vit.blocks[0].mlp.fc1.weight, exported.vit.blocks[0].mlp.fc1.weight
    )
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())


def result_config(run: Path) -> dict:
    return load_checkpoint(run / CHECKPOINT_NAME)["config"]


def test_resume_reproduces_the_uninterrupted_run(images, tmp_path):
    deep = "student.kwargs.depth=2"  # a second block, so drop-path draws random numbers
    full = train(tiny_config(images, deep), tmp_path / "full", progress=False)
    reference = step_losses(tmp_path / "full")
    # Stop after 2 steps (mid-epoch, last layer still frozen), then resume to the end.
    first = train(
        tiny_config(images, deep, "train.max_steps=2"), tmp_path / "split", progress=False
    )
    assert first.stopped == "max_steps" and first.step == 2
    assert load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["step"] == 2
    resumed = train(tiny_config(images, deep), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 6
    assert step_losses(tmp_path / "split") == reference  # steps 3..6 equal, log not duplicated
    for name, value in full.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[name], value, rtol=0, atol=0)
    torch.testing.assert_close(resumed.center, full.center, rtol=0, atol=0)


def test_unreadable_training_files_are_reported_on_the_console(images, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    train(tiny_config(data, "train.max_steps=3"), tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file at step" in err
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert max(r.get("skipped", 0) for r in records) == 1


def test_existing_run_needs_resume(images, tmp_path):
    train(tiny_config(images, "train.max_steps=1"), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="already holds a run"):
        train(tiny_config(images), tmp_path / "run", progress=False)


def test_failed_write_never_replaces_the_last_good_checkpoint(images, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(images, "train.max_steps=1"), run, progress=False)
    path = run / CHECKPOINT_NAME
    good = path.read_bytes()
    content = load_checkpoint(path)

    def half_then_fail(obj, target, *args, **kwargs):
        Path(target).write_bytes(good[: len(good) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {**content, "step": 99})
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_process_killed_mid_write_keeps_the_last_good_checkpoint(images, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(images, "train.max_steps=1"), run, progress=False)
    path = run / CHECKPOINT_NAME
    good = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from pathlib import Path
        from dino_vos.pretrain.checkpoint import load_checkpoint, save_checkpoint
        path = Path({str(path)!r})
        content = load_checkpoint(path)
        def torn(obj, target, *args, **kwargs):
            Path(target).write_bytes(path.read_bytes()[:1000])
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = torn
        save_checkpoint(path, {{**content, "step": 99}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert path.read_bytes() == good
    leftovers = [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1000
    result = train(tiny_config(images, "train.max_steps=2"), run, resume=True, progress=False)
    assert result.step == 2 and not any(p.name.endswith(".tmp") for p in run.iterdir())


def test_non_finite_loss_stops_and_names_the_step(images, tmp_path, monkeypatch):
    original = loss_module.DINOLoss.forward
    calls = {"n": 0}

    def poisoned(self, student_output, teacher_output, teacher_temp):
        calls["n"] += 1
        loss, stats = original(self, student_output, teacher_output, teacher_temp)
        return (loss * math.nan if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(loss_module.DINOLoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3 \(epoch 0\)"):
        train(tiny_config(images, "train.save_every=2"), tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 2


def test_cli_run_resume_errors_and_plot(images, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    base = ["pretrain", "--preset", "cpu_tiny", "--data", str(images), "--out", str(run), *sets]
    result = runner.invoke(main, [*base, "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pth").is_file() and (run / "config.yaml").is_file()
    again = runner.invoke(main, [*base, "--max-steps", "3"])
    assert again.exit_code == 2 and "pass --resume" in again.output
    resumed = runner.invoke(main, [*base, "--resume", "--max-steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(run / "checkpoint.pth")["step"] == 3
    assert sorted(step_losses(run)) == [1, 2, 3]
    bad = runner.invoke(main, [*base[:-2], "--out", str(tmp_path / "x"), "--set", "optim.lrr=1"])
    assert bad.exit_code == 2 and "unknown config key 'optim.lrr'" in bad.output
    assert not (tmp_path / "x").exists()
    missing = runner.invoke(
        main, ["pretrain", "--preset", "cpu_tiny", "--out", str(tmp_path / "y")]
    )
    assert missing.exit_code == 2 and "--data" in missing.output
    plotted = runner.invoke(
        main, ["pretrain", "plot", str(run / "log.jsonl"), "--out", str(tmp_path / "c.png")]
    )
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    wrong = runner.invoke(main, ["pretrain", "plot", str(tmp_path / "nope.jsonl")])
    assert wrong.exit_code == 2 and "log file not found" in wrong.output
