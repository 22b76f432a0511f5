"""What every training stage shares: the batch sampler, poly LR, the SGD step, checkpoints and resume.

A stage (source, refine, distill) supplies a model, the parameter groups it trains, a loader of batches and a
``compute_loss(batch) -> loss``; :func:`run_loop` does the rest and works the same in one process and on
every Ray Train worker.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from labelshift.config import OptimConfig
from labelshift.train.context import CHECKPOINT_STATE, TrainContext

FINAL_MODEL = "model.safetensors"


class GlobalBatchSampler(Sampler[list[int]]):
    """Each step draws one global batch from a seeded per-epoch permutation; rank r takes its contiguous share.

    The union over ranks of step s is the same set of indices whatever the number of workers, so N workers
    with batch B/N see exactly the data of one worker with batch B. ``set_position`` resumes mid-epoch.
    """

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} workers")
        if num_items < global_batch:
            raise ValueError(f"dataset has {num_items} items, fewer than the global batch {global_batch}")
        self.num_items, self.global_batch = num_items, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = global_batch // world_size
        self.epoch, self.offset = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def set_position(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        return self.steps_per_epoch - self.offset

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        for step in range(self.offset, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.per_rank
            yield order[start:start + self.per_rank].tolist()


def endless_batches(dataset: Dataset, sampler: GlobalBatchSampler, start_step: int, num_workers: int,
                    pin_memory: bool = False) -> Iterator[dict]:
    """Batches forever, starting at global step ``start_step`` (epochs advance the dataset's augmentation seed).
    ``pin_memory``: page-locked batches for faster host-to-GPU copies (training on CUDA)."""
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory)
    epoch, offset = divmod(start_step, sampler.steps_per_epoch)
    while True:
        sampler.set_position(epoch, offset)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch, offset = epoch + 1, 0


def poly_lr(base_lr: float, step: int, total_steps: int, power: float) -> float:
    """``base_lr · (1 − step / total_steps) ** power`` (the reference's poly rule; ``total_steps`` its MAX_ITER)."""
    return base_lr * (1.0 - step / total_steps) ** power


def schedule_horizon(optim: OptimConfig) -> int:
    """The poly schedule's length: ``schedule_iterations`` (the reference's MAX_ITER, beyond the steps trained,
    so the LR stops above 0) or, unset, ``iterations`` (the LR reaches 0 at the last step)."""
    return optim.schedule_iterations or optim.iterations


def make_optimizer(groups: list[tuple[list[nn.Parameter], float]], optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (or Adam) over (params, base LR) groups; each group keeps its base LR in ``initial_lr`` for the poly
    schedule."""
    param_groups = [{"params": params, "lr": lr, "initial_lr": lr} for params, lr in groups if params]
    if optim.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=groups[0][1], weight_decay=optim.weight_decay)
    return torch.optim.SGD(param_groups, lr=groups[0][1], momentum=optim.momentum, weight_decay=optim.weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, optim: OptimConfig) -> None:
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], step, schedule_horizon(optim), optim.poly_power)


def _mean_over_workers(value: torch.Tensor, ctx: TrainContext) -> float:
    value = value.detach().float().reshape(1)
    if ctx.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def _restore(ctx: TrainContext, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the context's latest checkpoint into ``model`` and ``optimizer``; returns its step (0: fresh start)."""
    checkpoint_dir = ctx.latest_checkpoint()
    if checkpoint_dir is None:
        return 0
    try:
        state = torch.load(Path(checkpoint_dir) / CHECKPOINT_STATE, map_location=ctx.device, weights_only=True)
    finally:
        ctx.release_checkpoint()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


@dataclass
class LoopResult:
    steps_run: int
    resumed_from: int
    losses: list[tuple[int, float]]
    seconds: float


def run_loop(ctx: TrainContext, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             make_batches: Callable[[int], Iterator[dict]], compute_loss: Callable[[dict], torch.Tensor],
             optim: OptimConfig, save_final: Callable[[Path], None]) -> LoopResult:
    """Train ``optim.iterations`` steps (resuming from the context's latest checkpoint).

    ``model`` is the unwrapped module whose state is checkpointed; ``compute_loss`` runs the (possibly
    DDP-wrapped) forward. Rank 0 writes ``state.pt`` every ``checkpoint_every`` steps and, at the end, the
    final checkpoint with the model file written by ``save_final(dir)``.

    Every ``log_every``-th step, every checkpoint step and the last one are reported as ``{"step", "loss", "lr"}``
    (the loss averaged over workers), only for steps this call runs; a run restored from its final checkpoint
    reports that checkpoint again as ``{"step"}`` alone.
    """
    start = _restore(ctx, model, optimizer)
    if start >= optim.iterations:  # restored from the final checkpoint: report it again so the caller gets it
        _report_checkpoint(ctx, model, optimizer, start, {"step": start}, save_final)
        return LoopResult(0, start, [], 0.0)
    batches = make_batches(start)
    losses: list[tuple[int, float]] = []
    began = time.perf_counter()
    for step in range(start, optim.iterations):
        set_poly_lr(optimizer, step, optim)
        loss = compute_loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        is_last = done == optim.iterations
        if done % optim.log_every == 0 or done % optim.checkpoint_every == 0 or is_last:
            mean_loss = _mean_over_workers(loss, ctx)
            losses.append((done, mean_loss))
            metrics = {"step": done, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"]}
            if done % optim.checkpoint_every == 0 or is_last:
                _report_checkpoint(ctx, model, optimizer, done, metrics, save_final if is_last else None)
            else:
                ctx.report(metrics)
    return LoopResult(optim.iterations - start, start, losses, time.perf_counter() - began)


def _report_checkpoint(ctx: TrainContext, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                       metrics: dict, save_final: Callable[[Path], None] | None) -> None:
    with tempfile.TemporaryDirectory(prefix="labelshift_ckpt_") as tmp:
        if ctx.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save(state, Path(tmp) / CHECKPOINT_STATE)
            if save_final is not None:
                save_final(Path(tmp))
        ctx.report(metrics, checkpoint_dir=tmp if ctx.is_main else None)
