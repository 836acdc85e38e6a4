"""Benchmark ``dino-vos propagate-batch`` on many short generated clips; prints JSON.

    python tools/bench_batch.py [--clips 200] [--workers 2] [--corrupt 4] [--short-side 240]
                                [--backbone dino_vos_tiny] [--keep DIR] [--skip-clean]

Clips (``dino_vos.synthetic.make_clip``, 8-12 frames of 240 x 320, two objects) are written
as JPEG frame folders with their first mask, plus ``--corrupt`` broken entries spread through
the list (cycling: random bytes named .mp4, a truncated mp4, a frame folder with a truncated
JPEG, a missing mask). Each phase runs the real command in its own process group:

1. ``clean``: the whole batch uninterrupted: clips per minute (wall clock of the command,
   process start and model loading included) and the command's own ``batch.json`` numbers;
2. ``sigterm`` and ``sigkill``: the batch killed (``killpg``) once half of the good clips are
   finished, then run again to the end. Checked: every clip finished before the kill is
   ``reused`` by the resumed run and its files (manifest and masks) keep their mtimes and
   bytes (not redone); every good clip ends finished with all its masks (none lost); the
   corrupt clips are exactly the lines of ``failures.jsonl``; no staging folder or half
   written clip is left. The clips in flight at the kill are redone (at most ``--workers``).

The machine is shared, so wall-clock numbers are indicative only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dino_vos.outputs import MANIFEST_NAME
from dino_vos.synthetic import make_clip

CORRUPT_KINDS = ("garbage-mp4", "truncated-mp4", "truncated-jpeg", "missing-mask")


def make_clips(root: Path, clips: int, corrupt: int, size: tuple[int, int]) -> dict[str, Any]:
    """Write the clips and ``jobs.csv``; return the good clips' frame counts and the bad ids."""
    rng = np.random.default_rng(0)
    good: dict[str, int] = {}
    rows = ["input,mask,id"]
    for index in range(clips):
        name = f"clip{index:04d}"
        frames = int(rng.integers(8, 13))
        make_clip(frames, size, num_objects=2, seed=index).write(root / name)
        rows.append(f"{name}/frames,{name}/masks/00000.png,{name}")
        good[name] = frames
    bad: dict[str, str] = {}
    sample = make_clip(10, size, num_objects=2, seed=10_000)
    sample.write(root / "sample", video=root / "sample.mp4")
    for number in range(corrupt):
        kind = CORRUPT_KINDS[number % len(CORRUPT_KINDS)]
        name = f"bad{number:02d}-{kind}"
        mask = "sample/masks/00000.png"
        if kind == "garbage-mp4":
            (root / f"{name}.mp4").write_bytes(rng.bytes(20_000))
            source = f"{name}.mp4"
        elif kind == "truncated-mp4":
            data = (root / "sample.mp4").read_bytes()
            (root / f"{name}.mp4").write_bytes(data[: len(data) // 3])
            source = f"{name}.mp4"
        elif kind == "truncated-jpeg":
            shutil.copytree(root / "sample" / "frames", root / name / "frames")
            victim = root / name / "frames" / "00005.jpg"
            victim.write_bytes(victim.read_bytes()[:200])
            source = f"{name}/frames"
        else:
            source, mask = "sample/frames", f"{name}/masks/00000.png"
        bad[name] = kind
        position = 1 + number + round((number + 0.5) * clips / corrupt)  # spread out
        rows.insert(position, f"{source},{mask},{name}")
    (root / "jobs.csv").write_text("\n".join(rows) + "\n")
    return {"good": good, "bad": bad}


def command(jobs: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "dino_vos", "propagate-batch", str(jobs), "--out", str(out),
        "--backbone", args.backbone, "--short-side", str(args.short_side), "--device", "cpu",
        "--workers", str(args.workers),
    ]  # fmt: skip


def start(jobs: Path, out: Path, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    return subprocess.Popen(
        command(jobs, out, args), stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killpg reaches the workers too
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def finished_clips(out: Path, ids: list[str]) -> list[str]:
    return [name for name in ids if (out / name / MANIFEST_NAME).is_file()]


def snapshot(out: Path, ids: list[str]) -> dict[str, dict[str, tuple[int, str]]]:
    """Per finished clip: every file's (mtime_ns, sha256)."""
    state = {}
    for name in finished_clips(out, ids):
        state[name] = {
            path.name: (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted((out / name).iterdir())
            if path.is_file()
        }
    return state


def leftovers(out: Path) -> list[str]:
    """Hidden (staging, temporary) entries anywhere in ``out`` and clip folders without a
    manifest."""
    hidden = [str(p.relative_to(out)) for p in out.rglob(".*")]
    unfinished = [p.name for p in out.iterdir() if p.is_dir() and not (p / MANIFEST_NAME).is_file()]
    return sorted(hidden) + [f"{name}/ (no manifest)" for name in sorted(unfinished)]


def run_clean(jobs: Path, out: Path, args: argparse.Namespace, clips: dict, log: Path) -> dict:
    began = time.perf_counter()
    process = start(jobs, out, args, log)
    code = process.wait()
    wall = time.perf_counter() - began
    summary = json.loads((out / "batch.json").read_text())
    good = len(clips["good"])
    return {
        "exit_code": code,
        "wall_seconds": round(wall, 1),
        "clips_per_minute": round(good / wall * 60, 1),
        "frames_per_second": round(sum(clips["good"].values()) / wall, 2),
        "batch_json": {
            key: summary[key]
            for key in (
                "propagated",
                "reused",
                "failed",
                "propagated_frames",
                "seconds",
                "frames_per_second",
                "propagation_frames_per_second",
            )
        },  # fmt: skip
        **check_final(out, clips, summary, {}),
    }


def run_killed(
    jobs: Path, out: Path, args: argparse.Namespace, clips: dict, log: Path, signum: int
) -> dict:
    ids = list(clips["good"])
    target = len(ids) // 2
    began = time.perf_counter()
    process = start(jobs, out, args, log)
    while process.poll() is None and len(finished_clips(out, ids)) < target:
        time.sleep(0.2)
    killed_at = time.perf_counter() - began
    killed_before_end = process.poll() is None
    os.killpg(process.pid, signum)
    try:
        code = process.wait(timeout=120)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code, hung = process.wait(), True
    exited_after = time.perf_counter() - began - killed_at
    time.sleep(1.0)  # let orphaned workers (if any) finish dying before the snapshot
    before = snapshot(out, ids)
    left = leftovers(out)
    began = time.perf_counter()
    resumed = start(jobs, out, args, log)
    resume_code = resumed.wait()
    resume_wall = time.perf_counter() - began
    summary = json.loads((out / "batch.json").read_text())
    after = snapshot(out, ids)
    changed = sorted(name for name in before if after.get(name) != before[name])
    return {
        "signal": signal.Signals(signum).name,
        "killed_after_seconds": round(killed_at, 1),
        "killed_before_end": killed_before_end,
        "killed_exit_code": code,
        "killed_hung": hung,
        "seconds_to_exit_after_signal": round(exited_after, 2),
        "finished_before_kill": len(before),
        "left_behind_by_kill": left,
        "resume_exit_code": resume_code,
        "resume_wall_seconds": round(resume_wall, 1),
        "resume_batch_json": {k: summary[k] for k in ("propagated", "reused", "failed")},
        "redone_after_finishing": changed,  # finished before the kill, rewritten by the resume
        # clips started but not finished at the kill: redone from scratch by the resume
        "partial_at_kill": sum(1 for entry in left if entry.endswith("(no manifest)")),
        **check_final(out, clips, summary, before),
    }


def check_final(out: Path, clips: dict, summary: dict, reused: dict) -> dict:
    """None lost, statuses as expected, failures.jsonl = the corrupt clips, nothing left."""
    status = {video["id"]: video["status"] for video in summary["videos"]}
    lost = [
        name
        for name, frames in clips["good"].items()
        if not (out / name / MANIFEST_NAME).is_file()
        or len(list((out / name).glob("*.png"))) != frames
    ]
    wrong_status = sorted(
        name
        for name in clips["good"]
        if status.get(name) != ("reused" if name in reused else "propagated")
    )
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    return {
        "lost": lost,
        "wrong_status": wrong_status,
        "failures_jsonl": {f["id"]: f["error"] for f in failures},
        "failures_are_the_corrupt_clips": sorted(f["id"] for f in failures) == sorted(clips["bad"]),
        "corrupt_without_folder": all(not (out / name).exists() for name in clips["bad"]),
        "left_behind_at_end": leftovers(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--corrupt", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--short-side", type=int, default=240)
    parser.add_argument("--backbone", default="dino_vos_tiny")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--skip-clean", action="store_true", help="only the kill/resume runs")
    parser.add_argument("--signals", default="SIGTERM,SIGKILL")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        clips = make_clips(root / "clips", args.clips, args.corrupt, (240, 320))
        report: dict[str, Any] = {
            "clips": args.clips,
            "frames": sum(clips["good"].values()),
            "corrupt": clips["bad"],
            "frame_size": [240, 320],
            "backbone": args.backbone,
            "short_side": args.short_side,
            "workers": args.workers,
            "cpu_count": os.cpu_count(),
            "generate_seconds": round(time.perf_counter() - began, 1),
        }
        jobs, log = root / "clips" / "jobs.csv", root / "batch.log"
        if not args.skip_clean:
            report["clean"] = run_clean(jobs, root / "clean", args, clips, log)
        for name in args.signals.split(","):
            signum = getattr(signal, name.strip().upper())
            out = root / f"killed-{signal.Signals(signum).name.lower()}"
            report[signal.Signals(signum).name.lower()] = run_killed(
                jobs, out, args, clips, log, signum
            )
        report["log"] = str(log) if args.keep else None
        print(json.dumps(report, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
