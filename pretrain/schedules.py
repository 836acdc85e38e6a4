"""Per-iteration schedules: cosine with linear warm-up (lr, weight decay, teacher momentum)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per iteration: linear warm-up to ``base_value``, then cosine to ``final_value``.

    The warm-up is ``linspace(start, base, warmup_iters)`` (its last value is ``base_value``) and
    the cosine runs over the remaining iterations, as in the DINO reference.
    """
    total = epochs * iters_per_epoch
    warmup_iters = min(warmup_epochs * iters_per_epoch, total)
    warmup: np.ndarray | list[float] = []
    if warmup_iters:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * steps / max(len(steps), 1))
    )
    schedule = np.concatenate((np.asarray(warmup, dtype=np.float64), cosine))
    assert len(schedule) == total
    return schedule


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int
) -> np.ndarray:
    """One teacher temperature per epoch: linear ``warmup_temp -> temp``, then constant."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate(
        (np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp))
    )
