"""The ``labelshift`` command: world, train, evaluate, source-stats, estimate-prior."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch


def _common(parser: argparse.ArgumentParser, checkpoint: bool = True) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML")
    if checkpoint:
        parser.add_argument("--checkpoint", required=True, help="model checkpoint (ours or reference/FADA)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def cmd_train(args: argparse.Namespace) -> int:
    """One-process training of a stage (source-only by default) on the configured data."""
    from labelshift.config import load_config
    from labelshift.pipeline import LocalTrainRunner

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"stage": args.stage, "config": cfg.model_dump(mode="json"), "init_checkpoint": args.init}
    summary = LocalTrainRunner(out / "checkpoints", args.device).fit(payload, args.stage, out / "model.safetensors")
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    print(f"model written to {out / 'model.safetensors'}")
    return 0


def format_iou_table(class_names, summary: dict) -> str:
    lines = [f"{'class':<16}{'IoU':>8}"]
    for name in class_names:
        value = summary["per_class_iou"][name]
        lines.append(f"{name:<16}{'-' if value is None else f'{value:.2f}':>8}")
    lines.append(f"{'mIoU':<16}{summary['miou']:>8.2f}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from labelshift.adjust import adjust_logits
    from labelshift.build import build_model, class_set_of, eval_loader
    from labelshift.classes import miou13_names
    from labelshift.config import load_config
    from labelshift.inference import evaluate
    from labelshift.priors import load_prior

    cfg = load_config(args.config, args.overrides)
    class_set = class_set_of(cfg)
    device = torch.device(args.device)
    model = build_model(cfg, args.checkpoint).to(device).eval()
    transform = None
    if args.adjust == "ia":
        if not (args.source_prior and args.target_prior):
            raise SystemExit("--adjust ia needs --source-prior and --target-prior (preset names or JSON files)")
        transform = functools.partial(adjust_logits, source_prior=load_prior(args.source_prior, class_set),
                                      target_prior=load_prior(args.target_prior, class_set),
                                      temperature=args.temperature, tau_source=args.tau_source,
                                      tau_target=args.tau_target)
    matrix = evaluate(model, eval_loader(cfg, args.split), class_set.num_classes, device=device,
                      logit_transforms={args.adjust: transform}, flip=cfg.eval.flip, scales=cfg.eval.scales)[args.adjust]
    subsets = {"13": class_set.subset_indices(miou13_names())} if cfg.data.class_set == "synthia16" else {}
    summary = {"checkpoint": args.checkpoint, "split": args.split, "adjust": args.adjust,
               **matrix.to_dict(class_set.names, subsets)}
    print(format_iou_table(class_set.names, summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
        print(f"metrics written to {args.out}")
    return 0


def cmd_source_stats(args: argparse.Namespace) -> int:
    from labelshift.classes import get_class_set
    from labelshift.config import DatasetConfig
    from labelshift.data import build_dataset, build_transforms
    from labelshift.pipeline.priors_stage import label_statistics

    class_set = get_class_set(args.class_set or ("synthia16" if args.dataset == "synthia" else "cityscapes19"))
    ds_cfg = DatasetConfig(kind=args.dataset, root=args.root, split=args.split, list_file=args.list_file)
    dataset = build_dataset(ds_cfg, class_set, build_transforms(train=False, size=None, keep_label_size=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=args.workers)
    stats = label_statistics(loader, class_set.names)
    meta = {"dataset": args.dataset, "root": str(Path(args.root).resolve()), "split": args.split or args.list_file}
    out = Path(args.out)
    image_out = out.with_name(out.stem + "_image" + out.suffix)
    stats.pixel_prior(**meta).to_json(out)
    stats.image_prior(**meta).to_json(image_out)
    print(f"{stats.num_images} images, {stats.num_pixels} labelled pixels")
    print(f"pixel prior written to {out}\nimage prior written to {image_out}")
    return 0


def cmd_estimate_prior(args: argparse.Namespace) -> int:
    from labelshift.build import build_model, class_set_of, eval_loader
    from labelshift.config import load_config
    from labelshift.pipeline.priors_stage import (calibrated_source_prior, fit_source_calibration, label_statistics,
                                                  run_estimators)
    from labelshift.priors import load_prior

    cfg = load_config(args.config, [f"prior.method={args.method}", *args.overrides])
    class_set = class_set_of(cfg)
    device = torch.device(args.device)
    model = build_model(cfg, args.checkpoint).to(device).eval()
    if cfg.prior.source_prior:
        source_pixel = load_prior(cfg.prior.source_prior, class_set)
    else:
        source_pixel = label_statistics(eval_loader(cfg, "source"), class_set.names).pixel_prior()
    calibration, sample = fit_source_calibration(model, eval_loader(cfg, "source_val"), cfg.prior.calibration,
                                                 device=device)
    estimates, _ = run_estimators(
        model, eval_loader(cfg, "target", with_labels=False, max_images=cfg.prior.max_images), device=device,
        calibration=calibration, source_pixel_prior=source_pixel,
        calibrated_prior=calibrated_source_prior(calibration, sample[1], source_pixel), source_sample=sample,
        methods=(args.method,), em_sample_pixels=cfg.prior.em_sample_pixels,
        presence_threshold=cfg.prior.presence_threshold, bootstrap=cfg.prior.bootstrap, seed=0,
        class_names=class_set.names)
    estimates[args.method].to_json(args.out)
    print(estimates[args.method])
    print(f"prior written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelshift", description="label-shift correction for segmentation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("world", help="generate the embedded synthetic world (see `labelshift world -h`)", add_help=False)

    train = sub.add_parser("train", help="train one stage in this process")
    _common(train, checkpoint=False)
    train.add_argument("--stage", default="source", choices=("source", "refine", "distill"))
    train.add_argument("--init", default=None, help="initial checkpoint")
    train.add_argument("--out", required=True, help="output directory")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="mIoU of a checkpoint on a split, optionally with Inference Adjustment")
    _common(ev)
    ev.add_argument("--split", default="target_val", choices=("source", "source_val", "target", "target_val"))
    ev.add_argument("--adjust", default="none", choices=("none", "ia"))
    ev.add_argument("--source-prior", default=None)
    ev.add_argument("--target-prior", default=None)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--tau-source", type=float, default=1.0)
    ev.add_argument("--tau-target", type=float, default=1.0)
    ev.add_argument("--out", default=None, help="write the metrics JSON here")
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
    est.add_argument("--method", default="em", choices=("reference", "count", "soft_count", "presence", "em", "bbse"))
    est.add_argument("--out", required=True)
    est.set_defaults(func=cmd_estimate_prior)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "world":
        from labelshift.data.world import cli_main

        return cli_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
