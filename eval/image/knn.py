"""Weighted k-NN classification of frozen backbone features (``docs/protocol.md#image-baselines``).

Protocol: images resized to 256 (bicubic) and center-cropped to 224, CLS token of the last
block after the final norm, L2-normalised; for each val image the k most cosine-similar train
images vote for their class with weight ``exp(sim / 0.07)``. All k are scored from one
neighbour search. Similarities are computed chunk by chunk so that the (val x train) matrix
never exceeds a memory budget. Ties are resolved deterministically: among equally similar
neighbours the lower train index is taken first, among classes with equal scores the lower
class index ranks first (so chunking never changes the results). The features come from
:mod:`dino_vos.eval.image.image_features`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dino_vos.defaults import KNN_KS, KNN_MEMORY_BUDGET_MB, KNN_TEMPERATURE
from dino_vos.errors import InputError

#: Bytes held per (val, train) pair while a chunk is ranked: similarity + sorted value + index.
BYTES_PER_PAIR = 16


@dataclass(frozen=True)
class KNNScore:
    """Accuracy (percent) for one k; ``k_used`` is k capped by the training-set size."""

    k: int
    k_used: int
    top1: float
    top5: float


def chunk_sizes(num_test: int, num_train: int, k: int, memory_budget_mb: float) -> tuple[int, int]:
    """(val rows, train columns) per similarity chunk so that a chunk fits the budget."""
    pairs = max(1, int(memory_budget_mb * 2**20) // BYTES_PER_PAIR)
    test_chunk = max(1, min(num_test, pairs // max(1, num_train)))
    train_chunk = max(1, min(num_train, max(k, pairs // test_chunk)))
    return test_chunk, train_chunk


def _sorted_desc(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sort(values, dim=1, descending=True, stable=True)


def nearest_neighbours(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    memory_budget_mb: float = KNN_MEMORY_BUDGET_MB,
    chunks: tuple[int, int] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (val rows, top-k similarities, train indices) per val chunk, most similar first.

    ``chunks`` forces (val rows, train columns) per chunk instead of the memory budget.
    """
    num_test, num_train = len(test), len(train)
    k = min(k, num_train)
    test_chunk, train_chunk = chunks or chunk_sizes(num_test, num_train, k, memory_budget_mb)
    for start in range(0, num_test, test_chunk):
        rows = slice(start, min(num_test, start + test_chunk))
        best_sim = test.new_zeros((rows.stop - rows.start, 0))
        best_idx = torch.zeros_like(best_sim, dtype=torch.long)
        for col in range(0, num_train, train_chunk):
            sim = test[rows] @ train[col : col + train_chunk].T
            sim, idx = _sorted_desc(sim)
            # Earlier candidates have lower train indices: a stable sort keeps them first on ties.
            best_sim = torch.cat([best_sim, sim[:, :k]], dim=1)
            best_idx = torch.cat([best_idx, idx[:, :k] + col], dim=1)
            best_sim, order = _sorted_desc(best_sim)
            best_sim, best_idx = best_sim[:, :k], best_idx.gather(1, order)[:, :k]
        yield rows, best_sim, best_idx


def weighted_vote(
    similarities: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """Class scores (B, C): sum of exp(sim / T) over the neighbours of each class."""
    weights = (similarities / temperature).exp()
    scores = weights.new_zeros((len(weights), num_classes))
    return scores.scatter_add_(1, neighbour_labels, weights)


def rank_classes(scores: torch.Tensor, top: int = 5) -> torch.Tensor:
    """Top ``top`` class indices per row, best first; equal scores rank the lower index first."""
    return _sorted_desc(scores)[1][:, : min(top, scores.shape[1])]


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    memory_budget_mb: float = KNN_MEMORY_BUDGET_MB,
    chunks: tuple[int, int] | None = None,
) -> dict[int, torch.Tensor]:
    """Top-5 class predictions (N_test, min(5, C)) for every k, from one neighbour search.

    Features must be L2-normalised (the dot product is the cosine similarity).
    """
    if len(train_features) == 0:
        raise InputError("k-NN needs at least one training image")
    if not ks or min(ks) < 1:
        raise InputError(f"k values must be positive integers, got {list(ks)}")
    k_max = min(max(ks), len(train_features))
    top = min(5, num_classes)
    predictions = {k: torch.zeros((len(test_features), top), dtype=torch.long) for k in ks}
    train_labels = train_labels.to(train_features.device)
    neighbours = nearest_neighbours(train_features, test_features, k_max, memory_budget_mb, chunks)
    for rows, sims, idx in neighbours:
        labels = train_labels[idx]
        for k in ks:
            used = min(k, k_max)
            scores = weighted_vote(sims[:, :used], labels[:, :used], num_classes, temperature)
            predictions[k][rows] = rank_classes(scores, top).cpu()
    return predictions


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent of ranked predictions (N, >=1)."""
    if len(targets) == 0:
        return 0.0, 0.0
    hits = predictions.eq(targets.view(-1, 1).to(predictions.device))
    top1 = hits[:, :1].any(dim=1).float().mean().item()
    top5 = hits[:, :5].any(dim=1).float().mean().item()
    return 100.0 * top1, 100.0 * top5


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    memory_budget_mb: float = KNN_MEMORY_BUDGET_MB,
    chunks: tuple[int, int] | None = None,
) -> list[KNNScore]:
    """L2-normalise the features and score top-1/top-5 for every k (sorted ascending)."""
    ks = sorted(set(ks))
    predictions = knn_predict(
        F.normalize(train_features.float(), dim=1),
        train_labels,
        F.normalize(test_features.float(), dim=1),
        num_classes,
        ks,
        temperature,
        memory_budget_mb,
        chunks,
    )
    k_cap = len(train_features)
    return [KNNScore(k, min(k, k_cap), *accuracy(predictions[k], test_labels)) for k in ks]
