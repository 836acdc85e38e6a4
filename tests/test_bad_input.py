"""Bad input that used to misbehave: one ``Error:`` line and exit code 2, before torch loads.

Unmatched ``--masks`` files, unbounded size options, short sides that are not a multiple of
the patch, failures in the frame decoding thread, a full disk while pretraining, click's own
usage errors, and input checks that waited for torch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import PRETRAIN_TINY_OVERRIDES

from dino_vos import limits
from dino_vos.cli import main
from dino_vos.errors import InputError
from dino_vos.features import BackboneFeatures, FrameError, embed_frames, prefetched
from dino_vos.masks import read_keyframes
from dino_vos.sources import MemorySource, open_source
from dino_vos.spec import BackboneSpec, ResizeSpec, resized_frame_size, round_to_patch


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Relative paths of the commands (``--out o``) land in the test's folder."""
    monkeypatch.chdir(tmp_path)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def the_one_line(result, *parts: str) -> str:
    """The whole output is one ``Error:`` line holding every part; exit code 2."""
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def propagate(clip_dir: Path, out: Path, weights: Path, *extra: object):
    return invoke(
        "propagate", clip_dir / "frames", "--out", out, "--weights", weights,
        "--short-side", 64, "--device", "cpu", *extra,
    )  # fmt: skip


# --masks DIR ------------------------------------------------------------------------------


@pytest.mark.parametrize(("stray", "nearest"), [("0003", "00003.png"), ("99999", "00005.png")])
def test_masks_folder_refuses_a_file_named_like_no_frame(
    clip_dir, tiny_weights, tmp_path, stray, nearest
):
    masks = tmp_path / "annotations"
    masks.mkdir()
    shutil.copy(clip_dir / "masks" / "00000.png", masks / "00000.png")
    shutil.copy(clip_dir / "masks" / "00003.png", masks / f"{stray}.png")
    result = propagate(clip_dir, tmp_path / "o", tiny_weights, "--masks", masks)
    the_one_line(result, f"{stray}.png is named like no frame", nearest, "rename it")
    assert not (tmp_path / "o").exists()


def test_masks_after_a_max_frames_cut_are_skipped_not_refused(clip_dir):
    source = open_source(clip_dir / "frames", limit=3)
    keyframes = read_keyframes(source, masks_dir=clip_dir / "masks", limited=True)
    assert sorted(keyframes) == [0, 1, 2]
    with pytest.raises(InputError, match="00003.png is named like no frame"):
        read_keyframes(source, masks_dir=clip_dir / "masks")


# Size options -----------------------------------------------------------------------------

OVERSIZED = [
    (["propagate", "in", "--mask", "m.png", "--out", "o"], "--short-side", "100000", "4096"),
    (["propagate", "in", "--mask", "m.png", "--out", "o"], "--shift-ensemble", "1000", "16"),
    (["propagate", "in", "--mask", "m.png", "--out", "o"], "--batch-size", "100000", "256"),
    (["attention", "in", "--out", "o"], "--short-side", "100000", "4096"),
    (["features", "in", "--out", "o"], "--batch-size", "100000", "256"),
    (["demo", "--out", "o"], "--short-side", "100000", "4096"),
    (["eval", "davis", "--davis-root", "d", "--out", "o"], "--short-side", "100000", "4096"),
    (["eval", "davis", "--davis-root", "d", "--out", "o"], "--shift-ensemble", "1000", "16"),
    (["eval", "davis", "--davis-root", "d", "--out", "o"], "--workers", "100000", "256"),
    (["eval", "youtube-vos", "--root", "r", "--out", "o"], "--batch-size", "100000", "256"),
    (["eval", "knn", "--train", "t", "--val", "v", "--out", "o"], "--image-size", "100000", "4096"),
    (["eval", "linear", "--train", "t", "--val", "v", "--out", "o"], "--batch-size", "10**9", ""),
    (
        ["eval", "transfer", "--train", "t", "--val", "v", "--out", "o"],
        "--decode-workers",
        "9999",
        "256",
    ),
    (["pretrain", "--preset", "cpu_tiny", "--out", "o"], "--batch-size", "1000000000", "8192"),
]


@pytest.mark.parametrize(("command", "option", "value", "bound"), OVERSIZED)
def test_size_options_have_a_documented_maximum(command, option, value, bound):
    value = str(10**9) if value == "10**9" else value
    the_one_line(invoke(*command, option, value), f"'{option}'", f"<={bound}")


def test_pretraining_config_sizes_have_a_maximum_too(clip_dir):
    for key, value in (("crops.global_size", 10**5), ("optim.batch_size_per_gpu", 10**9)):
        base = ["pretrain", "--preset", "cpu_tiny", "--data", clip_dir / "frames", "--out", "o"]
        result = invoke(*base, "--set", f"{key}={value}")
        the_one_line(result, "invalid pretraining config", key.split(".")[0], "--set")
        assert not Path("o").exists()


