"""Reliability round 2 (issue 22, sections 1-3): concurrent runs, untrusted manifests, crashes.

Every output-writing command takes an exclusive lock on its output folder; a manifest is
untrusted input; interrupted and failed runs leave the folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    assert_refused,
    propagate,
    snapshot,
    tiny_spec,
    write_davis,
    write_images,
    write_youtube_vos,
)

from dino_vos import writers
from dino_vos.api import propagate_to_folder
from dino_vos.cli import main
from dino_vos.outputs import BACKUP_NAME, MANIFEST_NAME, STAGING_NAME, remove_stale_staging
from dino_vos.synthetic import make_clip

WEIGHTS = ["--short-side", "64", "--device", "cpu"]
LOCK_NAME = ".dino-vos-lock"  # dino_vos.outputs.LOCK_NAME (spelled out: tests run on old code too)
#: Runs ``python -m dino_vos`` with Python's own SIGINT handler (a background job of a
#: non-interactive shell starts with SIGINT ignored).
MAIN = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('dino_vos', run_name='__main__')"
)


@pytest.fixture()
def user_data(clip_dir: Path, tmp_path: Path) -> dict[str, Path]:
    shutil.copytree(clip_dir, tmp_path / "data")
    root = tmp_path / "data"
    return {"root": root, "frames": root / "frames", "masks": root / "masks"}


def _wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll ``condition`` (no timed assert: the deadline only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(0.02)


def _tiny_features(weights: Path):
    return tiny_spec(weights).build()


# --- 1. two runs into one folder ------------------------------------------------------------


def test_second_run_is_refused_while_the_first_stages_and_sigkill_leaves_no_lock(
    tmp_path, tiny_weights
):
    clip = make_clip(1500, (48, 64), num_objects=1, seed=5)
    frames, masks = clip.write(tmp_path / "clip")
    out = tmp_path / "out"
    args = ["propagate", str(frames), "--mask", str(masks / "00000.png"), "--out", str(out)]
    args += ["--weights", str(tiny_weights), *WEIGHTS]
    first = subprocess.Popen(
        [sys.executable, "-c", MAIN, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        staging = out / STAGING_NAME
        _wait_for(lambda: len(list(staging.glob("*.png"))) >= 2, first)
        second = CliRunner().invoke(main, args)  # a second terminal, a retried job
        assert first.poll() is None, "the first run ended before the second one started"
        assert_refused(second, f"in use by another dino-vos run (PID {first.pid})")
        assert staging.is_dir()  # the live staging folder of the first run was not touched
        assert not (out / MANIFEST_NAME).exists()
        staged = len(list(staging.glob("*.png")))
        _wait_for(lambda: len(list(staging.glob("*.png"))) > staged, first)  # still writing
    finally:
        first.kill()  # SIGKILL: no cleanup handler runs
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    # the killed run's lock died with it: the next run cleans up, names it, and succeeds
    third = CliRunner().invoke(main, [*args, "--max-frames", "3"])
    assert third.exit_code == 0, third.output
    assert "left by an interrupted run" in third.output
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
        MANIFEST_NAME,
    ]


@pytest.fixture()
def held_lock(tmp_path):
    """Another process holding the lock of a folder (as a live run would)."""
    processes: list[subprocess.Popen] = []

    def hold(folder: Path) -> int:
        code = (
            "import sys; from dino_vos.outputs import locked_output\n"
            f"with locked_output({str(folder)!r}):\n"
            "    print('locked', flush=True); sys.stdin.read()\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "locked", "the lock holder failed"
        return process.pid

    yield hold
    for process in processes:
        process.communicate("")
        assert process.returncode == 0


def test_every_writing_command_is_refused_on_a_locked_folder(
    user_data, tiny_weights, tmp_path, held_lock
):
    frames, mask = user_data["frames"], user_data["masks"] / "00000.png"
    davis = write_davis(tmp_path / "davis", {"alpha": (2017, 2, 5, (48, 80))})
    youtube = tmp_path / "youtube"
    write_youtube_vos(youtube)
    write_images(tmp_path / "images" / "train", per_class=2, seed=0)
    write_images(tmp_path / "images" / "val", per_class=1, seed=1)
    (tmp_path / "scores").mkdir()
    shutil.copytree(davis / "Annotations" / "480p", tmp_path / "scores", dirs_exist_ok=True)
    weights = ["--weights", str(tiny_weights), *WEIGHTS]
    knn = ["--train", str(tmp_path / "images" / "train"), "--val", str(tmp_path / "images" / "val")]
    knn += ["--weights", str(tiny_weights), "--device", "cpu", "--image-size", "32"]
    commands = {  # fmt: skip
        "propagate": ["propagate", str(frames), "--mask", str(mask), *weights, "--out"],
        "attention": ["attention", str(frames), *weights, "--out"],
        "features": ["features", str(frames), *weights, "--out"],
        "demo": ["demo", "--video", str(frames), "--mask", str(mask), *weights, "--out"],
        "eval davis": ["eval", "davis", "--davis-root", str(davis), *weights, "--out"],
        "eval davis --sweep": [
            "eval",
            "davis",
            "--davis-root",
            str(davis),
            *weights,
            "--sweep",
            "topk=1,2",
            "--out",
        ],
        "eval youtube-vos": ["eval", "youtube-vos", "--root", str(youtube), *weights, "--out"],
        "eval knn": ["eval", "knn", *knn, "--out"],
        "eval linear": ["eval", "linear", *knn, "--out"],
        "eval transfer": ["eval", "transfer", *knn, "--out"],
        "pretrain": ["pretrain", "--preset", "cpu_tiny", "--data", str(frames), "--out"],
    }
    for name, args in commands.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        pid = held_lock(out)
        before = snapshot(out)
        result = CliRunner().invoke(main, [*args, str(out)])
        assert_refused(result, f"in use by another dino-vos run (PID {pid})")
        assert snapshot(out) == before, name
    pid = held_lock(tmp_path / "scores")
    result = CliRunner().invoke(
        main, ["eval", "davis", "--davis-root", str(davis), "--results", str(tmp_path / "scores")]
    )
    assert_refused(result, f"(PID {pid})")


def test_cache_entries_are_written_under_a_temporary_name(tmp_path, tiny_weights, monkeypatch):
    """A reader never sees a half-written cache entry: it appears by a rename, and its lock
    file is gone afterwards."""
    from dino_vos.eval.vos import cache as cache_module
    from dino_vos.features import BackboneFeatures
    from dino_vos.sources import Frame

    features = _tiny_features(tiny_weights)
    assert isinstance(features, BackboneFeatures)
    cache = cache_module.FeatureCache(features, tmp_path / "cache").for_sequence("s")
    frame = Frame(0, "00000", np.zeros((48, 64, 3), np.uint8))
    seen: list[tuple[bool, list[str]]] = []
    real_replace = os.replace

    def spy(source, target):
        if str(target).endswith(".safetensors"):
            folder = Path(target).parent
            seen.append((Path(target).exists(), sorted(p.name for p in folder.iterdir())))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    cache(frame)
    path = cache.path(frame)
    assert seen and seen[-1][0] is False  # not there until the rename
    assert any(name.endswith(".lock") for name in seen[-1][1])  # written under its lock
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # lock file removed


# --- 2. manifests are untrusted -------------------------------------------------------------


def _rerun_with_manifest_entries(user_data, tiny_weights, out: Path, entries: list[str]):
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["outputs"] += entries
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return propagate(user_data["frames"], mask, out, tiny_weights, "--max-frames", "3")


def test_manifest_entry_outside_out_is_ignored(user_data, tiny_weights):
    out = user_data["root"] / "out"
    before = snapshot(user_data["frames"])
    entries = ["../frames/00000.jpg", str(user_data["frames"] / "00001.jpg")]
    result = _rerun_with_manifest_entries(user_data, tiny_weights, out, entries)
    assert result.exit_code == 0, result.output
    assert snapshot(user_data["frames"]) == before  # no input frame moved
    warnings = [line for line in result.output.splitlines() if "Ignoring" in line]
    assert len(warnings) == 1 and "../frames/00000.jpg" in warnings[0], result.output
    assert json.loads((out / MANIFEST_NAME).read_text())["outputs"] == [
        "00000.png",
        "00001.png",
        "00002.png",
    ]


def test_manifest_entry_through_a_symlink_never_deletes_outside(user_data, tiny_weights, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "victim.txt").write_text("keep me")
    (elsewhere / "final.png").write_text("keep me too")
    out = tmp_path / "out"
    out.mkdir()
    (out / "lnk").symlink_to(elsewhere, target_is_directory=True)
    # a symlink as the final component, named like an output
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights, "--overwrite").exit_code == 0
    (out / "link.png").symlink_to(elsewhere / "final.png")
    result = _rerun_with_manifest_entries(
        user_data, tiny_weights, out, ["lnk/victim.txt", "link.png"]
    )
    assert result.exit_code == 0, result.output
    assert (elsewhere / "victim.txt").read_text() == "keep me"
    assert (elsewhere / "final.png").read_text() == "keep me too"
    assert (out / "link.png").is_symlink() and (out / "lnk").is_symlink()
    warnings = [line for line in result.output.splitlines() if "Ignoring" in line]
    assert len(warnings) == 1 and "lnk/victim.txt" in warnings[0], result.output


def test_corrupt_manifest_is_reported_at_the_start(user_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    (out / MANIFEST_NAME).write_text('{"outputs": ["00000.png", ')  # cut short
    before = snapshot(out)
    result = propagate(user_data["frames"], mask, out, tiny_weights)
    assert_refused(result, f"{out / MANIFEST_NAME} is corrupt")
    assert snapshot(out) == before


# --- 3. crash safety -------------------------------------------------------------------------


@pytest.mark.parametrize("moves", [3, 9])  # moving the old result out; moving the new one in
def test_sigkill_while_a_rerun_moves_files_in_is_undone_without_overwrite(
    user_data, tiny_weights, tmp_path, moves
):
    out = tmp_path / "out"
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    before = snapshot(out)
    # a re-run killed (SIGKILL) after the given number of file moves of its commit (1 manifest
    # + 6 masks move out, then 4 masks move in)
    code = (
        "import os, signal, sys\n"
        "from dino_vos import writers\n"
        "real, calls = writers._move, []\n"
        "def move(source, target):\n"
        "    real(source, target); calls.append(target)\n"
        f"    if len(calls) == {moves}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "writers._move = move\n"
        "from dino_vos.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["propagate", str(user_data["frames"]), "--mask", str(mask), "--out", str(out)]
    args += ["--weights", str(tiny_weights), *WEIGHTS, "--max-frames", "4"]
    killed = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / BACKUP_NAME).is_dir()
    # the cleanup alone puts back exactly the previous result
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    notes: list[str] = []
    remove_stale_staging(copy, notes.append)
    (copy / LOCK_NAME).unlink()  # the killed run's lock file (its lock died with it)
    assert snapshot(copy) == before
    assert "Restored the previous result" in notes[0]
    # and the next run recognises the journal without --overwrite, says so, and succeeds
    result = propagate(user_data["frames"], mask, out, tiny_weights, "--max-frames", "4")
    assert result.exit_code == 0, result.output
    assert "Restored the previous result" in result.output
    assert json.loads((out / MANIFEST_NAME).read_text())["frames"] == 4
    assert not (out / BACKUP_NAME).exists() and not (out / STAGING_NAME).exists()


def _sigint_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture()
def python_sigint():
    """Python's Ctrl-C handler for the test: a background job of a non-interactive shell (CI,
    nohup) starts with SIGINT ignored, and then a Ctrl-C sent to the test would be lost."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_double_ctrl_c_leaves_no_partial_folder(
    user_data, tiny_weights, tmp_path, monkeypatch, python_sigint
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").mkdir()
    (out / "keep" / "x").write_text("x")  # a non-empty folder (passed with overwrite)
    before = snapshot(out)
    real_rmtree = shutil.rmtree

    def rmtree_with_second_ctrl_c(path, *args, **kwargs):  # the 2nd Ctrl-C lands in cleanup
        if Path(path).name == STAGING_NAME:
            _sigint_self()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(writers.shutil, "rmtree", rmtree_with_second_ctrl_c)
    features = _tiny_features(tiny_weights)
    with pytest.raises(KeyboardInterrupt):
        propagate_to_folder(
            user_data["frames"],
            user_data["masks"] / "00000.png",
            out,
            features,
            on_frame=lambda result: _sigint_self() if result.index == 2 else None,
            overwrite=True,
        )
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_ctrl_c_during_the_moves_and_again_during_the_rollback(
    user_data, tiny_weights, tmp_path, monkeypatch, python_sigint
):
    out = tmp_path / "out"
    mask = user_data["masks"] / "00000.png"
    assert propagate(user_data["frames"], mask, out, tiny_weights).exit_code == 0
    before = snapshot(out)
    real_move, calls = writers._move, []

    def move(source, target):
        calls.append(target)
        if len(calls) in (3, 5):  # mid-commit, then again while the commit is rolled back
            _sigint_self()
        real_move(source, target)

    monkeypatch.setattr(writers, "_move", move)
    result = propagate(user_data["frames"], mask, out, tiny_weights, "--max-frames", "4")
    assert result.exit_code == 130, result.output
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{i:05d}.png" for i in range(6)), MANIFEST_NAME]
    )


