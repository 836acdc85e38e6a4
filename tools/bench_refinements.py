"""Training-free refinements (docs/protocol.md#refinements) measured with ``eval davis``.

    python tools/bench_refinements.py --out /tmp/refine [--max-frames 30] \\
        [--backbones dino_vos_tiny,dino_vits8:random] [--short-sides 240] [--variants ...]

Runs ``dino-vos eval davis --davis-root ../shared/data/davis2016-val-dev --split val`` once per
(backbone, short side, variant): the reference protocol (``dino``), the presets ``crw`` and
``vfs``, ``--upsample guided`` and ``--shift-ensemble 2``. Variants that only change propagation
share one feature cache per backbone and short side (the first, ``dino``, fills it); shift
ensembling changes the features and gets its own cache, so its seconds per frame include its 4
forwards. Prints a JSON list: option, backbone, short side, J&F / J / F, seconds per frame and
whether the features were computed (``cold``) or read from the cache (``cached``).

``--tune-guided SEQS`` instead scores ``--upsample guided`` for several eps (and radius = patch)
on DAVIS-2016 *train* sequences (240p), never on val, against bilinear, sharing one cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VAL_DEV = SHARED / "davis2016-val-dev"
TRAIN = SHARED / "davis2016-train-240p"
GUIDED_EPS = (1e-2, 3e-3, 1e-3, 1e-4)
#: name -> (extra options, cache folder)
VARIANTS: dict[str, tuple[list[str], str]] = {
    "dino (reference)": ([], "plain"),
    "--preset crw": (["--preset", "crw"], "plain"),
    "--preset vfs": (["--preset", "vfs"], "plain"),
    "--upsample guided": (["--upsample", "guided"], "plain"),
    "--shift-ensemble 2": (["--shift-ensemble", "2"], "shift2"),
}


def backbone_args(backbone: str) -> list[str]:
    """``name`` or ``name:random`` (random init, seed 0) as ``eval davis`` options."""
    name, _, mode = backbone.partition(":")
    return ["--backbone", name, *(["--random-init"] if mode == "random" else [])]


def run_variant(
    out: Path,
    backbone: str,
    short_side: int,
    variant: str,
    max_frames: int | None,
    sequences: str | None = None,
) -> dict:
    """One ``eval davis`` run; its row of the table."""
    extra, cache = VARIANTS[variant]
    tag = f"{backbone.replace(':', '-')}-{short_side}"
    name = extra[-1] if extra else "dino"
    run_dir = out / tag / (f"{name}-{sequences.replace(',', '+')}" if sequences else name)
    command = [
        sys.executable, "-m", "dino_vos", "eval", "davis", "--davis-root", str(VAL_DEV),
        "--split", "val", "--out", str(run_dir), "--cache", str(out / tag / f"cache-{cache}"),
        "--short-side", str(short_side), *backbone_args(backbone), *extra,
        *(["--max-frames", str(max_frames)] if max_frames else []),
        *(["--sequences", sequences] if sequences else []),
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    payload = json.loads((run_dir / "davis_results-val.json").read_text())
    scores, timing = payload["global"], payload["timing"]
    return {
        "option": variant,
        "backbone": backbone,
        "short_side": short_side,
        "J&F": round(scores["J&F-Mean"], 4),
        "J": round(scores["J-Mean"], 4),
        "F": round(scores["F-Mean"], 4),
        "seconds_per_frame": timing["seconds_per_frame"],
        "features": "cached" if payload["cache"]["misses"] == 0 else "cold",
        "max_frames": max_frames,
        "sequences": sequences or "all",
        "command": " ".join(command[1:]),
    }


def tune_guided(out: Path, backbone: str, sequences: str, max_frames: int | None) -> list[dict]:
    """J&F of bilinear and of guided upsampling for each eps in :data:`GUIDED_EPS` on train."""
    from dino_vos.console import console
    from dino_vos.eval.vos.davis_job import DavisJob, run_davis
    from dino_vos.spec import BackboneSpec, PropagationConfig, ResizeSpec

    console.quiet = True
    name, _, mode = backbone.partition(":")
    spec = BackboneSpec(name, random_init=mode == "random", resize=ResizeSpec(240), device="cpu")
    configs = {"bilinear": PropagationConfig()}
    configs |= {
        f"guided eps={e:g}": PropagationConfig(upsample="guided", guided_eps=e) for e in GUIDED_EPS
    }
    rows = []
    for label, config in configs.items():
        run_dir = out / "tune" / backbone.replace(":", "-") / label.replace(" ", "_")
        job = DavisJob(
            TRAIN, split="train", resolution="240p", sequences=tuple(sequences.split(",")),
            spec=spec, config=config, out_dir=run_dir, cache_dir=out / "tune" / "cache",
            max_frames=max_frames,
        )  # fmt: skip
        run_davis(job)
        scores = json.loads((run_dir / "davis_results-train.json").read_text())["global"]
        row = {"upsample": label, "backbone": backbone, "J&F": round(scores["J&F-Mean"], 4),
               "J": round(scores["J-Mean"], 4), "F": round(scores["F-Mean"], 4)}  # fmt: skip
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Runs and caches go here.")
    parser.add_argument("--backbones", default="dino_vos_tiny,dino_vits8:random")
    parser.add_argument("--short-sides", default="240")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated names.")
    parser.add_argument("--max-frames", type=int, default=None, help="Same for every row.")
    parser.add_argument("--sequences", default=None, help="Comma-separated subset of val-dev.")
    parser.add_argument("--tune-guided", metavar="SEQS", default=None, help="Train sequences.")
    args = parser.parse_args()
    if args.tune_guided:
        backbone = args.backbones.split(",")[0]
        print(
            json.dumps(tune_guided(args.out, backbone, args.tune_guided, args.max_frames), indent=1)
        )
        return
    rows = []
    for backbone in args.backbones.split(","):
        for short_side in (int(s) for s in args.short_sides.split(",")):
            for variant in args.variants.split(","):
                row = run_variant(
                    args.out, backbone, short_side, variant, args.max_frames, args.sequences
                )
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
