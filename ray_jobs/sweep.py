"""Ray Tune sweeps of a trained experiment: IA settings over cached logits, or CR's loss strength on Ray Train.

    python ray_jobs/sweep.py --config configs/sweep_ia.yaml [--space ia|cr] [section.key=value ...]
    ray job submit --working-dir . -- python ray_jobs/sweep.py --config configs/sweep_ia.yaml output_dir=/abs/...

Runs the job's ``pretrain`` (embedded world) and ``estimate`` stages first when they are not complete (as
``refine.py --stages estimate`` would), then the sweep of the config's ``sweep.<space>`` section: settings are
chosen on the labelled ``data.target_select`` split, the choice's target-val mIoU is evaluated once, and
``<output_dir>/sweeps/<space>/`` receives ``best_overrides.yaml`` / ``best_config.yaml`` / ``summary.json`` /
``trials.json`` and plots. MLflow: one parent run (the job's), one nested run per trial. Configuration errors
print one ``sweep.py: error:`` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory of `ray job submit`

from labelshift.config import ConfigError, load_config  # noqa: E402
from labelshift.runners.session import ray_session  # noqa: E402
from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.runners import RayTrainRunner  # noqa: E402
from labelshift.tracking import build_tracker, check_outside_working_dir_copy, terminate_on_sigterm  # noqa: E402

UPSTREAM = ("estimate",)  # (pretrain runs too on the embedded world)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML with a sweep: section (configs/sweep_*.yaml)")
    parser.add_argument("--space", choices=("ia", "cr"), default="ia", help="which sweep.<space> to run")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from labelshift.runners.sweeps import run_cr_sweep, run_ia_sweep
    from labelshift.runners.tune import TrackingLink
    from labelshift.sweep_report import summary_metrics

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.sweep is None:
            raise ConfigError(f"{args.config} has no sweep: section (see configs/sweep_ia.yaml)")
        cfg.sweep.space(args.space)
        check_outside_working_dir_copy(cfg)
        tracker = build_tracker(cfg)
    except (ConfigError, ValueError) as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2
    with ray_session(cfg.ray.address):
        device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
        runner = RayTrainRunner(cfg.ray, cfg.ray.storage_path or Path(cfg.output_dir) / "ray")
        with terminate_on_sigterm(), tracker.job(cfg):
            pipeline = Pipeline(cfg, runner, tracker, device=device)
            pipeline.run(UPSTREAM)
            tracker.set_tags({"labelshift.sweep": args.space, "labelshift.selection_split": "data.target_select",
                              "labelshift.uses_target_labels": "true (data.target_select; never data.target_val)"})
            link = None
            if tracker.parent_run_id is not None:
                link = TrackingLink(tracker.tracking_uri, cfg.tracking.experiment, tracker.parent_run_id)
            sweep = run_ia_sweep if args.space == "ia" else run_cr_sweep
            outcome = sweep(cfg, pipeline.adapted_model_path(), pipeline.stages_root / "estimate", device=device,
                            tracking=link)
            tracker.log_metrics({f"sweep_{args.space}.{k}": v for k, v in summary_metrics(outcome.summary).items()})
            for path in outcome.files:
                tracker.log_artifact(path, artifact_path=f"sweep_{args.space}")
        print(json.dumps(outcome.summary["chosen"]))
        print(f"best setting written to {outcome.files[1]} (overrides) and {outcome.files[2]} (config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
