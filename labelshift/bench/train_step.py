"""One Classifier Refinement step and one self-distillation step of ``deeplabv2_resnet101`` at the reference
sizes, fp32 vs bf16 autocast + channels_last, side by side in one run (no Ray, synthetic batches).

Reference sizes (docs/fidelity.md): CR trains the head on GTA5 frames at 1280x720, batch 4 (the reference's 4
GPUs x 1, here on one device); self-distillation trains the whole student on 1024x512 crops, batch 2 per GPU
(its batch 8 on 4 GPUs). Each mode runs ``--warmup`` untimed steps, then ``--steps`` timed ones; a step is what
``labelshift.train`` runs per iteration: host-to-device copy of a pinned batch, forward (CR: frozen extractor
under no_grad, then the head), upsampling of the logits to label size, the loss (CR: the logit-adjusted CE),
backward, SGD step. Reported: images/s per mode and task, the bf16/fp32 ratio, and the time of each phase (with a
device synchronisation between phases, so the phases add up to a little more than a plain step). Start-up and
model construction are excluded; nothing is read from disk. Ends with one JSON line.

``python -m labelshift.bench.train_step [--device cuda] [--steps 20] [--warmup 5]``
``python -m labelshift.bench.train_step --device cpu --cr-size 64x32 --sd-size 64x32 --steps 1 --warmup 1``
(a CPU check that it runs: autocast is CUDA-only here, so on CPU both modes are fp32).
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from labelshift.adjust import logit_adjusted_cross_entropy
from labelshift.classes import IGNORE_INDEX
from labelshift.inference import autocast_for
from labelshift.models import create_model, upsample_logits
from labelshift.priors import preset

PHASES = ("copy", "forward", "loss", "backward", "optimizer")


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


class PhaseTimer:
    """Seconds per phase, with a device synchronisation at each phase boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {phase: 0.0 for phase in PHASES}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - began


def _batch(batch: int, size: tuple[int, int], num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A pinned host batch: images (B, 3, H, W) float32, labels (B, H, W) int64 with some ignored pixels."""
    width, height = size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    labels = torch.randint(0, num_classes, (batch, height, width), generator=generator)
    labels[:, :, : width // 16] = IGNORE_INDEX
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return images, labels


def run_mode(task: str, bf16: bool, batch: int, size: tuple[int, int], device: torch.device, steps: int,
             warmup: int) -> dict:
    """Images/s and per-phase seconds of ``steps`` training steps of ``task`` (``cr`` | ``distill``)."""
    torch.manual_seed(0)
    model = create_model("deeplabv2_resnet101", 19, frozen_bn=task == "cr").to(device)
    channels_last = bf16 and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if task == "cr":
        for parameter in model.backbone_parameters():
            parameter.requires_grad_(False)
        model.eval()
        trained = list(model.head_parameters())
        source, target = preset("gta5_source_image_counts"), preset("cityscapes_from_gta5_deeplabv2")
    else:
        model.train()
        trained = list(model.parameters())
    optimizer = torch.optim.SGD(trained, lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    host_images, host_labels = _batch(batch, size, 19, device)
    timer = PhaseTimer(device)
    for step in range(warmup + steps):
        if step == warmup:
            timer = PhaseTimer(device)
        with timer.phase("copy"):
            images = host_images.to(device, non_blocking=True)
            labels = host_labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
        with timer.phase("forward"), autocast_for(device, torch.bfloat16 if bf16 else None):
            if task == "cr":
                with torch.no_grad():
                    features = model.forward_features(images)
                logits = model.forward_head(features)
            else:
                logits = model(images)
        with timer.phase("loss"):
            logits = upsample_logits(logits.float(), tuple(labels.shape[-2:]))
            if task == "cr":
                loss = logit_adjusted_cross_entropy(logits, labels, source, target)
            else:
                loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        with timer.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("optimizer"):
            optimizer.step()
    total = sum(timer.seconds.values())
    return {"images_per_second": round(batch * steps / total, 2),
            "phase_seconds_per_step": {k: round(v / steps, 5) for k, v in timer.seconds.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cr-size", type=_size, default=(1280, 720), help="WIDTHxHEIGHT of CR's source frames")
    parser.add_argument("--cr-batch", type=int, default=4)
    parser.add_argument("--sd-size", type=_size, default=(1024, 512), help="WIDTHxHEIGHT of the student's crops")
    parser.add_argument("--sd-batch", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report: dict = {"benchmark": "train_step", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup}
    for task, batch, size in (("cr", args.cr_batch, args.cr_size), ("distill", args.sd_batch, args.sd_size)):
        fp32 = run_mode(task, False, batch, size, device, args.steps, args.warmup)
        bf16 = run_mode(task, True, batch, size, device, args.steps, args.warmup)
        report[task] = {"batch": batch, "size": list(size), "fp32": fp32, "bf16_channels_last": bf16,
                        "speedup": round(bf16["images_per_second"] / fp32["images_per_second"], 3)}
        print(f"{task:8s} batch {batch} {size[0]}x{size[1]}: fp32 {fp32['images_per_second']:.1f} img/s, "
              f"bf16+channels_last {bf16['images_per_second']:.1f} img/s ({report[task]['speedup']:.2f}x)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