def test_a_setting_beyond_this_machines_memory_is_refused_before_the_model_loads(
    clip_dir, tiny_weights, tmp_path, monkeypatch
):
    monkeypatch.setattr(limits, "machine_memory", lambda: 2**19)  # a 0.5 MiB machine
    mask = clip_dir / "masks" / "00000.png"
    result = propagate(clip_dir, tmp_path / "o", tiny_weights, "--mask", mask)
    the_one_line(result, "network input of 64x64 px", "this machine has 0.5 MiB", "--short-side")
    assert not (tmp_path / "o").exists()
    result = invoke("eval", "davis", "--davis-root", clip_dir, "--out", tmp_path / "d")
    the_one_line(result, "network input of 832x480 px (from 854x480 frames")
    result = invoke("eval", "knn", "--train", clip_dir, "--val", clip_dir, "--out", tmp_path / "k")
    the_one_line(result, "--image-size 224 with --batch-size 64", "lower --image-size")


# Short sides that are not a multiple of the patch ----------------------------------------


def test_the_resize_rules_round_every_side_to_the_patch():
    assert round_to_patch(180, 8) == 176 and round_to_patch(180, 8, "up") == 184
    assert round_to_patch(180, 16, "nearest") == 176 and round_to_patch(3, 8, "down") == 8
    assert resized_frame_size(180, 320, 180) == (176, 320)  # short side rounded down
    assert resized_frame_size(480, 854, 480, "reference", 14) == (476, 826)
    assert resized_frame_size(480, 854) == (480, 832)  # the reference protocol is unchanged
    assert ResizeSpec(480).patch_note(8) is None
    assert "using 176 (rounded down" in (ResizeSpec(180).patch_note(8) or "")


def test_short_side_off_the_patch_grid_is_rounded_and_said_first(clip_dir, tiny_weights, tmp_path):
    mask = clip_dir / "masks" / "00000.png"
    result = propagate(clip_dir, tmp_path / "o", tiny_weights, "--mask", mask, "--short-side", 60)
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith("Note: --short-side 60 is not a multiple of the patch size 8: using 56")
    assert len(list((tmp_path / "o").glob("*.png"))) == 6


# The frame decoding thread ----------------------------------------------------------------


def decoding_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dino-vos-decoder" and t.is_alive()]


