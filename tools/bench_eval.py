"""Benchmark of ``dino-vos eval davis``; prints one JSON object.

1. Scoring time of the 10 ``davis2016-val-dev`` sequences (ground truth scored against itself,
   and against the masks of run 2), in the current process.
2. A full ``dino-vos eval davis`` run (random-init ViT-S/16, 480 short side by default) with a
   cold feature cache: J&F-Mean and seconds per frame.
3. A second run with the warm cache and another top-k: time and cache hit rate.

    python tools/bench_eval.py [--sequences a,b] [--max-frames 10] [--workers 1] > bench.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "davis2016-val-dev"


def time_scoring(root: Path, results: Path, names: list[str] | None, max_frames: int | None):
    """Seconds to read and score every sequence of ``results`` (one process)."""
    from dino_vos.eval.davis_metrics import global_statistics
    from dino_vos.eval.vos.davis_job import DavisJob
    from dino_vos.eval.vos.davis_sequences import evaluate_davis

    sequences = tuple(names) if names else None
    job = DavisJob(root, sequences=sequences, results_dir=results, max_frames=max_frames)
    dataset = job.dataset()
    start = time.perf_counter()
    run = evaluate_davis(dataset.sequences, job)
    seconds = time.perf_counter() - start
    frames = sum(len(s.scored_stems) for s in dataset)
    return {
        "seconds": round(seconds, 3),
        "sequences": len(dataset),
        "scored_frames": frames,
        "objects": len(run.objects),
        "ms_per_frame": round(1000 * seconds / frames, 2),
        "J&F-Mean": round(global_statistics(run.objects)["J&F-Mean"], 6),
    }


def eval_run(args: argparse.Namespace, out: Path, cache: Path, topk: int) -> dict:
    """One ``dino-vos eval davis`` subprocess; its JSON summary."""
    command = [
        sys.executable, "-m", "dino_vos", "eval", "davis",
        "--davis-root", str(args.davis_root), "--out", str(out), "--cache", str(cache),
        "--backbone", args.backbone, "--random-init", "--short-side", str(args.short_side),
        "--device", args.device, "--workers", str(args.workers), "--topk", str(topk),
    ]  # fmt: skip
    if args.sequences:
        command += ["--sequences", args.sequences]
    if args.max_frames:
        command += ["--max-frames", str(args.max_frames)]
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"eval run failed:\n{process.stderr[-3000:]}")
    data = json.loads((out / "davis_results-val.json").read_text())
    timing, cache_stats = data["timing"], data["cache"]
    return {
        "topk": topk,
        "wall_seconds": round(seconds, 1),
        "run_seconds": timing["seconds"],
        "frames": timing["propagated_frames"],
        "seconds_per_frame": timing["seconds_per_frame"],
        "cache_hits": cache_stats["hits"],
        "cache_misses": cache_stats["misses"],
        "cache_hit_rate": round(cache_stats["hit_rate"], 4),
        **{k: round(v, 4) for k, v in data["global"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--davis-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--backbone", default="dino_vits16")
    parser.add_argument("--short-side", type=int, default=480)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sequences", default=None, help="comma-separated subset")
    parser.add_argument("--max-frames", type=int, default=None, help="frames per sequence")
    parser.add_argument("--second-topk", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep outputs here")
    parser.add_argument("--skip-runs", action="store_true", help="only time scoring")
    args = parser.parse_args()
    if not args.davis_root.is_dir():
        raise SystemExit(f"data not found: {args.davis_root}")
    names = args.sequences.split(",") if args.sequences else None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_eval_"))
    gt = args.davis_root / "Annotations" / "480p"
    report: dict = {
        "davis_root": str(args.davis_root),
        "sequences": args.sequences or "all",
        "max_frames": args.max_frames,
        "scoring_ground_truth": time_scoring(args.davis_root, gt, names, args.max_frames),
    }
    if not args.skip_runs:
        cache = work / "cache"
        report["settings"] = {
            "backbone": f"{args.backbone} (random init, seed 0)",
            "short_side": args.short_side,
            "device": args.device,
            "workers": args.workers,
        }
        report["first_run"] = eval_run(args, work / "run_topk5", cache, 5)
        report["scoring_first_run_masks"] = time_scoring(
            args.davis_root, work / "run_topk5", names, args.max_frames
        )
        report["second_run_cached"] = eval_run(
            args, work / f"run_topk{args.second_topk}", cache, args.second_topk
        )
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