def test_eval_davis_results_on_an_empty_folder_leaves_it_as_it_was(tmp_path):
    root = write_davis(tmp_path / "davis", {"alpha": (2017, 2, 5, (48, 80))})
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        main, ["eval", "davis", "--davis-root", str(root), "--results", str(empty)]
    )
    assert result.exit_code == 2, result.output
    assert list(empty.iterdir()) == []


def _video_frames(path: Path) -> int:
    import cv2

    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir(), reason="no /dev/shm: no second file system to test with"
)
def test_overlay_on_another_file_system_is_renamed_not_copied(
    user_data, tiny_weights, tmp_path, monkeypatch
):
    import tempfile

    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system as the test folder")
        overlay = shm / "overlay.mp4"
        out = tmp_path / "out"
        mask = user_data["masks"] / "00000.png"
        first = propagate(user_data["frames"], mask, out, tiny_weights, "--overlay", overlay)
        assert first.exit_code == 0, first.output
        assert _video_frames(overlay) == 6

        def full_disk(source, target, *args, **kwargs):  # writes half the file, then fails
            Path(target).write_bytes(Path(source).read_bytes()[:100])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(shutil, "copyfile", full_disk)
        monkeypatch.setattr(shutil, "copy2", full_disk)
        second = propagate(
            user_data["frames"], mask, out, tiny_weights, "--overlay", overlay, "--max-frames", "3"
        )
        assert _video_frames(overlay) == 3  # the complete new video, never a truncated copy
        assert second.exit_code == 0, second.output  # it was renamed: nothing was copied
        assert sorted(p.name for p in shm.iterdir()) == ["overlay.mp4"]  # no temporary left
        # a run that fails keeps the previous overlay and leaves no temporary file
        kept = overlay.read_bytes()

        def broken(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(writers.VideoWriter, "close", broken)
        third = propagate(user_data["frames"], mask, out, tiny_weights, "--overlay", overlay)
        assert third.exit_code == 2, third.output
        assert overlay.read_bytes() == kept
        assert sorted(p.name for p in shm.iterdir()) == ["overlay.mp4"]
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_overlay_over_a_users_file_needs_overwrite(user_data, tiny_weights, tmp_path):
    mask = user_data["masks"] / "00000.png"
    mine = tmp_path / "holiday.mp4"
    mine.write_bytes(b"the user's own video")
    result = propagate(user_data["frames"], mask, tmp_path / "out", tiny_weights, "--overlay", mine)
    assert_refused(result, f"--overlay {mine} exists and is not an overlay dino-vos wrote")
    assert mine.read_bytes() == b"the user's own video"
    assert not (tmp_path / "out").exists()
    # dino-vos's own overlay (listed in the manifest) is replaced by a re-run
    ours = tmp_path / "ours.mp4"
    out = tmp_path / "out2"
    assert propagate(user_data["frames"], mask, out, tiny_weights, "--overlay", ours).exit_code == 0
    again = propagate(user_data["frames"], mask, out, tiny_weights, "--overlay", ours)
    assert again.exit_code == 0, again.output
    # and --overwrite replaces the user's file on purpose
    forced = propagate(
        user_data["frames"], mask, tmp_path / "out3", tiny_weights, "--overlay", mine, "--overwrite"
    )
    assert forced.exit_code == 0, forced.output
    assert mine.read_bytes() != b"the user's own video"


def test_baseline_out_never_is_inside_its_data(tmp_path, tiny_weights):
    data = tmp_path / "images"
    write_images(data / "train", per_class=2, seed=0)
    write_images(data / "val", per_class=1, seed=1)
    before = snapshot(data)
    base = ["--train", str(data / "train"), "--val", str(data / "val")]
    base += ["--weights", str(tiny_weights), "--device", "cpu", "--image-size", "32"]
    cases = [
        (data / "train", "is the input"),
        (data / "val" / "class0", "is inside the input folder"),
        (data, "contains the input"),
    ]
    for command in ("knn", "linear", "transfer"):
        for out, message in cases:
            result = CliRunner().invoke(main, ["eval", command, *base, "--out", str(out)])
            assert_refused(result, message)
    result = CliRunner().invoke(
        main,
        ["eval", "knn", *base, "--out", str(tmp_path / "o"), "--cache", str(data / "val")],
    )
    assert_refused(result, "--cache")
    assert snapshot(data) == before
