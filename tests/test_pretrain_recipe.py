"""DINO recipe pieces against hand-computed cases: schedules, loss, centering, EMA, head, crops."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import PRETRAIN_TINY_OVERRIDES

from dino_vos import sources
from dino_vos.errors import InputError
from dino_vos.pretrain.augment import MultiCropAugmentation
from dino_vos.pretrain.checkpoint import rng_state, set_rng_state
from dino_vos.pretrain.config import (
    PRETRAIN_PRESETS,
    PretrainConfig,
    parse_assignment,
    resolve_config,
    save_config,
)
from dino_vos.pretrain.data import EpochSampler, MultiCropDataset, Sample, collate_crops, scan_paths
from dino_vos.pretrain.loss import DINOLoss
from dino_vos.pretrain.model import (
    DINOHead,
    MultiCropWrapper,
    build_student_teacher,
    update_teacher,
)
from dino_vos.pretrain.schedules import cosine_schedule, teacher_temp_schedule
from dino_vos.pretrain.train import cancel_last_layer_gradients, clip_gradients, param_groups
from dino_vos.synthetic import make_clip

TINY = PRETRAIN_TINY_OVERRIDES


# -- schedules ------------------------------------------------------------------------------------
def test_cosine_schedule_warmup_then_cosine():
    values = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=2, warmup_epochs=1)
    # warm-up linspace(0, 1, 2) = [0, 1]; cosine over 2 iterations: 1, 0.5 * (1 + cos(pi/2)).
    np.testing.assert_allclose(values, [0.0, 1.0, 1.0, 0.5])
    momentum = cosine_schedule(0.996, 1.0, epochs=1, iters_per_epoch=4)
    expected = [1 - 0.004 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(momentum, expected)


def test_teacher_temperature_warmup_is_linear_per_epoch():
    temps = teacher_temp_schedule(0.04, 0.07, warmup_epochs=3, epochs=5)
    np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 2), [0.04, 0.04])


# -- loss and centering ---------------------------------------------------------------------------
def test_dino_loss_hand_computed_pairs_entropy_and_kl():
    loss_fn = DINOLoss(out_dim=2, num_crops=3, student_temp=0.1)
    teacher = torch.zeros(2, 2)  # 2 global crops x batch 1 -> uniform teacher
    student = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.1 * math.log(3), 0.0]])  # crop 3: (3/4, 1/4)
    loss, stats = loss_fn(student, teacher, teacher_temp=0.04)
    # Pairs (t0,s1) (t0,s2) (t1,s0) (t1,s2): CE = ln2, ln(16/3)/2, ln2, ln(16/3)/2.
    expected = (math.log(2) + 0.5 * math.log(16 / 3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.entropy.item() == pytest.approx(math.log(2), rel=1e-6)
    assert stats.kl.item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-5)


def test_center_is_subtracted_before_sharpening_and_updated_after():
    loss_fn = DINOLoss(out_dim=2, num_crops=2, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0]]))
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # equal to the center -> uniform teacher
    _, stats = loss_fn(torch.zeros(2, 2), teacher, teacher_temp=0.04)
    assert stats.entropy.item() == pytest.approx(math.log(2), rel=1e-6)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.0, 0.0]]))  # 0.9 c + 0.1 * mean
    loss_fn.center.zero_()
    loss_fn(torch.zeros(2, 2), torch.tensor([[1.0, 3.0], [3.0, 5.0]]), teacher_temp=0.04)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.2, 0.4]]))
    # A sharp teacher (temperature 0.04) on logits (0, 0.1): softmax((0, 0.1) / 0.04).
    loss_fn.center.zero_()
    _, stats = loss_fn(torch.zeros(2, 2), torch.tensor([[0.0, 0.1]] * 2), teacher_temp=0.04)
    p = torch.softmax(torch.tensor([0.0, 2.5]), 0)
    assert stats.entropy.item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)


# -- EMA, head, optimiser helpers -----------------------------------------------------------------
def test_ema_update_hand_computed_and_gradient_free():
    student = torch.nn.Linear(2, 2)
    teacher = torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(0.0)
        for p in teacher.parameters():
            p.fill_(1.0)
    teacher.requires_grad_(False)
    student(torch.ones(1, 2)).sum().backward()
    update_teacher(student, teacher, momentum=0.9)
    for p in teacher.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.9))
        assert p.grad is None and p.grad_fn is None


def test_student_teacher_start_equal_and_only_student_drops_paths():
    config = resolve_config("cpu_tiny", assignments=[*TINY, "student.kwargs.depth=2"])
    student, teacher = build_student_teacher(config)
    assert set(student.state_dict()) == set(teacher.state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in student.state_dict())
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, teacher.state_dict()[key])
    assert not any(p.requires_grad for p in teacher.parameters())
    # Stochastic depth rises linearly to drop_path_rate on the last block (student only).
    assert student.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(teacher.backbone.blocks[-1].drop_path1, torch.nn.Identity)


def test_head_last_layer_norm_frozen_at_one():
    torch.manual_seed(0)
    head = DINOHead(8, 16, norm_last_layer=True, hidden_dim=12, bottleneck_dim=4)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(16))
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 16) and out.abs().max() <= 1 + 1e-5  # cosine similarities
    free = DINOHead(8, 16, norm_last_layer=False, hidden_dim=12, bottleneck_dim=4)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_groups_sizes_in_order():
    calls = []

    class Backbone(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Backbone(), torch.nn.Identity())
    crops = [torch.ones(2, 3, 8, 8), torch.ones(2, 3, 8, 8) * 2, torch.zeros(2, 3, 4, 4)]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (2, 3, 4, 4)]
    assert out[:, 0].tolist() == [1, 1, 2, 2, 0, 0]


def test_param_groups_no_decay_on_biases_and_norms():
    config = resolve_config("cpu_tiny", assignments=TINY)
    student, _ = build_student_teacher(config)
    decay, no_decay = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0
    assert "backbone.norm.weight" in no_decay_names and "backbone.blocks.0.attn.qkv.bias" in (
        no_decay_names
    )
    assert all(p.ndim > 1 for p in decay["params"])
    frozen = "head.last_layer.parametrizations.weight.original0"
    assert frozen not in no_decay_names | {names[id(p)] for p in decay["params"]}


def test_per_tensor_clipping_and_last_layer_freeze():
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(2))
    model.last_layer = torch.nn.Parameter(torch.zeros(1))
    model.a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to 3
    model.last_layer.grad = torch.tensor([1.0])  # norm 1 -> unchanged
    clip_gradients(model, 3.0)
    torch.testing.assert_close(model.a.grad, torch.tensor([1.8, 2.4]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.last_layer.grad, torch.tensor([1.0]))
    cancel_last_layer_gradients(model, epoch=1, freeze_epochs=1)
    assert model.last_layer.grad is not None
    cancel_last_layer_gradients(model, epoch=0, freeze_epochs=1)
    assert model.last_layer.grad is None and model.a.grad is not None


# -- crops (their statistics: tests/test_pretrain_augment.py) -------------------------------------
def test_multicrop_sizes_counts_and_dtype():
    aug = MultiCropAugmentation(global_size=40, local_size=16, local_number=5)
    image = make_clip(1, (60, 90), seed=0).frames[0]
    torch.manual_seed(0)
    crops = aug(image)
    assert len(crops) == aug.num_crops == 7
    assert [tuple(c.shape) for c in crops] == [(3, 40, 40)] * 2 + [(3, 16, 16)] * 5
    assert all(c.dtype == torch.float32 and type(c) is torch.Tensor for c in crops)


# -- data -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> Path:
    """Images two levels deep, a video, a corrupt image and a corrupt video."""
    root = tmp_path_factory.mktemp("mixed")
    clip = make_clip(4, (48, 64), seed=2)
    (root / "videos").mkdir()
    clip.write(root / "seq", video=root / "videos" / "clip.mp4")
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "videos" / "broken.mp4").write_bytes(b"\x00" * 64)
    (root / "notes.txt").write_text("ignored")
    return root


def test_scan_recursive_images_videos_and_unreadable(mixed_data):
    scan = scan_paths([mixed_data], video_stride=2)
    assert scan.images == 9  # 4 frames + 4 masks + the corrupt jpg (found, fails on read)
    assert scan.videos == 1 and scan.unreadable_videos == 1
    video = [s for s in scan.samples if s.frame >= 0]
    assert [s.frame for s in video] == [0, 2]
    with pytest.raises(InputError, match="no images or videos"):
        scan_paths([mixed_data / "videos" / "broken.mp4"])
    with pytest.raises(InputError, match="not found"):
        scan_paths([mixed_data / "missing"])


def test_dataset_skips_unreadable_files_and_counts_them(mixed_data):
    scan = scan_paths([mixed_data])
    broken = next(i for i, s in enumerate(scan.samples) if s.path.endswith("broken.jpg"))
    dataset = MultiCropDataset(scan.samples, MultiCropAugmentation(32, 16, 1))
    crops, skipped = dataset[(broken, 7)]
    assert skipped == 1 and [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)]
    video_index = next(i for i, s in enumerate(scan.samples) if s.frame == 3)
    crops_a, skipped = dataset[(video_index, 7)]
    crops_b, _ = dataset[(video_index, 7)]
    assert skipped == 0
    for a, b in zip(crops_a, crops_b, strict=True):  # same seed, same crops
        torch.testing.assert_close(a, b)
    batch, total_skipped = collate_crops([dataset[(broken, 1)], dataset[(broken + 1, 2)]])
    assert total_skipped == 1 and [tuple(b.shape[:2]) for b in batch] == [(2, 3)] * 3
    bad = MultiCropDataset([Sample(str(mixed_data / "deep" / "er" / "broken.jpg"))], lambda x: x)
    with pytest.raises(InputError, match="could not be decoded"):
        bad[(0, 0)]


@pytest.mark.parametrize("backend", ["decord", "opencv"])
def test_video_frames_decode_with_either_backend(mixed_data, monkeypatch, backend):
    """Pretraining reads videos through the decoder of propagation, OpenCV fallback included."""
    if backend == "decord":
        pytest.importorskip("decord")
    monkeypatch.setattr(sources, "video_backend", lambda: backend)
    video = mixed_data / "videos" / "clip.mp4"
    scan = scan_paths([video])
    assert scan.videos == 1 and [s.frame for s in scan.samples] == [0, 1, 2, 3]
    dataset = MultiCropDataset(scan.samples, lambda image: image)
    capture = cv2.VideoCapture(str(video))  # independent: read the file front to back
    for sample in scan.samples:
        ok, bgr = capture.read()
        assert ok
        decoded = dataset.load(sample)
        assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
        difference = np.abs(decoded.astype(int) - cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        assert difference.mean() < 2  # decord and OpenCV round YUV->RGB slightly differently
    capture.release()
    expected = {"decord": sources.DecordVideoSource, "opencv": sources.OpenCVVideoSource}
    assert type(dataset._video(str(video))) is expected[backend]


def test_sampler_shards_per_epoch_and_resumes_mid_epoch():
    dataset = list(range(10))
    ranks = [EpochSampler(dataset, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(0)
    first = [list(s) for s in ranks]
    assert sorted(i for part in first for i, _ in part) == list(range(10))
    assert len({seed for part in first for _, seed in part}) == 10
    ranks[0].set_epoch(1)
    assert [i for i, _ in ranks[0]] != [i for i, _ in first[0]]
    ranks[0].set_epoch(0, start=2)
    assert list(ranks[0]) == first[0][2:] and len(ranks[0]) == 3


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(2), random.random())
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(2), expected[1])
    assert random.random() == expected[2]


# -- config ---------------------------------------------------------------------------------------
def test_presets_and_lr_scaling():
    tiny = resolve_config("cpu_tiny")
    assert tiny.arch() == {
        "model": "vit_tiny_patch16_224",
        "kwargs": {"patch_size": 8, "img_size": 96, "depth": 6},
    }
    assert (tiny.crops.global_size, tiny.crops.local_size, tiny.crops.local_number) == (96, 48, 4)
    assert (tiny.head.out_dim, tiny.teacher.temp, tiny.teacher.warmup_temp) == (1024, 0.04, 0.04)
    assert (tiny.teacher.momentum, tiny.optim.batch_size_per_gpu) == (0.99, 32)
    assert tiny.lr(world_size=1) == pytest.approx(2e-4)
    small = resolve_config("vit_small_p8")
    assert small.student.arch == "vit_small_patch8_224" and small.crops.local_number == 10
    assert small.lr(world_size=16) == pytest.approx(0.0005 * 64 * 16 / 256)
    assert (small.teacher.warmup_temp, small.teacher.temp) == (0.04, 0.07)
    assert resolve_config("vit_base_p8").student.arch == "vit_base_patch8_224"
    assert set(PRETRAIN_PRESETS) == {"cpu_tiny", "vit_small_p8", "vit_base_p8"}


def test_overrides_files_and_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: 7\ncrops:\n  local_number: 3\n")
    config = resolve_config(
        "cpu_tiny",
        tmp_path / "c.yaml",
        overrides={"optim.batch_size_per_gpu": 8, "train.max_steps": None},
        assignments=["optim.base_lr=1e-3", "student.kwargs.depth=2", "crops.local_scale=[0.1,0.3]"],
    )
    assert (config.optim.epochs, config.crops.local_number, config.optim.batch_size_per_gpu) == (
        7,
        3,
        8,
    )
    assert config.optim.base_lr == 1e-3 and config.student.kwargs["depth"] == 2
    assert config.crops.local_scale == [0.1, 0.3]
    save_config(config, tmp_path / "run" / "config.yaml")
    save_config(config, tmp_path / "run" / "config.json")
    for name in ("config.yaml", "config.json"):
        again = resolve_config(config_file=tmp_path / "run" / name)
        assert again.to_dict() == config.to_dict()
    assert PretrainConfig.from_dict(config.to_dict()) == config
    assert parse_assignment("train.max_minutes=55") == ("train.max_minutes", 55)
    with pytest.raises(InputError, match="unknown config key 'optim.lrr'"):
        resolve_config("cpu_tiny", assignments=["optim.lrr=1"])
    with pytest.raises(InputError, match="expects"):
        resolve_config("cpu_tiny", assignments=["optim.epochs=many"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        resolve_config("cpu_tiny", assignments=["optim.epochs"])
    with pytest.raises(InputError, match="unknown preset"):
        resolve_config("vit_huge")
    with pytest.raises(InputError, match="teacher temps"):
        resolve_config("cpu_tiny", assignments=["teacher.temp=0"])


# -- distributed environment ----------------------------------------------------------------------
def test_slurm_variables_become_torch_distributed_env(monkeypatch):
    from dino_vos import distributed

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    # A private copy of the environment: whatever the code sets disappears after the test.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    monkeypatch.setenv("SLURM_PROCID", "11")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setattr(distributed, "_slurm_master_addr", lambda: "gpu01")
    assert distributed._env_from_slurm()
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    assert env == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu01"}
    assert os.environ["MASTER_PORT"] == str(distributed.DEFAULT_PORT + 4242)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a single task is a plain single-process run
    assert not distributed._env_from_slurm()
