"""Long videos in bounded memory and disk (docs/protocol.md#keyframes); prints JSON.

A generated clip (``make_clip``, 2 objects, 48 distinct frames) looped back and forth into an
mp4 (MPEG-4 part 2) of the longest ``--lengths`` (default 1,000 / 5,000 / 10,000 frames) at
``--height`` (default 480: 854 x 480), then propagated with the shipped backbone
(``dino_vos_tiny``) at ``--short-side`` (default 240) on one CPU thread, for each length
(the first N frames of the video):

- ``forward``: from frame 0;
- ``both-ends``: ``--direction both`` with keyframes at the first and the last frame only;
- ``both-every-100``: ``--direction both`` with keyframes every 100 frames and the last one.

Every (run, length) goes in its own process and reports: peak resident memory (``ru_maxrss``,
model included), resident memory at each tenth of the frames, the peak bytes in the temporary
store against ``--store-budget``, wall and CPU seconds per frame (model loading excluded; on a
shared machine the CPU seconds are the comparable number) and backbone forwards per frame
(above 1 when features that did not fit the budget are computed again).
The engine's results are consumed and dropped (no PNG writing), so the numbers are those of
decoding, backbone and propagation.

    python tools/bench_scale.py                                  # the full run (hours on CPU)
    python tools/bench_scale.py --lengths 100,300,600 --short-side 120 --store-budget 24MB
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RUNS = ("forward", "both-ends", "both-every-100")
DISTINCT_FRAMES = 48


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _looped(index: int) -> int:
    """Frame of the generated clip shown at ``index`` of the back-and-forth loop."""
    period = 2 * DISTINCT_FRAMES - 2
    position = index % period
    return position if position < DISTINCT_FRAMES else period - position


def make_video(folder: Path, num_frames: int, height: int) -> tuple[Path, Path]:
    """The looped mp4 and a folder of the clip's masks (``<k>.png``)."""
    import cv2

    from dino_vos.masks import write_indexed_png
    from dino_vos.synthetic import make_clip

    width = round(height * 854 / 480) // 2 * 2
    clip = make_clip(DISTINCT_FRAMES, (height, width), num_objects=2, seed=0)
    masks = folder / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for k, mask in enumerate(clip.masks):
        write_indexed_png(masks / f"{k}.png", mask)
    video = folder / f"loop-{num_frames}-{height}p.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (width, height))
    bgr = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2BGR) for f in clip.frames]
    for index in range(num_frames):
        writer.write(bgr[_looped(index)])
    writer.release()
    return video, masks


def keyframes_of(run: str, num_frames: int) -> list[int]:
    last = num_frames - 1
    if run == "forward":
        return [0]
    if run == "both-ends":
        return [0, last]
    return sorted({*range(0, num_frames, 100), last})


def worker(args: argparse.Namespace) -> dict:
    """One (run, length) in this process."""
    import torch

    import dino_vos.frame_store as frame_store
    from dino_vos.masks import read_mask
    from dino_vos.predictor import VideoPropagator
    from dino_vos.sources import open_source
    from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec

    torch.set_num_threads(1)
    peaks: list[int] = []
    close = frame_store.FrameStore.close

    def recording_close(store: frame_store.FrameStore) -> None:
        peaks.append(store.peak)
        close(store)

    frame_store.FrameStore.close = recording_close  # type: ignore[method-assign]
    features = BackboneSpec(
        "dino_vos_tiny", resize=ResizeSpec(args.short_side), device="cpu"
    ).build()
    forwards = [0]
    embed = features.embed

    def counting_embed(batch: torch.Tensor) -> torch.Tensor:
        forwards[0] += batch.shape[0]
        return embed(batch)

    features.embed = counting_embed  # type: ignore[method-assign]
    source = open_source(args.video, limit=args.length)
    predictor = VideoPropagator(features, PropagationConfig())
    state = predictor.init_state(source)
    keyframes = keyframes_of(args.run, args.length)
    for index in keyframes:
        predictor.add_mask(state, index, read_mask(Path(args.masks) / f"{_looped(index)}.png"))
    direction = "forward" if args.run == "forward" else "both"
    rss_at: dict[str, float] = {}
    marks = {max(1, args.length * tenth // 10): tenth for tenth in range(1, 11)}
    done = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in predictor.propagate(
        state, direction=direction, store_budget=args.store_budget, store_dir=args.store_dir
    ):
        done += 1
        if done in marks:
            rss_at[f"{marks[done] * 10}%"] = round(_rss_mib(), 1)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    return {
        "run": args.run,
        "frames": done,
        "keyframes": len(keyframes),
        "seconds_per_frame": round(seconds / done, 4),
        "cpu_seconds_per_frame": round(cpu_seconds / done, 4),
        "backbone_forwards_per_frame": round(forwards[0] / done, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_mib_at": rss_at,
        "peak_store_mb": round(max(peaks, default=0) / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000,5000,10000", help="frame counts to run")
    parser.add_argument("--height", type=int, default=480, help="video height (854x480 at 480)")
    parser.add_argument("--short-side", type=int, default=240, help="network input short side")
    parser.add_argument("--store-budget", default="4GB", help="--store-budget of the runs")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}")
    parser.add_argument("--work", type=Path, default=None, help="folder for the video (temp)")
    parser.add_argument("--worker", dest="run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    parser.add_argument("--masks", help=argparse.SUPPRESS)
    parser.add_argument("--store-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from dino_vos.sizes import parse_size

    if args.run:
        args.store_budget = parse_size(args.store_budget)
        print(json.dumps(worker(args)))
        return
    lengths = sorted(int(n) for n in args.lengths.split(","))
    runs = [r for r in args.runs.split(",") if r]
    if not set(runs) <= set(RUNS):
        parser.error(f"--runs: choose among {', '.join(RUNS)}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.work) as tmp:
        started = time.perf_counter()
        video, masks = make_video(Path(tmp), lengths[-1], args.height)
        report: dict = {
            "video": {
                "frames": lengths[-1],
                "size": f"{round(args.height * 854 / 480) // 2 * 2}x{args.height}",
                "codec": "mp4v",
                "content": f"generated clip of {DISTINCT_FRAMES} frames looped back and forth",
                "bytes": video.stat().st_size,
                "seconds_to_write": round(time.perf_counter() - started, 1),
            },
            "backbone": "dino_vos_tiny",
            "short_side": args.short_side,
            "store_budget_bytes": parse_size(args.store_budget),
            "threads": 1,
            "runs": {},
        }
        for run in runs:
            rows = []
            for length in lengths:
                command = [
                    sys.executable, __file__, "--worker", run, "--length", str(length),
                    "--video", str(video), "--masks", str(masks), "--short-side",
                    str(args.short_side), "--store-budget", args.store_budget,
                    "--store-dir", tmp,
                ]  # fmt: skip
                env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                output = subprocess.run(
                    command, capture_output=True, text=True, check=True,
                    env={**_environ(), **env},
                ).stdout  # fmt: skip
                row = json.loads(output.strip().splitlines()[-1])
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            report["runs"][run] = rows
        report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["growth"] = {
        run: {
            "peak_rss_mib": [row["peak_rss_mib"] for row in rows],
            "peak_store_mb": [row["peak_store_mb"] for row in rows],
            "frames": [row["frames"] for row in rows],
        }
        for run, rows in report["runs"].items()
    }
    print(json.dumps(report, indent=2))


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    main()
