"""Data-parallel training equals one worker: two real torch DDP workers (gloo, CPU) on the two halves of
each step's global batch give the losses and weights one worker gives on the whole batch, with lr > 0
and every layer training; the same two workers without the gradient all-reduce do not."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cliquecnn_ray import network, training

K, SIZE, M, STEPS, LR = 6, 32, 16, 5, 0.01
ATOL = 1e-5  # float32 sums in another order: 1e-7-ish per step; a missing all-reduce moves weights ~1e-3


class GlobalBatch:
    """Each step's draw of the real sampler for one worker (the global batch), cut into equal consecutive
    parts, one per worker: the workers of a step together see exactly what one worker sees."""

    def __init__(self, sampler: training.CliqueBatchSampler):
        self.sampler, self.seed = sampler, sampler.seed

    def draw(self, step: int, rank: int = 0, world_size: int = 1):
        rows, targets, batch_cliques = self.sampler.draw(step, 0, 1)
        part = len(rows) // world_size
        return rows[rank * part : (rank + 1) * part], targets[rank * part : (rank + 1) * part], batch_cliques


def _data() -> tuple[torch.Tensor, GlobalBatch]:
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.integers(0, 256, size=(K * 5, 1, SIZE, SIZE), dtype=np.uint8))
    clique_rows = [np.arange(k * 5, k * 5 + 5) for k in range(K)]
    batches = np.array([[0, 1, 2], [3, 4, 5], [0, 2, 4], [1, 3, 5]])
    return images, GlobalBatch(training.CliqueBatchSampler(batches, clique_rows, images_per_step=M, seed=7))


def _network() -> nn.Module:
    """The real network without the two things that depend on how a batch is split, not on its images:
    BatchNorm's batch statistics (per worker under DDP; CPU has no SyncBatchNorm) and dropout masks (drawn
    per worker). Every convolution and linear layer stays and trains."""
    torch.manual_seed(0)
    model = network.build_model("alexnet_small", K, SIZE, 1)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.Dropout):
                child.p = 0.0
    return model


def _train(model: nn.Module, rank: int, world: int) -> tuple[list[float], dict]:
    images, batches = _data()
    optimizer = training.make_optimizer(training.head_param_groups(model), "adagrad", LR, weight_decay=5e-4)
    losses = training.run_steps(model, optimizer, images, batches, 0, STEPS, rank, world, augment_params=None)
    return losses, {k: v.detach().clone() for k, v in network.unwrap(model).state_dict().items()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for mode in ("all-reduce", "no all-reduce"):
            model = DistributedDataParallel(_network())
            with model.no_sync() if mode == "no all-reduce" else contextlib.nullcontext():
                results[mode] = _train(model, rank, world)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_equal_one_worker_on_the_same_global_batch(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        initial = _network().state_dict()
        one_losses, one_state = _train(_network(), 0, 1)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # The step losses: each worker's loss is the mean over its half, so their mean is the global batch's.
    two_losses = np.mean([ranks[r]["all-reduce"][0] for r in range(2)], axis=0)
    np.testing.assert_allclose(two_losses, one_losses, atol=ATOL)
    assert len(set(np.round(one_losses, 4))) > 1  # the loss moved: lr > 0 trains
    for name, weights in one_state.items():
        moved = (weights - initial[name]).abs().max().item()
        if name.endswith("weight"):
            assert moved > 100 * ATOL, f"{name} did not train"
        for r in range(2):
            got = ranks[r]["all-reduce"][1][name]
            assert torch.allclose(got, weights, atol=ATOL, rtol=1e-4), (name, r, (got - weights).abs().max().item())

    # Without the all-reduce each worker follows its own half: the comparison above would catch it.
    broken = max((ranks[0]["no all-reduce"][1][n] - w).abs().max().item() for n, w in one_state.items())
    assert broken > 100 * ATOL
    assert ranks[0]["no all-reduce"][0] != pytest.approx(ranks[1]["no all-reduce"][0], abs=ATOL)