def test_a_failed_forward_stops_the_decoding_thread_at_once():
    features = BackboneSpec(
        "dino_vos_tiny", random_init=True, device="cpu", resize=ResizeSpec(64)
    ).build()

    def broken_forward(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("forward failed")

    features.embed = broken_forward  # type: ignore[method-assign]
    frames = np.zeros((30, 72, 104, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="forward failed") as failure:
        for _ in embed_frames(features, MemorySource(list(frames))):
            pass
    # the traceback still holds the generators (as an uncaught error's does until the process
    # exits): the thread must not wait for their collection
    assert failure.traceback and decoding_threads() == []


def test_any_exception_in_the_decoding_thread_ends_the_run_in_one_line(
    clip_dir, tiny_weights, tmp_path, monkeypatch
):
    def broken_preprocess(self, image: np.ndarray) -> torch.Tensor:
        raise RuntimeError("cv::resize: insufficient memory")

    monkeypatch.setattr(BackboneFeatures, "preprocess", broken_preprocess)
    mask = clip_dir / "masks" / "00000.png"
    result = propagate(clip_dir, tmp_path / "o", tiny_weights, "--mask", mask)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [
        "Error: cannot prepare frame 00000: RuntimeError: cv::resize: insufficient memory "
        "(out of memory: lower --short-side or --batch-size)"
    ]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    assert decoding_threads() == []
    with pytest.raises(FrameError, match="decoding thread failed: ZeroDivisionError"):
        list(prefetched(1 // (3 - i) for i in range(5)))


# A full disk while pretraining --------------------------------------------------------------


def test_pretrain_on_a_full_disk_says_so_in_one_line(clip_dir, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from dino_vos import checkpoints

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os "
                              "error 28)")  # fmt: skip

    monkeypatch.setattr(checkpoints, "save_file", full_disk)
    run = tmp_path / "run"
    sets = [arg for item in PRETRAIN_TINY_OVERRIDES for arg in ("--set", item)]
    result = invoke(
        "pretrain", "--preset", "cpu_tiny", "--data", clip_dir / "frames", "--out", run,
        "--max-steps", 1, "--batch-size", 2, "--num-workers", 0, *sets,
    )  # fmt: skip
    line = the_one_line(result, "No space left on device", str(run))
    assert "SafetensorError" not in line
    assert [p.name for p in run.rglob("*") if p.name.endswith(".tmp")] == []


def test_atomic_writers_report_a_real_write_failure_as_an_os_error(tmp_path):
    """The writers under a file-size limit (EFBIG, as a full disk gives ENOSPC)."""
    code = f"""
    import resource, signal, torch
    from pathlib import Path
    from dino_vos.checkpoints import atomic_torch_save, save_backbone_safetensors
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    out = Path({str(tmp_path)!r})
    for write in (save_backbone_safetensors, atomic_torch_save):
        try:
            if write is atomic_torch_save:
                write({{"a": torch.zeros(100_000)}}, out / "c.pth")
            else:
                write({{"a": torch.zeros(100_000)}}, out / "b.safetensors", {{}})
        except OSError as exc:
            print(type(exc).__name__, Path(exc.filename).name)
    print(sorted(p.name for p in out.iterdir()))
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert run.stdout.splitlines() == ["OSError b.safetensors", "OSError c.pth", "[]"], run.stderr


# click's usage errors ----------------------------------------------------------------------

USAGE_ERRORS = [
    (["propagate", "in", "--out", "o", "--temperature", "nan"], "'--temperature'", "x>0"),
    (["propagate", "in", "--out", "o", "--temperature", "warm"], "'--temperature'", "x>0"),
    (["propagate", "in", "--out", "o", "--topk", "0"], "'--topk'", "x>=1"),
    (["propagate", "in", "--out", "o", "--topk", "a"], "'--topk'", "x>=1"),
    (["propagate", "in", "--out", "o", "--radius", "-1"], "'--radius'", ">= 0"),
    (["propagate", "in", "--out", "o", "--context", "-2"], "'--context'", "x>=0"),
    (["propagate", "in", "--out", "o", "--preset", "fast"], "'--preset'", "'dino'"),
    (["propagate", "in", "--mask", "m.png"], "'--out'", "--help"),
    (["propagate", "--frob"], "--frob", "propagate --help'"),
    (["frob"], "'frob'", " --help'"),
    (["attention", "in", "--out", "o", "--threshold", "2"], "'--threshold'", "x<=1"),
    (["features", "in", "--out", "o", "--layers", "x"], "'--layers'", "integers"),
    (["demo", "--clip-style", "neon"], "'--clip-style'", "'grass'"),
    (["eval", "davis", "--davis-root", "d", "--out", "o", "--sweep", "topk=a"], "--sweep", "x>=1"),
    (["eval", "davis", "--davis-root", "d", "--keyframes", "every:0"], "--keyframes", "N >= 1"),
    (["eval", "davis", "--davis-root", "d", "--max-frames", "2"], "'--max-frames'", "x>=3"),
    (["eval", "youtube-vos", "--root", "r", "--out", "o", "--topk", "0"], "'--topk'", "x>=1"),
    (["eval", "knn", "--train", "t", "--val", "v", "--out", "o", "--k", "0"], "'--k'", "x>=1"),
    (["eval", "linear", "--train", "t", "--val", "v", "--out", "o", "--lr", "0"], "'--lr'", "x>0"),
    (
        ["eval", "transfer", "--train", "t", "--val", "v", "--out", "o", "--layer-decay", "2"],
        "'--layer-decay'",
        "0<x<=1",
    ),  # fmt: skip
    (["eval", "frob"], "'frob'", "eval --help'"),
    (["pretrain", "--out", "o", "--epochs", "0"], "'--epochs'", "x>=1"),
    (["pretrain", "--out", "o", "--max-minutes", "inf"], "'--max-minutes'", "x>0"),
    (["pretrain", "plot"], "'LOG'", "--help"),
]


@pytest.mark.parametrize(("args", "option", "valid"), USAGE_ERRORS)
def test_usage_errors_are_one_line_naming_the_option_and_what_it_accepts(args, option, valid):
    the_one_line(invoke(*args), option, valid)


def test_help_still_shows_usage():
    for args in (["--help"], ["propagate", "--help"], ["eval", "knn", "-h"], ["pretrain", "-h"]):
        result = invoke(*args)
        assert result.exit_code == 0 and result.output.startswith("Usage: "), result.output
    assert "8<=x<=4096" in invoke("propagate", "--help").output  # the documented maximum


# Input checks before torch ----------------------------------------------------------------

MISSING_INPUTS = [
    (["eval", "davis", "--davis-root", "nope", "--out", "o"], "DAVIS root not found: nope"),
    (["eval", "youtube-vos", "--root", "nope", "--out", "o"], "nope/JPEGImages not found"),
    (["eval", "knn", "--train", "nope", "--val", "v", "--out", "o"], "train folder not found"),
    (["eval", "linear", "--train", "t", "--val", "v", "--out", "o"], "train folder not found"),
    (["eval", "transfer", "--train", "t", "--val", "v", "--out", "o"], "train folder not found"),
    (["demo", "--video", "nope.mp4", "--mask", "m.png", "--out", "o"], "input not found"),
    (["pretrain", "--preset", "cpu_tiny", "--data", "nope", "--out", "o"], "data path not found"),
]


def test_input_errors_of_every_command_come_before_torch(tmp_path):
    code = f"""
    import sys
    from click.testing import CliRunner
    from dino_vos.cli import main
    for args in {[args for args, _ in MISSING_INPUTS]!r}:
        result = CliRunner().invoke(main, args)
        print(result.exit_code, "torch" in sys.modules, result.output.strip())
    """
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    lines = run.stdout.splitlines()
    assert len(lines) == len(MISSING_INPUTS), run.stderr
    for line, (args, message) in zip(lines, MISSING_INPUTS, strict=True):
        assert line.startswith("2 False Error: ") and message in line, (args, line)
    assert not (tmp_path / "o").exists()
