"""Pseudo labels, confidences and soft labels of a split on Ray Data (resumable, idempotent).

    python ray_jobs/soft_labels.py --config configs/demo.yaml --checkpoint M [--adjust none|ia] [--split train]
    ray job submit --working-dir . -- python ray_jobs/soft_labels.py --config ... --out /shared/soft_labels

Writes ``<out>/labels/<stem>.png`` (trainIds, 255 below ``pseudo.confidence_threshold``),
``<out>/confidence/<stem>.png`` and ``<out>/soft/<stem>.parquet`` (``labelshift.pseudo``) and ``<out>/pseudo.json``.
``<out>/labelling.json`` records what determines the files (teacher sha256, settings, IA, images) when the pass
starts: re-running the same command redoes only the chunks with a missing output, while another teacher or other
settings into the same ``--out`` stop with the differences named (``--overwrite`` deletes the old outputs first).
``--adjust ia`` applies IA towards the target prior an estimate stage wrote (``--priors``, default
``<output_dir>/stages/estimate``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory of `ray job submit`

from labelshift.config import ConfigError, load_config  # noqa: E402
from labelshift.runners.session import ray_session  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", default=None, help="teacher model (default: model.checkpoint)")
    parser.add_argument("--adjust", default="none", choices=("none", "ia"))
    parser.add_argument("--priors", default=None, help="estimate stage directory for --adjust ia")
    parser.add_argument("--split", default="train", help="Cityscapes split of data.target (default train)")
    parser.add_argument("--out", default=None, help="output directory (default <output_dir>/soft_labels/<split>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds another pass's outputs: delete them first (else such a run stops)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:

    from labelshift.build import build_split
    from labelshift.pseudo import OutputConflict, pseudo_settings
    from labelshift.runners.data import RayDataPasses, estimate_stage_ia, run_labelling

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.overrides, f"data.target.split={args.split}"])
        checkpoint = args.checkpoint or cfg.model.checkpoint
        if not checkpoint:
            raise ConfigError("no teacher: pass --checkpoint or set model.checkpoint")
        transform, priors_used = None, None
        if args.adjust == "ia":
            transform, priors_used = estimate_stage_ia(cfg, args.priors or Path(cfg.output_dir) / "stages" / "estimate")
        out = Path(args.out or Path(cfg.output_dir) / "soft_labels" / args.split).resolve()
        with ray_session(cfg.ray.address):
            dataset = build_split(cfg, "target", train=False, with_labels=False)
            run_labelling(RayDataPasses(), cfg, checkpoint, dataset, out, pseudo_settings(cfg, transform),
                          priors_used, overwrite=args.overwrite)
    except (ConfigError, OutputConflict) as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
