"""The ``labelshift`` command: world, train, evaluate, source-stats, estimate-prior, make-splits, compare.

Expected failures (bad configuration, dataset layout, checkpoint, prior, arguments) print one line
``labelshift <command>: error: ...`` to stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from labelshift.compare import CompareError
from labelshift.config import ConfigError
from labelshift.data.io import DatasetError
from labelshift.estimate.registry import METHODS
from labelshift.models.checkpoint import CheckpointError
from labelshift.priors import PriorError


class UsageError(ValueError):
    """A command was called with arguments that do not fit together."""


def _common(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML")
    if checkpoint:
        parser.add_argument("--checkpoint", required=True, help="model checkpoint (ours or reference/FADA)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def cmd_train(args: argparse.Namespace) -> int:
    """One-process training of a stage (source-only by default) on the configured data."""
    from labelshift.config import load_config
    from labelshift.runners import LocalTrainRunner

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    payload = {"stage": args.stage, "config": cfg.model_dump(mode="json"), "init_checkpoint": args.init,
               **_stage_inputs(cfg, args)}
    out.mkdir(parents=True, exist_ok=True)
    summary = LocalTrainRunner(out / "checkpoints", args.device).fit(payload, args.stage, out / "model.safetensors")
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    print(f"model written to {out / 'model.safetensors'}")
    return 0


def _stage_inputs(cfg, args: argparse.Namespace) -> dict:
    """What a refine or distill payload needs beyond the config: CR's priors, the student's pseudo labels."""
    if args.stage == "refine":
        from labelshift.estimate.from_config import refine_priors

        if not (args.init or cfg.model.checkpoint):
            raise UsageError("--stage refine needs the adapted model: --init CHECKPOINT or model.checkpoint")
        source, target = refine_priors(cfg, args.target_prior, args.source_prior)
        return {"source_prior": source.to_dict(), "target_prior": target.to_dict()}
    if args.source_prior or args.target_prior:
        raise UsageError("--source-prior and --target-prior are for --stage refine")
    if args.stage == "distill":
        if not args.pseudo_labels:
            raise UsageError("--stage distill needs --pseudo-labels DIR (<stem>.png trainIds of target train)")
        return {"pseudo_label_dir": str(Path(args.pseudo_labels).resolve())}
    return {}


def format_iou_table(class_names, summary: dict) -> str:
    lines = [f"{'class':<16}{'IoU':>8}"]
    for name in class_names:
        value = summary["per_class_iou"][name]
        lines.append(f"{name:<16}{'-' if value is None else f'{value:.2f}':>8}")
    lines.append(f"{'mIoU':<16}{summary['miou']:>8.2f}")
    for key, label in (("miou_13", "mIoU* (13)"), ("miou_subset", "mIoU (subset)"), ("pixel_accuracy", "pixel acc.")):
        if key in summary:
            lines.append(f"{label:<16}{summary[key]:>8.2f}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from labelshift.adjust import ia_transform
    from labelshift.atomic import write_json_atomic
    from labelshift.build import amp_dtype_of, build_model, class_set_of, eval_loader, eval_subsets
    from labelshift.calibrate import Calibration
    from labelshift.config import AdjustConfig, load_config
    from labelshift.inference import evaluate
    from labelshift.priors import SourcePriors, load_prior

    cfg = load_config(args.config, args.overrides)
    class_set = class_set_of(cfg)
    device = torch.device(args.device)
    transform = None
    priors = {}
    adjust = None
    if args.adjust in ("ia", "local"):
        if not (args.source_prior and args.target_prior):
            raise UsageError(f"--adjust {args.adjust} needs --source-prior and --target-prior (preset names or JSON "
                             "files)")
        from labelshift.estimate.per_image import LocalSettings

        local_settings = LocalSettings.of(cfg.adjust.local)
        if args.adjust == "local" and local_settings.reads_calibrated and not args.calibration:
            raise UsageError("--adjust local with map_em reads calibrated posteriors: it needs "
                             "--calibration (and --calibrated-source-prior, the *_source_calibrated.json), or "
                             "adjust.local.posteriors=raw")
        if args.adjust == "local" and local_settings.presence and not args.calibration:
            raise UsageError("--adjust local weighs classes by their presence: it needs --calibration (the "
                             "calibration JSON estimate-prior wrote holds the presence model), or "
                             "adjust.local.presence=false")
        if args.space == "calibrated" and not args.calibration:
            raise UsageError("--space calibrated needs --calibration (the calibration JSON estimate-prior wrote); "
                             "--source-prior is then the prior of the calibrated posteriors (*_source_calibrated.json)")
        priors = {"source_prior": load_prior(args.source_prior, class_set),
                  "target_prior": load_prior(args.target_prior, class_set)}
        adjust = AdjustConfig(space=args.space, temperature=args.temperature, tau_source=args.tau_source,
                              tau_target=args.tau_target, mode="local" if args.adjust == "local" else "global",
                              local=cfg.adjust.local)
        calibration = Calibration.from_dict(json.loads(Path(args.calibration).read_text())) if args.calibration else None
        if args.adjust == "local" and local_settings.presence and calibration.presence is None:
            from labelshift.image_presence import MISSING_MODEL

            raise UsageError(f"{args.calibration}: {MISSING_MODEL}")
        source = priors["source_prior"]
        if args.calibrated_source_prior:  # the prior the calibrated posteriors hold under (local mode, calibrated space)
            priors["calibrated_source_prior"] = load_prior(args.calibrated_source_prior, class_set)
            source = SourcePriors(source, source, priors["calibrated_source_prior"])
        transform = ia_transform(adjust, source, priors["target_prior"], calibration)
    model = build_model(cfg, args.checkpoint).to(device).eval()
    matrix = evaluate(model, eval_loader(cfg, args.split), class_set.num_classes, device=device,
                      logit_transforms={args.adjust: transform}, flip=cfg.eval.flip, scales=cfg.eval.scales,
                      amp_dtype=amp_dtype_of(cfg, device))[args.adjust]
    summary = {"checkpoint": str(Path(args.checkpoint).resolve()), "split": args.split, "adjust": args.adjust,
               **({**adjust.model_dump(), **({"calibration": args.calibration} if args.calibration else {}),
                   **{role: prior.to_dict() for role, prior in priors.items()}} if adjust else {}),
               **matrix.to_dict(class_set.names, eval_subsets(cfg))}
    print(format_iou_table(class_set.names, summary))
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "eval" / f"{args.split}_{args.adjust}.json"
    write_json_atomic(out, summary)
    print(f"metrics written to {out}")
    return 0


def cmd_source_stats(args: argparse.Namespace) -> int:
    from labelshift.build import build_dataset
    from labelshift.classes import get_class_set
    from labelshift.config import DatasetConfig
    from labelshift.data import build_transforms
    from labelshift.estimate import label_statistics_of

    class_set = get_class_set(args.class_set or ("synthia16" if args.dataset == "synthia" else "cityscapes19"))
    ds_cfg = DatasetConfig(kind=args.dataset, root=args.root, split=args.split, list_file=args.list_file)
    dataset = build_dataset(ds_cfg, class_set, build_transforms(train=False, size=None, keep_label_size=True))
    stats = label_statistics_of(dataset, class_set.names, num_workers=args.workers)
    meta = {"dataset": args.dataset, "root": str(Path(args.root).resolve()), "split": args.split or args.list_file}
    out = Path(args.out)
    image_out = out.with_name(out.stem + "_image" + out.suffix)
    stats.pixel_prior(**meta).to_json(out)
    stats.image_prior(**meta).to_json(image_out)
    print(f"{stats.num_images} images, {stats.num_pixels} labelled pixels")
    print(f"pixel prior written to {out}\nimage prior written to {image_out}")
    return 0


def cmd_estimate_prior(args: argparse.Namespace) -> int:
    from labelshift.atomic import write_json_atomic
    from labelshift.build import build_model
    from labelshift.config import load_config
    from labelshift.estimate.from_config import estimate_target_priors

    overrides = [*([f"prior.method={args.method}"] if args.method else []),
                 *([f"prior.seed={args.seed}"] if args.seed is not None else []), *args.overrides]
    cfg = load_config(args.config, overrides)
    method = cfg.prior.method
    device = torch.device(args.device)
    model = build_model(cfg, args.checkpoint).to(device).eval()
    found = estimate_target_priors(cfg, model, args.checkpoint, device=device, methods=(method,), with_oracle=False)
    estimate = found.estimates[method]
    out = Path(args.out)
    beside = {suffix: out.with_name(f"{out.stem}_{suffix}{out.suffix}")
              for suffix in ("source", "source_calibrated", "calibration")}
    estimate.to_json(out)
    found.source.of_kind(estimate.kind).to_json(beside["source"])
    found.source.calibrated.to_json(beside["source_calibrated"])
    write_json_atomic(beside["calibration"], found.calibration.to_dict())
    print(estimate)
    print(f"prior written to {out}; the source prior of the same kind to {beside['source']}; the prior of the "
          f"calibrated posteriors to {beside['source_calibrated']}; the calibration to {beside['calibration']}")
    print(f"IA with it: labelshift evaluate --config {args.config} --checkpoint {args.checkpoint} --adjust ia "
          f"--source-prior {beside['source']} --target-prior {out}")
    if estimate.kind == "pixel" and found.calibration.method != "none":
        print(f"IA in the calibrated space: labelshift evaluate --config {args.config} --checkpoint "
              f"{args.checkpoint} --adjust ia --space calibrated --calibration {beside['calibration']} "
              f"--source-prior {beside['source_calibrated']} --target-prior {out}")
    return 0


def cmd_make_splits(args: argparse.Namespace) -> int:
    """A seeded train/val split of a GTA5 or SYNTHIA directory: ``<root>/splits/{train,val}.txt``."""
    import numpy as np

    from labelshift.atomic import write_text_atomic
    from labelshift.build import build_dataset
    from labelshift.classes import get_class_set
    from labelshift.config import DatasetConfig
    from labelshift.data import build_transforms

    class_set = get_class_set("synthia16" if args.dataset == "synthia" else "cityscapes19")
    dataset = build_dataset(DatasetConfig(kind=args.dataset, root=args.root), class_set,
                            build_transforms(train=False, size=None, keep_label_size=True))
    if not 0 < args.val_size < len(dataset):
        raise UsageError(f"--val-size must be between 1 and {len(dataset) - 1} ({len(dataset)} labelled images)")
    order = np.random.default_rng(args.seed).permutation(len(dataset))
    val = sorted(dataset.names[i] for i in order[: args.val_size])
    train = sorted(dataset.names[i] for i in order[args.val_size:])
    splits = Path(dataset.root) / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    for name, stems in (("train", train), ("val", val)):
        write_text_atomic(splits / f"{name}.txt", "".join(f"{stem}\n" for stem in stems))
    print(f"{len(train)} train and {len(val)} val images listed in {splits}/train.txt and {splits}/val.txt")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Batch prediction in this process (``ray_jobs/predict.py`` runs the same on Ray Data)."""
    from labelshift.build import eval_loader
    from labelshift.predict import prediction_inputs
    from labelshift.pseudo import OutputConflict
    from labelshift.runners.data import InProcessPasses, run_labelling

    cfg, dataset, settings, priors_used = prediction_inputs(args)
    passes = InProcessPasses(torch.device(args.device), lambda which, **kw: eval_loader(cfg, which, **kw))
    try:
        run_labelling(passes, cfg, args.checkpoint, dataset, Path(args.out).resolve(), settings, priors_used,
                      overwrite=args.overwrite)
    except OutputConflict as err:
        raise UsageError(str(err)) from err
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelshift", description="label-shift correction for segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("world", help="generate the embedded synthetic world (see `labelshift world -h`)", add_help=False)

    train = sub.add_parser("train", help="train one stage in this process")
    _common(train, checkpoint=False)
    train.add_argument("--stage", default="source", choices=("source", "refine", "distill"))
    train.add_argument("--init", default=None, help="initial checkpoint (refine: default model.checkpoint)")
    train.add_argument("--target-prior", default=None,
                       help="refine: the target prior, a preset or JSON file (default: prior.target_prior)")
    train.add_argument("--source-prior", default=None,
                       help="refine: the source prior (default: the configured source prior of the target's kind)")
    train.add_argument("--pseudo-labels", default=None, help="distill: directory of <stem>.png pseudo labels")
    train.add_argument("--out", required=True, help="output directory")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="mIoU of a checkpoint on a split, optionally with Inference Adjustment")
    _common(ev)
    ev.add_argument("--split", default="target_val",
                    choices=("source", "source_val", "target", "target_val", "target_select"))
    ev.add_argument("--adjust", default="none", choices=("none", "ia", "local"),
                    help="local: IA with a prior per image shrunk toward --target-prior (settings: adjust.local.*)")
    ev.add_argument("--space", default="raw", choices=("raw", "calibrated"),
                    help="IA on raw logits (the paper), or in the calibration's space (needs --calibration)")
    ev.add_argument("--calibration", default=None, help="calibration JSON (estimate-prior writes *_calibration.json)")
    ev.add_argument("--source-prior", default=None)
    ev.add_argument("--target-prior", default=None)
    ev.add_argument("--calibrated-source-prior", default=None,
                    help="--adjust local/--space calibrated: the prior of the calibrated posteriors "
                         "(estimate-prior writes *_source_calibrated.json; default: --source-prior)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--tau-source", type=float, default=1.0)
    ev.add_argument("--tau-target", type=float, default=1.0)
    ev.add_argument("--out", default=None, help="metrics JSON (default: <output_dir>/eval/<split>_<adjust>.json)")
    ev.set_defaults(func=cmd_evaluate)

    stats = sub.add_parser("source-stats", help="exact pixel and image priors of a labelled split")
    stats.add_argument("--dataset", required=True, choices=("gta5", "synthia", "cityscapes"))
    stats.add_argument("--root", required=True)
    stats.add_argument("--split", default=None, help="cityscapes split (train|val)")
    stats.add_argument("--list-file", default=None, help="gta5/synthia list of stems")
    stats.add_argument("--class-set", default=None, choices=("cityscapes19", "synthia16"))
    stats.add_argument("--workers", type=int, default=0)
    stats.add_argument("--out", required=True, help="pixel prior JSON (the image prior goes beside it, *_image.json)")
    stats.set_defaults(func=cmd_source_stats)

    est = sub.add_parser("estimate-prior", help="estimate the target prior with a model (one process)")
    _common(est)
    est.add_argument("--method", default=None, choices=METHODS,
                     help="estimator (default: the config's prior.method; the shipped configs: ensemble)")
    est.add_argument("--seed", type=int, default=None,
                     help="seed of the pixel samples and the bootstrap (default: the config's prior.seed)")
    est.add_argument("--out", required=True, help="prior JSON (the source prior and calibration go beside it)")
    est.set_defaults(func=cmd_estimate_prior)

    pred = sub.add_parser("predict", help="label PNGs (Cityscapes labelIds, trainIds or colours) of a folder or split")
    from labelshift.predict import add_arguments

    add_arguments(pred)
    pred.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    pred.set_defaults(func=cmd_predict)

    splits = sub.add_parser("make-splits", help="seeded train/val lists of a GTA5 or SYNTHIA directory")
    splits.add_argument("--dataset", required=True, choices=("gta5", "synthia"))
    splits.add_argument("--root", required=True)
    splits.add_argument("--val-size", type=int, default=500, help="images held out for calibration and BBSE")
    splits.add_argument("--seed", type=int, default=0)
    splits.set_defaults(func=cmd_make_splits)

    from labelshift import compare

    comparison = sub.add_parser("compare", help="the main job's MLflow runs side by side: deltas to a baseline, "
                                                "seeds folded into mean ± sd, a per-class IoU chart")
    compare.add_arguments(comparison)
    comparison.set_defaults(func=compare.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "world":
        from labelshift.data.world import cli_main

        return cli_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, DatasetError, CheckpointError, PriorError, CompareError) as err:
        print(f"labelshift {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
