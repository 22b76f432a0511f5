"""Where a per-worker training loop runs: one local process, or a Ray Train worker.

A loop talks only to a :class:`TrainContext`: its rank, world size and device, ``wrap_model`` (DDP under
Ray Train), ``report`` (metrics and, on rank 0, a checkpoint directory) and ``latest_checkpoint`` (resume).
Ray is imported lazily, inside :class:`RayTrainContext`, so the library imports without it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

CHECKPOINT_STATE = "state.pt"


class TrainContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def describe(self) -> dict:
        """Where this worker runs (rank, process id, node)."""
        return {"rank": self.rank, "pid": os.getpid(), "node_id": "local"}

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        raise NotImplementedError

    def latest_checkpoint(self) -> Path | None:
        """A directory holding the last reported checkpoint, or None on a fresh start."""
        raise NotImplementedError

    def release_checkpoint(self) -> None:
        """The loop has read ``latest_checkpoint()``: the directory may go (a downloaded copy is deleted)."""


class LocalContext(TrainContext):
    """One process; checkpoints are copied under ``checkpoint_root/step_XXXXXXXX`` (the newest one resumes).

    ``on_report(metrics)``, when given, receives every report as it is made, before its checkpoint is kept: a
    kept checkpoint's step has always been delivered.
    """

    def __init__(self, checkpoint_root: str | Path, device: torch.device | str = "cpu",
                 on_report: Callable[[dict], None] | None = None) -> None:
        self.checkpoint_root = Path(checkpoint_root)
        self.device = torch.device(device)
        self.on_report = on_report
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if self.on_report is not None:
            self.on_report(dict(metrics))
        if checkpoint_dir is None:
            return
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_root / f"step_{int(metrics['step']):08d}"
        staging = Path(tempfile.mkdtemp(dir=self.checkpoint_root, prefix=".staging_"))
        shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_root.is_dir():
            return None
        steps = sorted(p for p in self.checkpoint_root.glob("step_*") if (p / CHECKPOINT_STATE).is_file())
        return steps[-1] if steps else None


class RayTrainContext(TrainContext):
    """Inside ``TorchTrainer``'s ``train_loop_per_worker``. The checkpoint to resume from is read in place
    (``Checkpoint.as_directory``: no copy of a checkpoint on local or shared storage; a remote one is downloaded
    once per node) until ``release_checkpoint``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._restored: Path | None = None
        self._open_checkpoint = contextlib.ExitStack()

    def describe(self) -> dict:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        checkpoint = None
        if checkpoint_dir is not None and self.is_main:
            checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir)
        self._train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> Path | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        if self._restored is None:
            self._restored = Path(self._open_checkpoint.enter_context(checkpoint.as_directory()))
        return self._restored

    def release_checkpoint(self) -> None:
        self._open_checkpoint.close()
        self._restored = None
