"""The main Ray Job: estimate the target prior, IA, CR on Ray Train, pseudo labels, self-distillation, evaluation.

    ray job submit --working-dir . -- python ray_jobs/refine.py --config configs/demo.yaml
    python ray_jobs/refine.py --config configs/demo.yaml [--stages estimate,evaluate_adapted] [section.key=value ...]

Without a cluster address (``ray.address`` / ``RAY_ADDRESS``) it starts a local Ray instance. A job that runs
from the temporary copy `ray job submit --working-dir` makes of the code, and whose output_dir, ray.storage_path
or MLflow store would land in that copy, stops before it starts Ray with one ``refine.py: error:`` line naming
them (exit status 2), as does any other configuration error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory of `ray job submit`

from labelshift.config import ConfigError, load_config  # noqa: E402
from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.runners import RayTrainRunner  # noqa: E402
from labelshift.tracking import build_tracker, check_outside_working_dir_copy, terminate_on_sigterm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stages to run, in pipeline order (default: the config's `stages`); "
                             "each needs its upstream stages complete")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import ray
    import torch

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_outside_working_dir_copy(cfg)
        tracker = build_tracker(cfg)
    except ConfigError as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Inside `ray job submit`, RAY_ADDRESS names the cluster. Otherwise start a fresh local instance ("local"),
    # never attach to whatever cluster /tmp/ray last recorded.
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    try:
        device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
        runner = RayTrainRunner(cfg.ray, cfg.ray.storage_path or Path(cfg.output_dir) / "ray")
        stages = tuple(args.stages.split(",")) if args.stages else None
        with terminate_on_sigterm(), tracker.job(cfg):
            Pipeline(cfg, runner, tracker, device=device).run(stages)
    finally:
        if started_here:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
