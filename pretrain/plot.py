"""Training curves from the JSON-lines log: loss, collapse diagnostics, schedules, speed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dino_vos.atomic import atomic_path
from dino_vos.errors import InputError


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``log.jsonl`` (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"log file not found: {path} (give RUN_DIR/log.jsonl)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_log(log_path: str | Path, out_path: str | Path) -> Path:
    """Draw the curves of ``log_path`` into an image file (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r for r in records if r.get("type") == "step"]
    if not steps:
        raise InputError(f"{log_path} has no training steps to plot")
    out_dims = [r["out_dim"] for r in records if r.get("type") == "start"]
    x = [r["step"] for r in steps]
    panels: list[tuple[str, list[str]]] = [
        ("DINO loss", ["loss"]),
        ("teacher entropy", ["entropy"]),
        ("KL(teacher || student)", ["kl"]),
        ("learning rate / weight decay", ["lr", "wd"]),
        ("teacher momentum / temperature", ["momentum", "teacher_temp"]),
        ("images/s", ["images_per_s"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        lines = []
        axes_for_keys = [ax, ax.twinx()] if len(keys) > 1 else [ax]
        for index, (key, axis) in enumerate(zip(keys, axes_for_keys, strict=True)):
            values = [r.get(key, math.nan) for r in steps]
            lines += axis.plot(x, values, color=f"C{index}", label=key)
            axis.set_ylabel(key)
        if keys == ["entropy"] and out_dims:
            lines.append(ax.axhline(math.log(out_dims[-1]), color="grey", ls="--", label="log K"))
            lines.append(ax.axhline(0.0, color="black", lw=0.8, label="0 (one-hot)"))
        if len(lines) > 1:
            ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"DINO pretraining: {Path(log_path).parent.name}")
    fig.tight_layout()
    out_path = Path(out_path)
    supported = fig.canvas.get_supported_filetypes()
    if out_path.suffix.lstrip(".").lower() not in supported:
        plt.close(fig)
        raise InputError(f"cannot write {out_path}: use one of .{', .'.join(sorted(supported))}")
    try:
        with atomic_path(out_path, suffix=out_path.suffix) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out_path
