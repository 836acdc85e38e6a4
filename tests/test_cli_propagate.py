"""End-to-end `dino-vos propagate` on generated clips, bad inputs and real data."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA, requires_shared_data
from PIL import Image

from dino_vos.cli import main
from dino_vos.masks import davis_palette, encode_indexed_png, read_mask
from dino_vos.writers import MANIFEST_NAME, STAGING_NAME


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _propagate_args(source, mask, out, weights, *extra):
    return [
        "propagate",
        source,
        "--mask",
        mask,
        "--out",
        out,
        "--weights",
        weights,
        "--short-side",
        "64",
        "--device",
        "cpu",
        *extra,
    ]


def test_propagate_folder_end_to_end(clip_dir, tiny_weights, tmp_path):
    out = tmp_path / "out"
    overlay = tmp_path / "overlay.mp4"
    result = run(
        *_propagate_args(
            clip_dir / "frames",
            clip_dir / "masks" / "00000.png",
            out,
            tiny_weights,
            "--overlay",
            overlay,
            "--save-probs",
            "npz",
        )
    )
    assert result.exit_code == 0, result.output
    assert "Wrote 6 masks (2 objects)" in result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:05d}.png" for i in range(6)]
    for name in names:
        with Image.open(out / name) as image:
            assert image.mode == "P"
            palette = np.array(image.getpalette()[: 256 * 3]).reshape(-1, 3)
            assert np.array_equal(palette, davis_palette())
            assert set(np.unique(np.array(image)).tolist()) <= {0, 3, 7}
            assert image.size == (104, 72)
    assert np.array_equal(read_mask(out / "00000.png"), read_mask(clip_dir / "masks/00000.png"))
    assert (out / MANIFEST_NAME).is_file() and not (out / STAGING_NAME).exists()
    probs = np.load(out / "probs" / "00001.npz")
    assert probs["probs"].shape[0] == 3 and probs["object_ids"].tolist() == [0, 3, 7]
    capture = cv2.VideoCapture(str(overlay))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 6


def test_propagate_video_file_names_frames_by_index(clip_dir, tiny_weights, tmp_path):
    out = tmp_path / "video_out"
    result = run(
        *_propagate_args(
            clip_dir / "clip.mp4",
            clip_dir / "masks" / "00000.png",
            out,
            tiny_weights,
            "--save-probs",
            "safetensors",
            "--max-frames",
            "4",
        )
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    assert (out / "probs" / "00003.safetensors").is_file()


def _assert_clean_failure(result, out, message):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.glob("*.png")) if out.exists() else True


def test_bad_inputs_exit_2_with_one_clear_line(clip_dir, tiny_weights, tmp_path):
    frames, mask, out = clip_dir / "frames", clip_dir / "masks" / "00000.png", tmp_path / "o"
    cases = []
    cases.append((_propagate_args(tmp_path / "nope", mask, out, tiny_weights), "input not found"))
    (tmp_path / "empty").mkdir()
    cases.append((_propagate_args(tmp_path / "empty", mask, out, tiny_weights), "no image frames"))
    small_mask = tmp_path / "small.png"
    small_mask.write_bytes(encode_indexed_png(np.zeros((10, 20), np.uint8)))
    cases.append((_propagate_args(frames, small_mask, out, tiny_weights), "20x10"))
    cases.append(
        (_propagate_args(frames, tmp_path / "no.png", out, tiny_weights), "mask not found")
    )
    broken_video = tmp_path / "broken.mp4"
    broken_video.write_bytes(b"\x00" * 2048)
    cases.append((_propagate_args(broken_video, mask, out, tiny_weights), "cannot decode video"))
    for args, message in cases:  # bad inputs are found before a model is loaded
        result = run(*args)
        _assert_clean_failure(result, out, message)
        assert "Backbone:" not in result.output
    bad_ckpt = tmp_path / "bad.pth"
    bad_ckpt.write_bytes(b"garbage")
    unknown = ["propagate", frames, "--mask", mask, "--out", out, "--backbone", "vit_nonexistent"]
    model_cases = [
        (_propagate_args(frames, mask, out, bad_ckpt), "is not a PyTorch checkpoint"),
        (unknown, "unknown backbone"),
    ]
    for args, message in model_cases:
        _assert_clean_failure(run(*args), out, message)


def test_failure_mid_run_leaves_nothing_that_looks_finished(clip_dir, tiny_weights, tmp_path):
    frames = tmp_path / "frames"
    shutil.copytree(clip_dir / "frames", frames)
    (frames / "00004.jpg").write_bytes(b"truncated")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    result = run(
        *_propagate_args(
            frames,
            clip_dir / "masks" / "00000.png",
            out,
            tiny_weights,
            "--overlay",
            tmp_path / "o.mp4",
            "--overwrite",  # the folder holds a user's file: allowed, and it is kept
        )
    )
    _assert_clean_failure(result, out, "00004.jpg")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o.mp4").exists()


@requires_shared_data("videos", "paragliding-launch.mp4")
@pytest.mark.realdata
def test_real_video_and_its_frames_give_the_same_masks(tiny_weights, tmp_path):
    video = SHARED_DATA / "videos" / "paragliding-launch.mp4"
    folder = SHARED_DATA / "davis2016-val-dev" / "JPEGImages" / "480p" / "paragliding-launch"
    mask = SHARED_DATA / "davis2016-val-dev" / "Annotations" / "480p" / "paragliding-launch"
    outputs = {}
    for label, source in (("video", video), ("frames", folder)):
        outputs[label] = tmp_path / label
        result = run(
            "propagate",
            source,
            "--mask",
            mask / "00000.png",
            "--out",
            outputs[label],
            "--weights",
            tiny_weights,
            "--short-side",
            "240",
            "--max-frames",
            "6",
        )
        assert result.exit_code == 0, result.output
    for index in range(6):
        a = read_mask(outputs["video"] / f"{index:05d}.png")
        b = read_mask(outputs["frames"] / f"{index:05d}.png")
        assert a.shape == (480, 854)
        union = np.logical_or(a > 0, b > 0).sum()
        jaccard = np.logical_and(a > 0, b > 0).sum() / max(union, 1)
        # identical up to H.264 compression of the frames (measured: J 0.95-0.96, 99.8% pixels)
        assert jaccard >= 0.9 and (a == b).mean() >= 0.995, (index, jaccard)
