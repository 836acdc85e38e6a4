"""Weighted k-NN vote, chunking, sharding and the feature cache of the image baselines."""

from __future__ import annotations

import math
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_vos.distributed import gather_shards, shard_range
from dino_vos.eval.image.knn import BYTES_PER_PAIR, chunk_sizes, knn_evaluate, knn_predict


def unit(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles (cosine similarity = cos of the gap)."""
    radians = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1).float()


def test_weighted_vote_known_answer():
    # One exact match of class 0 (sim 1) against two class-1 neighbours at sim 0.8.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    # T = 0.07: e^(1/0.07) = 1.6e6 beats 2 e^(0.8/0.07) = 1.8e5 -> class 0.
    sharp = knn_predict(train, labels, test, num_classes=2, ks=[1, 3], temperature=0.07)
    assert sharp[1][0].tolist() == [0, 1]
    assert sharp[3][0].tolist() == [0, 1]
    # T = 1: e^1 = 2.72 loses to 2 e^0.8 = 4.45 -> class 1 wins once k reaches 3.
    soft = knn_predict(train, labels, test, num_classes=2, ks=[1, 2, 3], temperature=1.0)
    assert soft[1][0].tolist() == [0, 1]
    assert soft[2][0].tolist() == [0, 1]  # e^1 vs e^0.8
    assert soft[3][0].tolist() == [1, 0]


def test_ties_between_classes_rank_the_lower_class_first():
    # Two neighbours at exactly the same similarity, of classes 2 and 1.
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    labels = torch.tensor([2, 1, 0])
    predictions = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), num_classes=3, ks=[2])
    assert predictions[2][0].tolist() == [1, 2, 0]


def test_ties_between_neighbours_take_the_lower_train_index():
    # Identical training features with different labels: k=1 keeps the first one (label 1).
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 2])
    test = torch.tensor([[1.0, 0.0]])
    for chunks in (None, (1, 1), (1, 2)):
        predictions = knn_predict(train, labels, test, 3, ks=[1], chunks=chunks)
        assert predictions[1][0, 0].item() == 1


def test_k_larger_than_training_set_is_capped_and_reported():
    train = unit(0, 10, 180)
    labels = torch.tensor([0, 0, 1])
    test = unit(5, 175)
    scores = knn_evaluate(train, labels, test, torch.tensor([0, 1]), num_classes=2, ks=[200, 3])
    assert [(s.k, s.k_used) for s in scores] == [(3, 3), (200, 3)]
    # Every query sees all 3 neighbours; the closest class dominates through exp(sim / 0.07).
    assert scores[0].top1 == scores[1].top1 == 100.0
    assert scores[0].top5 == 100.0
    few = knn_predict(train, labels, test, 2, ks=[200])
    assert few[200].tolist() == [[0, 1], [1, 0]]


def test_top1_and_top5_accuracy_on_a_known_set():
    train = unit(0, 60, 120, 180, 240, 300)
    labels = torch.arange(6)
    test = unit(1, 61, 119, 200)
    # Query 3 (119 deg) votes for class 2 first, its target 3 is in the top-5; query 4
    # (200 deg, target 5) ranks the voted classes 3 (and 4), then the others by index: 5 is
    # sixth. So 2 of 4 are right at top-1 and 3 of 4 at top-5, for k = 1 and k = 2.
    targets = torch.tensor([0, 1, 3, 5])
    scores = knn_evaluate(train, labels, test, targets, num_classes=6, ks=[1, 2])
    assert [(s.top1, s.top5) for s in scores] == [(50.0, 75.0), (50.0, 75.0)]
    ranked = knn_predict(train, labels, test, 6, ks=[2])[2]
    assert ranked[3].tolist() == [3, 4, 0, 1, 2]


def test_chunking_does_not_change_results():
    generator = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(97, 16, generator=generator), dim=1)
    train[50:60] = train[:10]  # exact duplicates create ties between neighbours
    labels = torch.randint(0, 7, (97,), generator=generator)
    test = torch.nn.functional.normalize(torch.randn(41, 16, generator=generator), dim=1)
    test[:5] = train[:5]
    ks = [1, 5, 10, 20, 100, 200]
    full = knn_predict(train, labels, test, 7, ks, chunks=(41, 97))
    for chunks in [(1, 1), (5, 13), (41, 7), (3, 97)]:
        chunked = knn_predict(train, labels, test, 7, ks, chunks=chunks)
        for k in ks:
            assert torch.equal(chunked[k], full[k]), (chunks, k)
    budgeted = knn_predict(train, labels, test, 7, ks, memory_budget_mb=0.01)
    for k in ks:
        assert torch.equal(budgeted[k], full[k])


def test_chunk_sizes_fit_the_memory_budget():
    budget_mb = 1.0
    budget = budget_mb * 2**20
    rows, cols = chunk_sizes(10_000, 1_000, k=200, memory_budget_mb=budget_mb)
    assert rows * cols * BYTES_PER_PAIR <= budget and cols == 1_000 and rows > 1
    rows, cols = chunk_sizes(10_000, 1_000_000, k=200, memory_budget_mb=budget_mb)
    assert rows == 1 and cols * BYTES_PER_PAIR <= budget and cols >= 200
    assert chunk_sizes(3, 5, k=200, memory_budget_mb=512) == (3, 5)


def test_shard_ranges_cover_every_item_once():
    for total, world in [(10, 3), (2, 3), (7, 1), (0, 2), (8, 4)]:
        items = [i for rank in range(world) for i in shard_range(total, rank, world)]
        assert items == list(range(total))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gather_worker(rank: int, world: int, port: int, total: int, queue) -> None:
    torch.set_num_threads(1)  # forked child: keep OpenMP out of it, as DataLoader workers do
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        block = shard_range(total, rank, world)
        local = torch.arange(total, dtype=torch.float32)[list(block)].view(-1, 1).repeat(1, 3)
        queue.put((rank, gather_shards(local, total).tolist()))
    finally:
        dist.destroy_process_group()


def test_gather_shards_with_two_gloo_processes():
    total, world = 5, 2
    context = mp.get_context("fork")
    queue = context.Queue()
    mp.start_processes(
        _gather_worker, args=(world, _free_port(), total, queue), nprocs=world,
        start_method="fork",
    )  # fmt: skip
    expected = torch.arange(total, dtype=torch.float32).view(-1, 1).repeat(1, 3).tolist()
    results = dict(queue.get(timeout=30) for _ in range(world))
    assert results == {0: expected, 1: expected}
