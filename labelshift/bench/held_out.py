"""What calibrating on the model's own training images costs: the held-out caveat of FADA's released models.

FADA's GTA5 model was trained on all 24,966 GTA5 images, so no GTA5 split is held out for it: BCTS and BBSE's
confusion matrix are then fitted on images the model has seen. This benchmark measures that on the embedded
world: one source model (the demo's recipe at a smaller size), then the estimate pass twice, with the labelled
"source val" split either the held-out ``splits/val.txt`` or as many images drawn from the model's own training
split. Reported per split: the calibration, L1 of the ``em`` / ``bbse`` / ``count`` estimates against the
target-train oracle, and target-val mIoU with IA towards each estimate (raw logits, as the job does).

``python -m labelshift.bench.held_out [--out DIR] [--size 128x64] [--num-source 600] [--iterations 400]``
(includes world generation and source training; ends with one JSON line).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from labelshift.adjust import ia_transform
from labelshift.artifacts import prior_error_key
from labelshift.build import build_model, class_set_of, ensure_world, eval_loader
from labelshift.config import AdjustConfig, load_config
from labelshift.estimate import prior_errors
from labelshift.estimate.from_config import estimate_target_priors
from labelshift.inference import evaluate

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
METHODS = ("em", "bbse", "count")


def _config(out: Path, size: str, num_source: int, iterations: int, list_file: str | None = None):
    world = out / "world"
    overrides = [f"output_dir={out}", f"data.world.size={size}", f"data.world.num_source={num_source}",
                 "data.world.num_target_train=200", "data.world.num_target_val=100",
                 f"data.source_transform.size={size}", f"data.target_transform.size={size}",
                 f"data.source.root={world}/gta5", f"data.source_val.root={world}/gta5",
                 f"data.target.root={world}/cityscapes", f"data.target_val.root={world}/cityscapes",
                 f"train.source.iterations={iterations}", "prior.bootstrap=0", "tracking.enabled=false"]
    if list_file is not None:
        overrides.append(f"data.source_val.list_file={list_file}")
    return load_config(DEMO, overrides)


def _training_subset(world: Path, out: Path, seed: int = 0) -> Path:
    """A list of as many training images as the held-out split has, drawn from ``splits/train.txt``."""
    held_out = (world / "gta5" / "splits" / "val.txt").read_text().split()
    training = (world / "gta5" / "splits" / "train.txt").read_text().split()
    chosen = sorted(np.random.default_rng(seed).choice(training, size=len(held_out), replace=False).tolist())
    path = out / "calibration_on_training_images.txt"
    path.write_text("".join(f"{stem}\n" for stem in chosen))
    return path


def _measure(cfg, model: torch.nn.Module, checkpoint: Path) -> dict:
    device = torch.device("cpu")
    found = estimate_target_priors(cfg, model, checkpoint, device=device, methods=METHODS, with_oracle=True)
    oracle_pixel, oracle_image = found.oracle.pixel_prior(), found.oracle.image_prior()
    errors = prior_errors(found.estimates, oracle_pixel, oracle_image, found.source)
    transforms = {"none": None, "oracle": ia_transform(AdjustConfig(), found.source, oracle_pixel)}
    transforms.update({method: ia_transform(AdjustConfig(), found.source, prior, found.calibration)
                       for method, prior in found.estimates.items()})
    matrices = evaluate(model, eval_loader(cfg, "target_val"), class_set_of(cfg).num_classes, device=device,
                        logit_transforms=transforms)
    return {"calibration_temperature": round(found.calibration.temperature, 4),
            "l1": {m: round(errors[prior_error_key(m, "l1")], 4) for m in METHODS},
            "ia_miou": {name: round(100 * matrix.miou(), 2) for name, matrix in matrices.items()}}


def run(out: Path, size: str, num_source: int, iterations: int) -> dict:
    from labelshift.pipeline import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import Tracker

    began = time.perf_counter()
    cfg = _config(out, size, num_source, iterations)
    ensure_world(cfg, log=lambda message: None)
    Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda message: None).run(("pretrain",))
    checkpoint = out / "stages" / "pretrain" / "model.safetensors"
    model = build_model(cfg, checkpoint).eval()
    results = {"held_out": _measure(cfg, model, checkpoint)}
    training_list = _training_subset(out / "world", out)
    results["training"] = _measure(_config(out, size, num_source, iterations, str(training_list)), model, checkpoint)
    return {"benchmark": "held_out", "size": size, "num_source": num_source, "source_iterations": iterations,
            "calibration_images": len(training_list.read_text().split()), "results": results,
            "seconds": round(time.perf_counter() - began, 1)}


def format_table(report: dict) -> str:
    lines = ["| calibration split | T | " + " | ".join(f"{m} L1" for m in METHODS) + " | "
             + " | ".join(f"IA {m} mIoU" for m in METHODS) + " | no IA | IA oracle |",
             "|---|---:|" + "---:|" * (2 * len(METHODS) + 2)]
    for split, r in report["results"].items():
        lines.append(f"| {split} | {r['calibration_temperature']:.3f} | "
                     + " | ".join(f"{r['l1'][m]:.3f}" for m in METHODS) + " | "
                     + " | ".join(f"{r['ia_miou'][m]:.2f}" for m in METHODS)
                     + f" | {r['ia_miou']['none']:.2f} | {r['ia_miou']['oracle']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.held_out", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench_held_out")
    parser.add_argument("--size", default="[128,64]", help="world and model input size, YAML [width,height]")
    parser.add_argument("--num-source", type=int, default=600)
    parser.add_argument("--iterations", type=int, default=400, help="source training steps")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = run(out, args.size, args.num_source, args.iterations)
    (out / "held_out.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
