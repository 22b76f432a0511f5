"""The main Ray Job: estimate the target prior, IA, CR on Ray Train, pseudo labels, self-distillation, evaluation.

    ray job submit --working-dir . -- python ray_jobs/refine.py --config configs/demo.yaml
    python ray_jobs/refine.py --config configs/demo.yaml [--stages estimate,evaluate_adapted] [section.key=value ...]
    python ray_jobs/refine.py --config configs/demo.yaml --overrides-file outputs/sweep_ia/sweeps/ia/best_overrides.yaml

Without a cluster address (``ray.address`` / ``RAY_ADDRESS``) it starts a local Ray instance. A job that runs
from the temporary copy `ray job submit --working-dir` makes of the code, and whose output_dir, ray.storage_path
or MLflow store would land in that copy, stops before it starts Ray with one ``refine.py: error:`` line naming
them (exit status 2), as does any other configuration error.

The console shows one line per stage, the training steps and loss (a progress bar on a terminal, a line per
quarter of a run otherwise, e.g. in ``ray job logs``), evaluation progress bars on a terminal, and the results
table. Ray's and MLflow's own output (banners, the Ray Train controller's INFO lines, worker output, alembic's
table creation) goes to ``<output_dir>/logs/job.log``, whose path is printed first. A failing job prints its
error and the log's path (the traceback is in the log) and exits with status 1; a stopped one (SIGTERM, e.g.
``ray job stop``) exits with status 143.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory of `ray job submit`

from labelshift.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from labelshift.runners.session import ray_session  # noqa: E402
from labelshift.console import Console, job_console  # noqa: E402
from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.progress import step_progress  # noqa: E402
from labelshift.runners import RayTrainRunner  # noqa: E402
from labelshift.runners.data import RayDataPasses  # noqa: E402
from labelshift.runtime import apply_runtime  # noqa: E402
from labelshift.tracking import (JobTerminated, build_tracker, check_outside_working_dir_copy,  # noqa: E402
                                 terminate_on_sigterm)

JOB_LOG = Path("logs") / "job.log"  # under output_dir
NAME = Path(__file__).name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--stages", default=None,
                        help="comma-separated stages to run, in pipeline order (default: the config's `stages`); "
                             "each needs its upstream stages complete")
    parser.add_argument("--progress", choices=("auto", "bars", "lines", "off"), default="auto",
                        help="training and evaluation progress: bars (redrawn in place), lines (a line per quarter "
                             "of a training run), off; auto (default): bars when stderr is a terminal, else lines")
    parser.add_argument("--overrides-file", default=None,
                        help="a YAML overrides file (a sweep's best_overrides.yaml: {config path: value}, or a list "
                             "of section.key=value), applied before the command line's overrides")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def job_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides file's ``section.key=value`` items, then the command line's (which win)."""
    from labelshift.bundle import BundleError, read_overrides_file

    if args.overrides_file is None:
        return list(args.overrides)
    try:
        return [*read_overrides_file(args.overrides_file), *args.overrides]
    except BundleError as err:
        raise ConfigError(str(err)) from None


def run_job(cfg: ExperimentConfig, stages: tuple[str, ...] | None, console: Console, progress: str) -> None:
    """Start (or join) Ray, open the job's MLflow run and run the pipeline, its lines and bars on ``console``."""
    import torch

    apply_runtime(cfg.runtime.torch_threads, cfg.runtime.deterministic)  # before the environment is recorded
    tracker = build_tracker(cfg)
    with ray_session(cfg.ray.address):
        device = torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")
        runner = RayTrainRunner(cfg.ray, cfg.ray.storage_path or Path(cfg.output_dir) / "ray",
                                progress=step_progress(progress, stream=console.err, log=console.line))
        with terminate_on_sigterm(), tracker.job(cfg):
            Pipeline(cfg, runner, tracker, device=device, log=console.line, progress=progress == "bars",
                     progress_stream=console.err, passes=RayDataPasses()).run(stages)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, job_overrides(args))
        check_outside_working_dir_copy(cfg)
    except ConfigError as err:
        print(f"{NAME}: error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # worker output goes to the job log: no colour codes
    stages = tuple(args.stages.split(",")) if args.stages else None
    with job_console(Path(cfg.output_dir) / JOB_LOG) as console:
        console.line(f"job log (Ray, MLflow, worker output): {console.log_path}")
        progress = args.progress if args.progress != "auto" else ("bars" if console.is_terminal else "lines")
        try:
            run_job(cfg, stages, console, progress)
        except ConfigError as err:
            console.error(f"{NAME}: error: {err}")
            return 2
        except Exception as err:  # noqa: BLE001 - the job's last word: the error on the console, the traceback logged
            console.log_traceback()
            console.error(f"{NAME}: error: {type(err).__name__}: {err}\n{NAME}: traceback and logs: "
                          f"{console.log_path}")
            return 1
        except (JobTerminated, KeyboardInterrupt) as err:
            console.log_traceback()
            console.error(f"{NAME}: stopped ({err or type(err).__name__}); re-run the same command to resume. "
                          f"Logs: {console.log_path}")
            return 143 if isinstance(err, JobTerminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
