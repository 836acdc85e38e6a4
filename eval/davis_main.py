"""The work behind ``dino-vos eval davis`` (kept out of the click module so ``--help`` is fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dino_vos import __version__
from dino_vos.cli import load_backbone_from_options
from dino_vos.console import console, progress_bar
from dino_vos.errors import InputError
from dino_vos.features import BackboneFeatures
from dino_vos.masks import atomic_write_bytes
from dino_vos.propagation import PropagationConfig
from eval.davis import (
    BackboneSpec,
    DavisRun,
    RunSettings,
    distributed_env,
    evaluate_davis,
    rank_device,
    shard_sequences,
)
from eval.davis_data import DavisDataset
from eval.davis_metrics import BOUNDARY_THRESHOLD, global_statistics
from eval.davis_report import (
    global_csv,
    output_paths,
    per_sequence_csv,
    plot_per_object,
    print_tables,
    write_json,
)


def _check_mode(options: dict[str, Any]) -> None:
    if options["results_dir"] is not None:
        given = [
            flag
            for flag, key in (
                ("--backbone", "backbone"),
                ("--weights", "weights"),
                ("--random-init", "random_init"),
                ("--cache", "cache_dir"),
            )
            if options[key]
        ]
        if given:
            raise InputError(
                f"--results only scores existing masks: drop {', '.join(given)} (or drop "
                "--results to propagate)"
            )
        if not options["results_dir"].is_dir():
            raise InputError(f"results folder not found: {options['results_dir']}")
    elif options["out_dir"] is None:
        raise InputError("give --out DIR to propagate and score, or --results DIR to only score")


def _load_features(options: dict[str, Any]) -> tuple[BackboneFeatures, BackboneSpec]:
    spec = BackboneSpec(
        backbone=options["backbone"],
        weights=str(options["weights"]) if options["weights"] else None,
        checkpoint_key=options["checkpoint_key"],
        random_init=options["random_init"],
        pos_embed=options["pos_embed"],
        device=options["device"],
        seed=options["seed"],
        short_side=options["short_side"],
        resize_rule=options["resize_rule"],
    )
    torch.manual_seed(spec.seed)  # random-init weights: the same in every process
    model = load_backbone_from_options(
        options["backbone"],
        options["weights"],
        options["checkpoint_key"],
        options["random_init"],
        options["pos_embed"],
        rank_device(options["device"]),
    )
    return BackboneFeatures(model, spec.resize()), spec


def run_davis_command(**options: Any) -> None:
    """Evaluate (or only score) a DAVIS split and write the reports (rank 0)."""
    _check_mode(options)
    rank, world = distributed_env()
    if rank > 0:
        console.quiet = True
    scoring_only = options["results_dir"] is not None
    names = (
        [n.strip() for n in options["sequences"].split(",") if n.strip()]
        if options["sequences"]
        else None
    )
    dataset = DavisDataset(
        options["davis_root"],
        options["split"],
        options["resolution"],
        options["year"],
        names,
        require_frames=not scoring_only,
        max_frames=options["max_frames"],
    )
    features, spec = (None, None) if scoring_only else _load_features(options)
    config = PropagationConfig(
        topk=options["topk"],
        context=options["context"],
        radius=options["radius"],
        temperature=options["temperature"],
    )
    out_dir: Path = options["out_dir"] or options["results_dir"]
    settings = RunSettings(
        results_dir=options["results_dir"] or options["out_dir"],
        propagate=not scoring_only,
        config=config,
        cache_dir=options["cache_dir"],
        ignore_void=options["ignore_void"],
    )
    frames = sum(len(s.annotations) for s in dataset)
    if names:
        source = "--sequences"
    elif dataset.split_file is not None:
        source = str(dataset.split_file)
    else:
        source = f"no split file: all folders of {dataset.annotations_root}"
    console.print(
        f"DAVIS {options['split']}: {len(dataset)} sequences, {frames} frames ({source})"
        + (f", rank {rank} of {world}" if world > 1 else "")
    )
    shard_frames = sum(len(s.annotations) for s in shard_sequences(dataset.sequences, rank, world))
    with progress_bar("frames") as progress:
        task = progress.add_task("Scoring" if scoring_only else "Propagating", total=shard_frames)
        run = evaluate_davis(
            dataset.sequences,
            settings,
            features,
            spec,
            options["workers"],
            advance=lambda n: progress.advance(task, n),
        )
    if run is None:
        return
    payload = _payload(run, dataset, options, features, config, world)
    _write_outputs(out_dir, dataset.split, run, payload)


def _payload(
    run: DavisRun,
    dataset: DavisDataset,
    options: dict[str, Any],
    features: BackboneFeatures | None,
    config: PropagationConfig,
    world: int,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "dino_vos": __version__,
        "davis_root": str(dataset.root),
        "split": dataset.split,
        "split_file": str(dataset.split_file) if dataset.split_file else None,
        "resolution": dataset.resolution,
        "sequences": dataset.names,
        "max_frames": dataset.max_frames,
        "ignore_void": options["ignore_void"],
        "boundary_threshold": BOUNDARY_THRESHOLD,
        "workers": options["workers"],
        "world_size": world,
    }
    if features is None:
        settings["results_dir"] = str(options["results_dir"])
    else:
        backbone = features.backbone
        settings.update(
            {
                "backbone": backbone.name,
                "weights": backbone.weights_id,
                "weights_fingerprint": run.fingerprint,
                "random_init_seed": options["seed"] if options["random_init"] else None,
                "pos_embed": backbone.pos_embed_mode,
                "resize": features.resize.key(),
                "device": str(backbone.device),
                "propagation": config.to_dict(),
                "cache": str(options["cache_dir"]) if options["cache_dir"] else None,
            }
        )
    objects = run.objects
    frames = run.propagated_frames
    cache = run.cache
    return {
        "global": global_statistics(objects),
        "objects": [obj.to_dict() for obj in objects],
        "sequences": [r.to_dict() for r in run.results],
        "timing": {
            "seconds": round(run.seconds, 3),
            "propagated_frames": frames,
            "propagation_seconds": round(sum(r.seconds for r in run.results), 3),
            "seconds_per_frame": round(run.seconds / frames, 4) if frames else None,
            "skipped_sequences": sum(r.status == "skipped" for r in run.results),
        },
        "cache": (
            {"hits": cache.hits, "misses": cache.misses, "hit_rate": cache.hit_rate}
            if options["cache_dir"]
            else None
        ),
        "settings": settings,
    }


def _write_outputs(out_dir: Path, split: str, run: DavisRun, payload: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, split)
    statistics = payload["global"]
    objects = run.objects
    atomic_write_bytes(paths["global_csv"], global_csv(statistics))
    atomic_write_bytes(paths["per_sequence_csv"], per_sequence_csv(objects))
    write_json(paths["json"], payload)
    plot_per_object(paths["plot"], objects, statistics, f"DAVIS {split}: J and F per object")
    print_tables(statistics, objects, split)
    timing = payload["timing"]
    if timing["propagated_frames"]:
        console.print(
            f"Propagated {timing['propagated_frames']} frames in {timing['seconds']:.1f} s "
            f"({timing['seconds_per_frame']:.3f} s/frame); "
            f"{timing['skipped_sequences']} complete sequence(s) reused"
        )
    elif timing["skipped_sequences"]:
        console.print(f"All {timing['skipped_sequences']} sequences were complete: scores only")
    if payload["cache"] is not None:
        cache = payload["cache"]
        console.print(
            f"Feature cache: {cache['hits']} hits, {cache['misses']} misses "
            f"(hit rate {100 * cache['hit_rate']:.1f}%)"
        )
    console.print(
        f"J&F-Mean [bold]{statistics['J&F-Mean']:.3f}[/] (J {statistics['J-Mean']:.3f}, "
        f"F {statistics['F-Mean']:.3f}); wrote {paths['global_csv'].name}, "
        f"{paths['per_sequence_csv'].name}, {paths['json'].name}, {paths['plot'].name} to {out_dir}"
    )
