"""Outputs never overwrite inputs, annotations or foreign files; results are always complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_refused, propagate, snapshot, write_davis

from dino_vos import writers
from dino_vos.cli import main
from dino_vos.errors import InputError
from dino_vos.masks import read_mask
from dino_vos.outputs import (
    BACKUP_NAME,
    JOURNAL_NAME,
    MANIFEST_NAME,
    STAGING_NAME,
    remove_stale_staging,
)
from dino_vos.writers import OutputSink


@pytest.fixture()
def user_data(clip_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """A copy of the generated clip: frames folder, its masks, a video."""
    shutil.copytree(clip_dir, tmp_path / "data")
    root = tmp_path / "data"
    return {"root": root, "frames": root / "frames", "masks": root / "masks"}


def test_out_never_is_near_an_input(user_data, tiny_weights, tmp_path):
    frames, masks = user_data["frames"], user_data["masks"]
    mask = masks / "00000.png"
    before = snapshot(user_data["root"])
    cases = [
        (frames, "is the input"),
        (frames / "sub", "is inside the input folder"),
        (user_data["root"], "contains the input"),  # holds the frames and the mask
        (masks, "contains the input"),  # the annotations folder holds the mask
    ]
    for out, message in cases:
        assert_refused(propagate(frames, mask, out, tiny_weights), message)
    link = tmp_path / "link"
    link.symlink_to(frames, target_is_directory=True)
    assert_refused(propagate(frames, mask, link, tiny_weights), "is the input")
    video = user_data["root"] / "clip.mp4"
    result = propagate(video, mask, tmp_path / "o", tiny_weights, "--overlay", video)
    assert_refused(result, "--overlay")
    assert snapshot(user_data["root"]) == before


def test_annotation_folder_is_refused_even_with_another_mask(user_data, tiny_weights, tmp_path):
    gt = tmp_path / "Annotations" / "dog"
    shutil.copytree(user_data["masks"], gt)
    mask = tmp_path / "first.png"
    shutil.copy(user_data["masks"] / "00000.png", mask)
    before = snapshot(gt)
    result = propagate(user_data["frames"], mask, gt, tiny_weights)
    assert_refused(result, "is not empty and is not a dino-vos result (it holds 00000.png")
    assert snapshot(gt) == before


def test_overwrite_writes_beside_foreign_files_but_never_replaces_them(
    user_data, tiny_weights, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = propagate(user_data["frames"], user_data["masks"] / "00000.png", out, tiny_weights)
    assert_refused(result, "pass --overwrite")
    result = propagate(
        user_data["frames"], user_data["masks"] / "00000.png", out, tiny_weights, "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["outputs"] == [f"{i:05d}.png" for i in range(6)]
    # a foreign file with an output's name is not replaced, and the run leaves nothing
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "00003.png").write_bytes(b"user's picture")
    result = propagate(
        user_data["frames"], user_data["masks"] / "00000.png", clash, tiny_weights, "--overwrite"
    )
    assert result.exit_code == 2 and "00003.png was not written by dino-vos" in result.output
    assert snapshot(clash) == {"00003.png": snapshot(clash)["00003.png"]}
    assert (clash / "00003.png").read_bytes() == b"user's picture"


def test_shorter_rerun_replaces_the_whole_result(user_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    result = propagate(user_data["frames"], mask, out, tiny_weights, "--max-frames", "3")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"] + [
        MANIFEST_NAME
    ]
    assert json.loads((out / MANIFEST_NAME).read_text())["frames"] == 3


def test_failed_commit_keeps_the_previous_result(user_data, tiny_weights, tmp_path, monkeypatch):
    out = tmp_path / "out"
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers, "_place_overlay", fail)  # the overlay's rename, mid-commit
    overlay = tmp_path / "o.mp4"
    result = propagate(
        user_data["frames"], mask, out, tiny_weights, "--max-frames", "4", "--overlay", overlay
    )
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert "Traceback" not in result.output
    assert snapshot(out) == before  # the old complete result, manifest included
    assert not overlay.exists()


def test_unwritable_overlay_is_refused_before_the_model_loads(user_data, tiny_weights, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    mask = user_data["masks"] / "00000.png"
    result = propagate(
        user_data["frames"], mask, tmp_path / "out", tiny_weights, "--overlay", blocker / "o.mp4"
    )
    assert_refused(result, "is a file, not a folder")
    assert not (tmp_path / "out").exists()


def test_interrupted_runs_are_cleaned_and_named(user_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    before = snapshot(out)
    # what SIGKILL mid-commit leaves: the old manifest and masks moved to the backup, two new
    # files moved in, the staging folder
    backup = out / BACKUP_NAME
    backup.mkdir()
    for name in (MANIFEST_NAME, "00000.png", "00001.png"):
        (out / name).rename(backup / name)
    (out / "00000.png").write_bytes(b"new, unfinished")
    (out / "00009.png").write_bytes(b"new, unfinished")
    (backup / JOURNAL_NAME).write_text(json.dumps(["00000.png", "00009.png"]))
    (out / STAGING_NAME).mkdir()
    (out / STAGING_NAME / "00002.png").write_bytes(b"staged")
    notes: list[str] = []
    remove_stale_staging(out, notes.append)
    assert snapshot(out) == before
    assert len(notes) == 2 and "Restored the previous result" in notes[0]
    (out / STAGING_NAME).mkdir()  # SIGKILL during propagation: the next run says so
    result = propagate(user_data["frames"], mask, out, tiny_weights)
    assert result.exit_code == 0 and "left by an interrupted run" in result.output


def test_library_sink_applies_the_same_rules(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "00000.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="is inside the input folder"):
        OutputSink(folder / "out", inputs=[folder])
    with pytest.raises(InputError, match="not a dino-vos result"):
        OutputSink(folder)
    with OutputSink(tmp_path / "res") as sink:
        sink.write_mask("a", np.zeros((4, 4), np.uint8))
        sink.commit({"value": float("nan")})  # strict JSON: NaN becomes null
    manifest = json.loads((tmp_path / "res" / MANIFEST_NAME).read_text())
    assert manifest == {"value": None, "outputs": ["a.png"]}


def test_duplicate_frame_stems_are_an_error(user_data, tiny_weights, tmp_path):
    frames = user_data["frames"]
    shutil.copy(user_data["masks"] / "00002.png", frames / "00002.png")
    result = propagate(frames, user_data["masks"] / "00000.png", tmp_path / "o", tiny_weights)
    assert_refused(result, "two frames named 00002")
    assert "00002.jpg and 00002.png" in result.output


def test_eval_davis_never_writes_into_the_dataset(tmp_path, tiny_weights):
    root = write_davis(tmp_path / "davis", {"alpha": (2017, 2, 5, (48, 80))})
    before = snapshot(root)
    for out in (root / "Annotations" / "480p", root / "Annotations" / "480p" / "alpha"):
        result = CliRunner().invoke(
            main,
            ["eval", "davis", "--davis-root", str(root), "--weights", str(tiny_weights),
             "--short-side", "64", "--device", "cpu", "--out", str(out)],
        )  # fmt: skip
        assert_refused(result, "is inside the input folder")
    result = CliRunner().invoke(
        main, ["eval", "davis", "--davis-root", str(root), "--results", str(root / "Annotations")]
    )
    assert_refused(result, "is the input")
    assert snapshot(root) == before


def test_eval_davis_rerun_with_other_settings_drops_old_reports(tmp_path, tiny_weights):
    root = write_davis(tmp_path / "davis", {"alpha": (2017, 2, 5, (48, 80))})
    out = tmp_path / "out"
    base = ["eval", "davis", "--davis-root", str(root), "--weights", str(tiny_weights)]
    base += ["--short-side", "64", "--device", "cpu", "--out", str(out)]
    assert CliRunner().invoke(main, base).exit_code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "complete" and "global_results-val.csv" in manifest["outputs"]
    # a re-run with another top-k that stops before its reports: no report of the old settings
    # remains beside the new masks
    from dino_vos.eval.vos import davis_job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    original = davis_job.evaluate_davis
    davis_job.evaluate_davis = interrupted
    try:
        result = CliRunner().invoke(main, [*base, "--topk", "3"])
    finally:
        davis_job.evaluate_davis = original
    assert result.exit_code == 130
    assert not (out / "global_results-val.csv").exists()
    assert json.loads((out / MANIFEST_NAME).read_text())["status"] == "running"
    resumed = CliRunner().invoke(main, [*base, "--topk", "3"])  # its own folder: no --overwrite
    assert resumed.exit_code == 0, resumed.output
    assert (out / "global_results-val.csv").is_file()
    assert read_mask(out / "alpha" / "00004.png").shape == (48, 80)


@pytest.mark.parametrize(
    ("signal_number", "code", "word"), [(15, 143, "Terminated"), (2, 130, "Interrupted")]
)
def test_sigterm_and_sigint_discard_the_staged_run(
    tmp_path, tiny_weights, signal_number, code, word
):
    import subprocess
    import sys
    import time

    from dino_vos.synthetic import make_clip

    clip = make_clip(400, (48, 64), num_objects=1, seed=4)
    frames, masks = clip.write(tmp_path / "clip")
    out = tmp_path / "out"
    # a background job of a non-interactive shell (CI) starts with SIGINT ignored: restore
    # Python's handler first, as a terminal would have it
    restore = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    restore += "runpy.run_module('dino_vos', run_name='__main__')"
    command = [sys.executable, "-c", restore, "propagate", str(frames), "--mask",
               str(masks / "00000.png"), "--out", str(out), "--weights", str(tiny_weights),
               "--short-side", "64", "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / STAGING_NAME).glob("*.png")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"{word}: partial outputs were discarded."
    assert not out.exists()  # the staging folder went, and the folder it created too


def test_every_command_keeps_its_output_away_from_its_inputs(user_data, tiny_weights, tmp_path):
    frames, mask = user_data["frames"], user_data["masks"] / "00000.png"
    video = user_data["root"] / "clip.mp4"
    before = snapshot(user_data["root"])
    weights = ["--weights", str(tiny_weights), "--short-side", "64", "--device", "cpu"]
    cases = [
        (["attention", str(frames), "--out", str(frames / "maps"), *weights], "inside the input"),
        (["attention", str(video), "--out", str(tmp_path / "a"), "--overlay", str(video),
          *weights], "is the input"),
        (["features", str(frames), "--out", str(user_data["root"]), *weights],
         "contains the input"),
        (["demo", "--video", str(video), "--mask", str(mask), "--out", str(user_data["root"]),
          *weights], "contains the input"),
        (["pretrain", "--preset", "cpu_tiny", "--data", str(frames), "--out",
          str(frames / "run")], "inside the input folder"),
    ]  # fmt: skip
    for args, message in cases:
        assert_refused(CliRunner().invoke(main, args), message)
    run_dir = tmp_path / "notes"
    run_dir.mkdir()
    (run_dir / "todo.txt").write_text("mine")
    result = CliRunner().invoke(
        main, ["pretrain", "--preset", "cpu_tiny", "--data", str(frames), "--out", str(run_dir)]
    )
    assert_refused(result, "is not empty and is not a dino-vos result")
    assert snapshot(user_data["root"]) == before
