"""``dino-vos propagate-batch``: every video into its folder, resume, failure isolation, shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dino_vos.cli import main
from dino_vos.masks import read_mask
from dino_vos.synthetic import make_clip

#: id -> frames of the good videos (clip "c" is an mp4)
GOOD = {"a": 7, "b": 5, "c": 6, "d": 4}
BAD = ("broken", "nomask")


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Clips a, b, d as frame folders, c as an mp4, a corrupt mp4 and a clip without its mask;
    jobs.csv lists them all."""
    root = tmp_path_factory.mktemp("videos")
    rows = ["input,mask,id"]
    for seed, (name, frames) in enumerate(GOOD.items()):
        clip = make_clip(frames, (48, 64), num_objects=2, seed=seed + 1)
        video = root / f"{name}.mp4" if name == "c" else None
        frame_dir, mask_dir = clip.write(root / name, video=video)
        source = f"{name}.mp4" if video else f"{name}/frames"
        rows.append(f"{source},{name}/masks/00000.png,{name}")
    (root / "broken.mp4").write_bytes(b"not a video at all")
    rows.append("broken.mp4,a/masks/00000.png,broken")
    rows.append("b/frames,b/masks/missing.png,nomask")
    (root / "jobs.csv").write_text("\n".join(rows) + "\n")
    return root


def args(jobs: Path, weights: Path, out: Path, *extra: object) -> list[str]:
    return [
        "propagate-batch", str(jobs), "--out", str(out), "--weights", str(weights),
        "--short-side", "48", "--device", "cpu", *map(str, extra),
    ]  # fmt: skip


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_mask(p) for p in sorted(folder.glob("*.png"))}


def summary_of(out: Path, name: str = "batch.json") -> dict:
    return json.loads((out / name).read_text())


def statuses(summary: dict) -> dict[str, str]:
    return {video["id"]: video["status"] for video in summary["videos"]}


def test_batch_equals_single_runs_isolates_failures_and_resumes(videos, tiny_weights, tmp_path):
    out = tmp_path / "batch"
    result = CliRunner().invoke(main, args(videos / "jobs.csv", tiny_weights, out))
    assert result.exit_code == 1, result.output  # two videos failed, the others are done
    summary = summary_of(out)
    assert statuses(summary) == {
        **dict.fromkeys(GOOD, "propagated"),
        **dict.fromkeys(BAD, "failed"),
    }
    assert (summary["propagated"], summary["reused"], summary["failed"]) == (4, 0, 2)
    assert summary["propagated_frames"] == sum(GOOD.values())
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == list(BAD)
    assert "broken.mp4" in failures[0]["error"] and "missing.png" in failures[1]["error"]
    assert all("\n" not in f["error"] for f in failures)
    assert not (out / "broken").exists() and not (out / "nomask").exists()

    # every video equals a plain `propagate` of it
    for name in GOOD:
        source = videos / (f"{name}.mp4" if name == "c" else f"{name}/frames")
        single = tmp_path / f"single-{name}"
        plain = [
            "propagate", str(source), "--mask", str(videos / name / "masks" / "00000.png"),
            "--out", str(single), "--weights", str(tiny_weights), "--short-side", "48",
            "--device", "cpu",
        ]  # fmt: skip
        assert CliRunner().invoke(main, plain).exit_code == 0
        batch, alone = masks_of(out / name), masks_of(single)
        assert len(batch) == GOOD[name] and batch.keys() == alone.keys()
        assert all(np.array_equal(batch[k], alone[k]) for k in batch), name

    # resume: finished videos are reused; a removed one is the only one redone
    import shutil

    shutil.rmtree(out / "b")
    again = CliRunner().invoke(main, args(videos / "jobs.csv", tiny_weights, out))
    assert again.exit_code == 1
    summary = summary_of(out)
    assert statuses(summary) == {
        "a": "reused", "b": "propagated", "c": "reused", "d": "reused",
        "broken": "failed", "nomask": "failed",
    }  # fmt: skip
    assert summary["propagated_frames"] == GOOD["b"]


