"""Batch prediction requests, shared by ``labelshift predict`` (in this process) and ``ray_jobs/predict.py``
(Ray Data): their arguments and what they turn into (config, image dataset, output settings, priors used)."""
from __future__ import annotations

import argparse
from pathlib import Path

from labelshift.config import load_config
from labelshift.pseudo import LABEL_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``ray_jobs/predict.py`` and ``labelshift predict`` share."""
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a directory of PNG images (searched recursively)")
    source.add_argument("--split", help="a Cityscapes split of data.target (e.g. val)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", default="labelids", choices=LABEL_FORMATS)
    parser.add_argument("--adjust", default="none", choices=("none", "ia"))
    parser.add_argument("--priors", default=None, help="estimate stage directory for --adjust ia")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds another pass's predictions (other checkpoint or settings): delete them "
                             "first (without it such a run stops; the same pass resumes)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def prediction_inputs(args: argparse.Namespace):
    """(cfg, dataset, settings, priors used) of a prediction request."""
    from labelshift.build import build_split, class_set_of, image_folder
    from labelshift.pseudo import prediction_settings
    from labelshift.runners.data import estimate_stage_ia

    overrides = [*args.overrides, *([f"data.target.split={args.split}"] if args.split else [])]
    cfg = load_config(args.config, overrides)
    transform, priors_used = None, None
    if args.adjust == "ia":
        transform, priors_used = estimate_stage_ia(cfg, args.priors or Path(cfg.output_dir) / "stages" / "estimate")
    dataset = image_folder(cfg, args.images) if args.images else build_split(cfg, "target", train=False,
                                                                             with_labels=False)
    return cfg, dataset, prediction_settings(class_set_of(cfg), args.format, transform), priors_used
