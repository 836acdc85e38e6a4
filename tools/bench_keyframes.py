"""Keyframes on real video: objects that enter later, and corrections every N frames.

    python tools/bench_keyframes.py [--backbone dino_vos_tiny] [--short-side 240] [--every 20]

On ``../shared/data/davis2017-schoolgirls-240p`` (80 frames, 7 objects) it propagates:

- ``from_frame_0``: every object from the first mask (the standard protocol);
- ``entering``: two objects left out of the first mask and introduced, alone, at a later frame
  (YouTube-VOS style: each keyframe annotates only its new object). Every object of this
  sequence is visible from frame 0, so the entry frames are chosen (``--enter``), and both runs
  are scored for those objects on the same frames, after their keyframe;
- ``corrections``: the ground truth of every ``--every``-th frame given as a keyframe (for all
  objects), scored on the frames that are not keyframes, against ``from_frame_0`` on the same
  frames.

Prints JSON: J&F-Mean, J-Mean, F-Mean of each comparison and seconds per frame.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dino_vos.eval.davis_metrics import score_frames
from dino_vos.masks import read_mask
from dino_vos.predictor import VideoPropagator
from dino_vos.sources import FolderSource
from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SEQUENCE = SHARED / "davis2017-schoolgirls-240p"
VAL_DEV = SHARED / "davis2016-val-dev"
WALL: list[float] = []  # wall seconds per frame of each run, in order


def run(
    predictor: VideoPropagator,
    source,
    keyframes: dict[int, tuple[np.ndarray, object]],
    direction: str = "forward",
):
    """Labels of every propagated frame (in frame order) and CPU seconds per frame.

    CPU time of the process (all its threads), not wall time: the machines are shared, and
    CPU time compares runs fairly under load (wall time is reported too)."""
    state = predictor.init_state(source)
    for index, (mask, objects) in keyframes.items():
        predictor.add_mask(state, index, mask, objects)
    start, cpu = time.perf_counter(), time.process_time()
    results = sorted(predictor.propagate(state, direction=direction), key=lambda r: r.index)
    labels = np.stack([result.labels for result in results])
    WALL.append((time.perf_counter() - start) / len(labels))
    return labels, (time.process_time() - cpu) / len(labels)


def davis_val_dev(spec: BackboneSpec, every: int) -> dict:
    """eval davis on davis2016-val-dev: standard, --keyframes every:N, and with --direction
    both, sharing one feature cache (the backbone runs once per frame)."""
    import tempfile

    from dino_vos.console import console
    from dino_vos.eval.vos.davis_job import DavisJob, run_davis
    from dino_vos.spec import KeyframeSchedule

    console.quiet = True  # the JSON report is the output
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "forward (standard)": (None, "forward"),
            f"keyframes every:{every}": (KeyframeSchedule(every=every), "forward"),
            f"keyframes every:{every}, both": (KeyframeSchedule(every=every), "both"),
        }
        for name, (keyframes, direction) in variants.items():
            start, cpu = time.perf_counter(), time.process_time()
            job = DavisJob(
                VAL_DEV, split="val", spec=spec, out_dir=Path(tmp) / "out",
                cache_dir=Path(tmp) / "cache", keyframes=keyframes, direction=direction,
            )  # fmt: skip
            run_davis(job)
            payload = json.loads((Path(tmp) / "out" / f"davis_results-{job.report_label}.json")
                                 .read_text())  # fmt: skip
            report[name] = {
                key: round(payload["global"][key], 4) for key in ("J&F-Mean", "J-Mean", "F-Mean")
            } | {
                "wall_seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(time.process_time() - cpu, 1),
            }
    return report


def scores(gt: np.ndarray, pred: np.ndarray, objects: list[int], frames: list[int]) -> dict:
    """J and F of ``objects`` (ids) on ``frames``, averaged over objects then frames."""
    k = int(gt[gt != 255].max())  # every id of the sequence: the metric counts them all
    j, f = score_frames(gt[frames], pred[frames], k)
    j_mean = float(np.mean([j[o - 1].mean() for o in objects]))
    f_mean = float(np.mean([f[o - 1].mean() for o in objects]))
    return {"J&F-Mean": round((j_mean + f_mean) / 2, 4), "J-Mean": round(j_mean, 4),
            "F-Mean": round(f_mean, 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dino_vos_tiny")
    parser.add_argument("--short-side", type=int, default=240)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--enter", default="2:20,6:40", help="object:frame pairs to introduce")
    parser.add_argument("--val-dev", action="store_true", help="also eval davis on val-dev")
    args = parser.parse_args()
    if not SEQUENCE.is_dir():
        print(json.dumps({"skipped": f"real data not found at {SEQUENCE}"}))
        sys.exit(0)
    source = FolderSource(SEQUENCE / "JPEGImages" / "240p" / "schoolgirls")
    gt = np.stack([read_mask(SEQUENCE / "Annotations" / "240p" / "schoolgirls" / f"{f.stem}.png")
                   for f in source.files])  # fmt: skip
    spec = BackboneSpec(args.backbone, resize=ResizeSpec(args.short_side), device="cpu")
    predictor = VideoPropagator(spec.build(), PropagationConfig())
    last = len(gt) - 1
    all_ids = sorted(int(i) for i in np.unique(gt[0]) if i not in (0, 255))

    full, full_spf = run(predictor, source, {0: (gt[0], None)})

    enter = {int(o): int(t) for o, t in (pair.split(":") for pair in args.enter.split(","))}
    first = gt[0].copy()
    first[np.isin(first, list(enter))] = 0
    keyframes = {0: (first, None)}
    for obj, frame in enter.items():
        keyframes[frame] = (np.where(gt[frame] == obj, obj, 0).astype(np.uint8), None)
    entering, entering_spf = run(predictor, source, keyframes)
    entering_report = {}
    for obj, frame in enter.items():
        frames = list(range(frame + 1, last))
        entering_report[str(obj)] = {
            "keyframe": frame,
            "entering": scores(gt, entering, [obj], frames),
            "from_frame_0": scores(gt, full, [obj], frames),
        }
    others = [o for o in all_ids if o not in enter]
    entering_report["other objects, frames 1..N-2"] = {
        "entering": scores(gt, entering, others, list(range(1, last))),
        "from_frame_0": scores(gt, full, others, list(range(1, last))),
    }

    every = {t: (gt[t], all_ids) for t in range(0, len(gt), args.every)}
    corrected, corrected_spf = run(predictor, source, every)
    both, both_spf = run(predictor, source, every, "both")
    between = [t for t in range(1, last) if t not in every]
    report = {
        "sequence": "schoolgirls (80 frames, 7 objects, 432x240)",
        "backbone": spec.name,
        "short_side": args.short_side,
        "entering": entering_report,
        "corrections": {
            "keyframes": sorted(every),
            "corrected": scores(gt, corrected, all_ids, between),
            "corrected, both directions": scores(gt, both, all_ids, between),
            "from_frame_0": scores(gt, full, all_ids, between),
        },
        "seconds_per_frame": {
            "from_frame_0": round(full_spf, 4),
            "entering": round(entering_spf, 4),
            "corrections": round(corrected_spf, 4),
            "corrections, both directions": round(both_spf, 4),
            "both / forward": round(both_spf / corrected_spf, 3),
            "unit": "CPU seconds per frame (process time, all threads)",
            "wall_seconds_per_frame": [round(w, 4) for w in WALL],
        },
    }
    if args.val_dev and VAL_DEV.is_dir():
        report["davis2016-val-dev"] = davis_val_dev(spec, args.every)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
