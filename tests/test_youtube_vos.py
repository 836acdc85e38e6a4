"""eval youtube-vos on a generated YouTube-VOS-style split with a held-back ground truth."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import YOUTUBE_VOS_VIDEOS as VIDEOS
from conftest import write_youtube_vos

from dino_vos.cli import main
from dino_vos.eval.davis_metrics import score_frames
from dino_vos.masks import read_mask


#: video -> (frames, objects, {object id: first frame index})
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("ytvos")
    return root, write_youtube_vos(root)


def run(root: Path, out: Path, weights: Path, *extra: str):
    args = ["eval", "youtube-vos", "--root", str(root), "--out", str(out), "--weights",
            str(weights), "--short-side", "48", "--device", "cpu", *extra]  # fmt: skip
    return CliRunner().invoke(main, args)


def test_submission_layout_objects_entering_and_held_back_score(dataset, tiny_weights, tmp_path):
    root, truth = dataset
    out = tmp_path / "out"
    result = run(root, out, tiny_weights)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out / "submission.zip") as archive:
        listed = sorted(archive.namelist())
    expected = sorted(
        f"Annotations/{video}/{5 * t:05d}.png" for video, (n, _, _) in VIDEOS.items()
        for t in range(n)
    )  # fmt: skip
    assert listed == expected  # every frame of JPEGImages, nothing else
    scores = {}
    for video, (frames, objects, starts) in VIDEOS.items():
        pred = np.stack([read_mask(out / "Annotations" / video / f"{5 * t:05d}.png")
                         for t in range(frames)])  # fmt: skip
        for object_id, start in starts.items():
            assert not (pred[:start] == object_id).any()  # absent before its first keyframe
            assert np.array_equal(pred[start] == object_id, truth[video][start] == object_id)
        # held-back ground truth, scored like DAVIS on the frames after each object's start
        first = min(starts.values())
        j, f = score_frames(truth[video][first + 1 :], pred[first + 1 :], objects)
        static = np.maximum.accumulate(  # baseline: each object's keyframe mask, held still
            np.stack([np.where(truth[video][t] > 0, truth[video][t], 0) * (t in starts.values())
                      for t in range(frames)]), axis=0)  # fmt: skip
        js, fs = score_frames(truth[video][first + 1 :], static[first + 1 :], objects)
        scores[video] = (np.nanmean(j) + np.nanmean(f)) / 2
        scores[f"{video} static"] = (np.nanmean(js) + np.nanmean(fs)) / 2
        assert (out / "Annotations" / video / "dino-vos.json").is_file()
    assert all(scores[v] > scores[f"{v} static"] + 0.1 for v in VIDEOS), scores  # tracked
    manifest = json.loads((out / "dino-vos.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["propagated"] == 2

    # resumable: complete videos are reused; a removed one is propagated again
    import shutil

    shutil.rmtree(out / "Annotations" / "7f8e9d")
    again = run(root, out, tiny_weights)
    assert again.exit_code == 0, again.output
    summary = json.loads((out / "dino-vos.json").read_text())["summary"]
    assert summary["videos"] == {"0a1b2c": "skipped", "7f8e9d": "propagated"}
    with zipfile.ZipFile(out / "submission.zip") as archive:
        assert sorted(archive.namelist()) == expected


def test_bad_layouts_fail_in_one_line(dataset, tiny_weights, tmp_path):
    root, _ = dataset
    cases = [
        (tmp_path / "nothing", tmp_path / "o1", "JPEGImages not found"),
        (root, root / "valid" / "preds", "is inside the input folder"),
    ]
    for given_root, out, message in cases:
        result = run(given_root, out, tiny_weights)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output, result.output
    broken = tmp_path / "broken"
    (broken / "valid" / "JPEGImages").mkdir(parents=True)
    (broken / "valid" / "Annotations").mkdir()
    (broken / "valid" / "meta.json").write_text("{not json")
    result = run(broken, tmp_path / "o2", tiny_weights)
    assert result.exit_code == 2 and "is not a YouTube-VOS meta.json" in result.output


@pytest.mark.slow
def test_two_torchrun_ranks_share_the_videos(dataset, tiny_weights, tmp_path):
    import os
    import subprocess
    import sys

    root, _ = dataset
    out, alone = tmp_path / "ranks", tmp_path / "alone"
    assert run(root, alone, tiny_weights).exit_code == 0
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(32500 + os.getpid() % 1000), "-m", "dino_vos", "eval", "youtube-vos",
        "--root", str(root), "--out", str(out), "--weights", str(tiny_weights),
        "--short-side", "48", "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "dino-vos.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["propagated"] == len(VIDEOS)
    for video, (frames, _, _) in VIDEOS.items():
        for t in range(frames):
            name = f"{5 * t:05d}.png"
            ranked = read_mask(out / "Annotations" / video / name)
            assert np.array_equal(ranked, read_mask(alone / "Annotations" / video / name))
    with zipfile.ZipFile(out / "submission.zip") as archive:
        assert len(archive.namelist()) == sum(frames for frames, _, _ in VIDEOS.values())
