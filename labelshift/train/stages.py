"""The three training stages as per-worker functions: source-only, Classifier Refinement, self-distillation.

``train_worker(payload)`` is what Ray Train's ``TorchTrainer`` runs on every worker; ``run_stage(payload, ctx)``
runs the same code in one process with a :class:`LocalContext`. The payload is plain JSON-able data:
``{"stage", "config", "init_checkpoint", "source_prior", "target_prior", "pseudo_label_dir", "soft_label_dir"}``
(``soft_label_dir``: distil on the top-k soft labels there instead of the hard pseudo labels).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from labelshift.adjust import logit_adjusted_cross_entropy
from labelshift.build import build_model, build_split, build_student, class_set_of
from labelshift.classes import IGNORE_INDEX
from labelshift.config import ExperimentConfig, OptimConfig, config_from_dict
from labelshift.data.pseudo_labels import PseudoLabelDataset, soft_cross_entropy
from labelshift.inference import autocast_for
from labelshift.models import align_corners_of, save_checkpoint, upsample_logits
from labelshift.priors import ClassPrior
from labelshift.runtime import apply_runtime
from labelshift.train.context import RayTrainContext, TrainContext
from labelshift.train.class_balanced import ClassBalancedBatchSampler, classes_present
from labelshift.train.loop import FINAL_MODEL, GlobalBatchSampler, endless_batches, make_optimizer, run_loop

STAGES = ("source", "refine", "distill")


class _FrozenFeaturesHead(nn.Module):
    """Classifier Refinement's forward: features under no_grad (frozen extractor), gradients only in the head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model.forward_features(images)
        return self.model.forward_head(features)


def cross_entropy_over_valid_pixels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over pixels whose label is not 255; 0 (with a gradient) when a batch has none, e.g. when every
    pseudo label fell below the confidence threshold."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def _optim_of(cfg: ExperimentConfig, stage: str) -> OptimConfig:
    return getattr(cfg.train, stage)


def _segmentation_loss(forward: nn.Module, batch: dict, device: torch.device, amp: bool, loss_of_logits,
                       align_corners: bool) -> torch.Tensor:
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_for(device, torch.bfloat16 if amp else None):
        logits = forward(images)
    logits = upsample_logits(logits.float(), tuple(labels.shape[-2:]), align_corners=align_corners)
    return loss_of_logits(logits, labels)


def _prepare(payload: dict, ctx: TrainContext) -> tuple[ExperimentConfig, nn.Module, list, nn.Module, object]:
    """Model, parameter groups, the forward module to run, and the per-pixel loss for the stage."""
    cfg = config_from_dict(payload["config"])
    stage = payload["stage"]
    optim = _optim_of(cfg, stage)
    init = payload.get("init_checkpoint")
    if stage == "source":
        model = build_model(cfg, init, fresh=init is None)
    elif stage == "refine":
        model = build_model(cfg, init)
    else:
        model = build_student(cfg, init)
    model = model.to(ctx.device)
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if stage == "refine":
        for p in model.backbone_parameters():
            p.requires_grad_(False)
        model.eval()  # frozen extractor: BatchNorm statistics stay as adapted
        groups = [(list(model.head_parameters()), optim.lr * optim.head_lr_mult)]
        source_prior = ClassPrior.from_dict(payload["source_prior"])
        target_prior = ClassPrior.from_dict(payload["target_prior"])
        loss = lambda logits, labels: logit_adjusted_cross_entropy(  # noqa: E731
            logits, labels, source_prior, target_prior, tau=cfg.train.refine.tau, ignore_index=IGNORE_INDEX)
        forward = ctx.wrap_model(_FrozenFeaturesHead(model))
        return cfg, model, groups, forward, loss
    if stage == "distill" and cfg.train.distill.sync_bn and ctx.world_size > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBatchNorm runs on GPUs only
    model.train()
    groups = [(list(model.backbone_parameters()), optim.lr), (list(model.head_parameters()), optim.lr * optim.head_lr_mult)]
    return cfg, model, groups, ctx.wrap_model(model), cross_entropy_over_valid_pixels


def run_stage(payload: dict, ctx: TrainContext) -> dict:
    """Run one training stage on this worker; returns rank 0's summary (losses, steps, seconds)."""
    stage = payload["stage"]
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; expected one of {STAGES}")
    cfg = config_from_dict(payload["config"])
    apply_runtime(cfg.runtime.torch_threads, cfg.runtime.deterministic)
    optim = _optim_of(cfg, stage)
    torch.manual_seed(optim.seed)  # the same initial weights on every rank and for any number of workers
    cfg, model, groups, forward, loss_of_logits = _prepare(payload, ctx)
    torch.manual_seed(optim.seed + ctx.rank)
    which = "source" if stage in ("source", "refine") else "target"
    dataset = build_split(cfg, which, train=True, pseudo_label_dir=payload.get("pseudo_label_dir"), seed=optim.seed)
    if payload.get("soft_label_dir"):  # self-distillation on the top-k soft labels (CE against their distribution)
        images = build_split(cfg, which, train=True, with_labels=False, seed=optim.seed)
        dataset = PseudoLabelDataset(images, "soft", payload["soft_label_dir"], cfg.pseudo.confidence_threshold)
        loss_of_logits = soft_cross_entropy
    if optim.sampler == "class_balanced":  # FADA's source sampler (reference recipe); source labels only
        sampler = ClassBalancedBatchSampler(classes_present(dataset, cfg.data.num_workers), class_set_of(cfg).num_classes,
                                            optim.batch_size, ctx.rank, ctx.world_size, optim.seed)
    else:
        sampler = GlobalBatchSampler(len(dataset), optim.batch_size, ctx.rank, ctx.world_size, optim.seed)
    optimizer = make_optimizer(groups, optim)
    amp = optim.amp_bf16 and ctx.device.type == "cuda"

    def save_final(directory: Path) -> None:
        metadata = {"model": cfg.model.name, "num_classes": class_set_of(cfg).num_classes,
                    "classes": list(class_set_of(cfg).names), "stage": stage, "config": payload["config"],
                    "priors": {k: payload.get(k) for k in ("source_prior", "target_prior") if payload.get(k)}}
        save_checkpoint(model, directory / FINAL_MODEL, metadata)

    result = run_loop(
        ctx, model=model, optimizer=optimizer,
        make_batches=lambda start: endless_batches(dataset, sampler, start, cfg.data.num_workers,
                                                   pin_memory=ctx.device.type == "cuda"),
        compute_loss=lambda batch: _segmentation_loss(forward, batch, ctx.device, amp, loss_of_logits,
                                                      align_corners_of(model)),
        optim=optim, save_final=save_final)
    return {"stage": stage, "steps_run": result.steps_run, "resumed_from": result.resumed_from,
            "losses": result.losses, "seconds": result.seconds, "world_size": ctx.world_size,
            "workers": _all_workers(ctx)}


def _all_workers(ctx: TrainContext) -> list[dict]:
    """Every rank's ``describe()`` (gathered over the process group when there is one)."""
    me = ctx.describe()
    if ctx.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [me]
    gathered: list[dict | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, me)
    return gathered


def train_worker(payload: dict) -> dict:
    """``train_loop_per_worker`` for Ray Train's ``TorchTrainer``."""
    return run_stage(payload, RayTrainContext())