def test_killed_batch_resumes_without_redoing(videos, tiny_weights, tmp_path, monkeypatch):
    from dino_vos import runner

    out = tmp_path / "batch"
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"input": str(videos / n / "frames"), "mask": str(videos / n / "masks" / "00000.png"),
              "id": n} for n in ("a", "b", "d")]  # fmt: skip
    lines[2]["topk"] = 3  # a per-line option
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    original = runner.SequenceRunner.run
    done: list[str] = []

    def stop_after_one(self, task, *rest, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(task.name)
        return original(self, task, *rest, **kwargs)

    monkeypatch.setattr(runner.SequenceRunner, "run", stop_after_one)
    killed = CliRunner().invoke(main, args(jobs, tiny_weights, out))
    assert killed.exit_code == 130
    assert json.loads((out / "dino-vos.json").read_text())["status"] == "running"
    monkeypatch.setattr(runner.SequenceRunner, "run", original)
    resumed = CliRunner().invoke(main, args(jobs, tiny_weights, out))
    assert resumed.exit_code == 0, resumed.output
    summary = summary_of(out)
    expected = {name: "propagated" for name in ("a", "b", "d")}
    expected[done[0]] = "reused"
    assert statuses(summary) == expected and summary["failed"] == 0
    assert json.loads((out / "d" / "dino-vos.json").read_text())["propagation"]["topk"] == 3
    assert not (out / "failures.jsonl").read_text()


def test_two_worker_processes_and_slurm_array_shards(videos, tiny_weights, tmp_path, monkeypatch):
    jobs = videos / "jobs.csv"
    reference = tmp_path / "one"
    CliRunner().invoke(main, args(jobs, tiny_weights, reference))
    two = tmp_path / "two"
    result = CliRunner().invoke(main, args(jobs, tiny_weights, two, "--workers", 2))
    assert result.exit_code == 1, result.output
    assert statuses(summary_of(two)) == statuses(summary_of(reference))
    for name in GOOD:
        one_masks, two_masks = masks_of(reference / name), masks_of(two / name)
        assert all(np.array_equal(one_masks[k], two_masks[k]) for k in one_masks)

    # a SLURM array of 2 tasks: disjoint shards that cover the batch, balanced by frames
    array = tmp_path / "array"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    shards = []
    for task in (0, 1):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        CliRunner().invoke(main, args(jobs, tiny_weights, array))
        shards.append(summary_of(array, f"batch-{task}-of-2.json"))
    ids = [set(statuses(shard)) for shard in shards]
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == {*GOOD, *BAD}
    frames = [sum(GOOD.get(i, 1) for i in shard_ids) for shard_ids in ids]
    assert abs(frames[0] - frames[1]) <= max(GOOD.values())
    manifest = json.loads((array / "dino-vos.json").read_text())
    assert {"batch-0-of-2.json", "batch-1-of-2.json"} <= set(manifest["outputs"])


@pytest.mark.slow
def test_two_torchrun_ranks_on_gloo(videos, tiny_weights, tmp_path):
    out = tmp_path / "ranks"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(31500 + os.getpid() % 1000), "-m", "dino_vos",
        *args(videos / "jobs.csv", tiny_weights, out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]  # the two bad videos
    summary = summary_of(out)
    assert summary["world_size"] == 2 and summary["failed"] == 2
    ranks = {video["id"]: video["shard"] for video in summary["videos"]}
    assert {shard.split(", ")[1] for shard in ranks.values()} == {"rank 0 of 2", "rank 1 of 2"}
    assert all(len(masks_of(out / name)) == frames for name, frames in GOOD.items())


def test_bad_jobs_files_fail_in_one_line(videos, tiny_weights, tmp_path):
    cases = {
        "header.csv": ("video,mask\nx,y\n", "header must name input"),
        "twice.csv": ("input,mask,id\na/frames,m.png,x\nb/frames,m.png,x\n", "id 'x'"),
        "bad.jsonl": ('{"input": "a", "mask": "m", "topk": 0}\n', "bad option"),
        "key.jsonl": ('{"input": "a", "mask": "m", "colour": 1}\n', "unknown key 'colour'"),
    }
    for name, (text, message) in cases.items():
        jobs = tmp_path / name
        jobs.write_text(text)
        out = tmp_path / f"out-{name}"
        result = CliRunner().invoke(main, args(jobs, tiny_weights, out))
        assert result.exit_code == 2 and message in result.output, (name, result.output)
        assert "Traceback" not in result.output and not out.exists()


WORKERS_SCRIPT = """
import sys, time
from pathlib import Path
from dino_vos.runner import map_in_processes

def nothing():
    pass

def slow(item):
    folder = Path(sys.argv[1])
    (folder / f"started-{item}").touch()
    try:
        time.sleep(120)
    finally:  # what propagate_to_folder does with its staged outputs
        (folder / f"cleaned-{item}").touch()

if __name__ == "__main__":
    map_in_processes(slow, [0, 1, 2, 3], [1, 1, 1, 1], 2, nothing)
"""


def test_sigterm_to_the_process_group_unwinds_every_worker(tmp_path):
    """SLURM and `kill -- -PGID` send SIGTERM to the workers too: each one unwinds the video in
    hand (staged outputs removed) and exits, instead of dying with its partial folder."""
    import signal
    import time

    script = tmp_path / "workers.py"
    script.write_text(WORKERS_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(tmp_path.glob("started-*"))) == 2
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the workers exit, none takes the next item
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("a worker outlived SIGTERM")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    started = sorted(p.name.split("-")[1] for p in tmp_path.glob("started-*"))
    cleaned = sorted(p.name.split("-")[1] for p in tmp_path.glob("cleaned-*"))
    assert len(started) == 2 and cleaned == started


LOST_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
from dino_vos.runner import WorkerLostError, map_in_processes

def nothing():
    pass

def work(item):
    folder = Path(sys.argv[1])
    with open(folder / "calls", "a") as calls:
        calls.write(f"{item}\\n")
    if item == "killed":  # what the out-of-memory killer does to a worker
        os.kill(os.getpid(), signal.SIGKILL)
    return item.upper()

if __name__ == "__main__":
    items = ["a", "killed", "b"]
    if sys.argv[2] == "on_lost":
        results = map_in_processes(
            work, items, [1, 5, 1], 2, nothing, on_lost=lambda i, error: f"lost: {error}"
        )
        print(json.dumps(results))
    else:
        try:
            map_in_processes(work, items, [1, 5, 1], 2, nothing)
        except WorkerLostError as error:
            print(json.dumps(str(error)))
"""


@pytest.mark.parametrize("mode", ["on_lost", "raise"])
def test_a_killed_worker_loses_only_its_item(tmp_path, mode):
    """A worker killed alone (SIGKILL, as the OOM killer does) breaks the process pool: the other
    items still run, in new processes, and the item that kills its worker is given up after two
    deaths, with a one-line reason (on_lost), or a WorkerLostError naming it."""
    script = tmp_path / "lost.py"
    script.write_text(LOST_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout.strip().splitlines()[-1])
    calls = (tmp_path / "calls").read_text().split()
    assert calls.count("killed") == 2  # run again once in a new pool, then given up
    if mode == "on_lost":
        assert output[0] == "A" and output[2] == "B"
        assert output[1].startswith("lost: its worker process died 2 times")
        assert calls.count("a") >= 1 and calls.count("b") >= 1
    else:
        assert output.startswith("killed: its worker process died 2 times")
