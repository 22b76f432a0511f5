"""``labelshift compare``: the main job's runs side by side, from an MLflow store (mlflow imported lazily).

A *job* is a parent run (one per ``ray_jobs/refine.py`` run); its nested stage runs hold the evaluations
(``<split>/<transform>.miou``, ``.miou_<subset>`` (mIoU*), ``.per_class_iou.<class>``: ``labelshift.artifacts``)
and the estimate stage's prior errors (``<method>_l1`` / ``_kl``). A *row* is one evaluation of target val: a
stage and a logit transform (``evaluate_adapted`` · ``ia_target``, ``evaluate_refined`` · ``none``, ...).

Jobs whose configurations (the parent run's params) differ only in seeds (keys ending in ``seed``; the job's
name, ``output_dir``, ``tracking.*`` and ``ray.*`` say where and how it ran, not what) are folded into one group
whose numbers are the mean ± sample sd over its jobs. Deltas are against the baseline job's group, row by row.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from labelshift.artifacts import (NO_ADJUST, ORACLE_IA, TARGET, evaluation_key, ia_name, prior_error_key)

SPLIT = "target_val"
DEFAULT_TRANSFORMS = (NO_ADJUST, ia_name(TARGET), ORACLE_IA)  # the results table's rows; --all: every transform
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "labelshift.stage"
IGNORED_PARAMS = ("name", "output_dir")
IGNORED_PREFIXES = ("tracking.", "ray.")
PRIOR_MEASURES = ("l1", "kl")


class CompareError(ValueError):
    """What was asked for is not in the store (a run id, an experiment, the store itself)."""


@dataclass
class Job:
    """One parent run: its id and name, config params, rows {(stage, transform): {metric: value}} and prior
    errors {key: value}."""

    run_id: str
    name: str
    params: dict[str, str]
    rows: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    prior_errors: dict[str, float] = field(default_factory=dict)

    def identity(self) -> tuple:
        """What the job computed, seeds left out: jobs with equal identities differ only in their seeds."""
        return tuple(sorted((k, v) for k, v in self.params.items() if not (
            k in IGNORED_PARAMS or k.startswith(IGNORED_PREFIXES) or k.rsplit(".", 1)[-1].endswith("seed"))))


@dataclass
class Group:
    """Jobs that differ only in seeds: rows and prior errors as (mean, sd) over them (sd None for one job)."""

    label: str
    run_ids: list[str]
    rows: dict[tuple[str, str], dict[str, tuple[float, float | None]]]
    prior_errors: dict[str, tuple[float, float | None]]


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fold(jobs: list[Job]) -> Group:
    """One group of jobs with equal identities; a number is averaged over the jobs that have it."""
    rows: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {}
    for row in dict.fromkeys(row for job in jobs for row in job.rows):
        metrics = dict.fromkeys(m for job in jobs for m in job.rows.get(row, {}))
        rows[row] = {m: _mean_sd([job.rows[row][m] for job in jobs if m in job.rows.get(row, {})]) for m in metrics}
    errors = dict.fromkeys(key for job in jobs for key in job.prior_errors)
    label = jobs[0].name if len(jobs) == 1 else f"{jobs[0].name} (n={len(jobs)})"
    return Group(label, [job.run_id for job in jobs], rows,
                 {key: _mean_sd([job.prior_errors[key] for job in jobs if key in job.prior_errors]) for key in errors})


def fold_seeds(jobs: list[Job]) -> list[Group]:
    """Groups of jobs that differ only in seeds, in the order of each group's first job."""
    by_identity: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_identity.setdefault(job.identity(), []).append(job)
    return [_fold(members) for members in by_identity.values()]


# ------------------------------------------------------------------------------------------- reading the store
def _rows_of(metrics: dict[str, float], stage: str, transforms: tuple[str, ...] | None) -> dict:
    """{(stage, transform): {"miou", "miou_<subset>", "per_class_iou.<class>": value}} of one stage run."""
    rows: dict[tuple[str, str], dict[str, float]] = {}
    prefix = evaluation_key(SPLIT, "")
    for key, value in metrics.items():
        if not key.startswith(prefix) or "." not in key:
            continue
        transform, metric = key[len(prefix):].split(".", 1)
        if transforms is None or transform in transforms:
            rows.setdefault((stage, transform), {})[metric] = value
    return {row: values for row, values in rows.items() if "miou" in values}


def _prior_errors_of(metrics: dict[str, float]) -> dict[str, float]:
    from labelshift.estimate import METHODS

    methods = ("no_adjust_pixel", "no_adjust_image", *METHODS)
    keys = [prior_error_key(method, measure) for method in methods for measure in PRIOR_MEASURES]
    return {key: metrics[key] for key in keys if key in metrics}


def _job(run, children: Iterable, transforms: tuple[str, ...] | None) -> Job:
    job = Job(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.params))
    for child in sorted(children, key=lambda r: r.info.start_time or 0):  # a resumed stage: the latest wins
        stage = child.data.tags.get(STAGE_TAG, child.info.run_name)
        job.rows.update(_rows_of(child.data.metrics, stage, transforms))
        job.prior_errors.update(_prior_errors_of(child.data.metrics))
    return job


def _open_store(tracking_uri: str):
    import mlflow

    from labelshift.tracking import absolute_tracking_uri, local_store_path

    store = local_store_path(tracking_uri)
    if store is not None and not store.exists():
        raise CompareError(f"no MLflow store at {store} (tracking URI {tracking_uri}): run a job first, or pass "
                           "--tracking-uri / MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(absolute_tracking_uri(tracking_uri))
    return mlflow


def _parent_of(mlflow, run_id: str):
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise CompareError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()}: {exc.message}") from None
    parent = run.data.tags.get(PARENT_TAG)
    return run if parent is None else _parent_of(mlflow, parent)


def load_jobs(tracking_uri: str, experiment: str | None = None, run_ids: Iterable[str] = (),
              transforms: tuple[str, ...] | None = DEFAULT_TRANSFORMS) -> list[Job]:
    """The jobs of ``run_ids`` (a stage run stands for its job), else every job of ``experiment`` (default: of
    every experiment) that has an evaluation, oldest first. ``transforms``: the rows to read (None: all).
    Raises :class:`CompareError`."""
    mlflow = _open_store(tracking_uri)
    if run_ids:
        parents = list({run.info.run_id: run for run in (_parent_of(mlflow, i) for i in run_ids)}.values())
    else:
        found = [mlflow.get_experiment_by_name(experiment)] if experiment else mlflow.search_experiments()
        if found == [None]:
            raise CompareError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}")
        runs = mlflow.search_runs([e.experiment_id for e in found], output_format="list",
                                  order_by=["attributes.start_time ASC"])
        parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    jobs = []
    for parent in parents:
        children = mlflow.search_runs([parent.info.experiment_id], output_format="list",
                                      filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
        jobs.append(_job(parent, children, transforms))
    if run_ids:
        empty = [job.run_id for job in jobs if not job.rows]
        if empty:
            raise CompareError(f"runs {empty} have no evaluation of {SPLIT} (not a finished main job?)")
    return [job for job in jobs if job.rows]


# ------------------------------------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """Groups of jobs (seeds folded) and the baseline group (None: no deltas)."""

    groups: list[Group]
    baseline: Group | None

    def delta(self, group: Group, row: tuple[str, str], metric: str) -> float | None:
        """``group``'s mean minus the baseline's on the same row and metric (None: no baseline or no match)."""
        if self.baseline is None or metric not in self.baseline.rows.get(row, {}):
            return None
        return group.rows[row][metric][0] - self.baseline.rows[row][metric][0]

    def prior_delta(self, group: Group, key: str) -> float | None:
        if self.baseline is None or key not in self.baseline.prior_errors:
            return None
        return group.prior_errors[key][0] - self.baseline.prior_errors[key][0]

    def records(self) -> list[dict]:
        """One record per (group, row, metric) and per (group, prior error): the long format of csv and json."""
        records = []
        for group in self.groups:
            common = {"job": group.label, "runs": " ".join(group.run_ids), "seeds": len(group.run_ids)}
            for (stage, transform), metrics in group.rows.items():
                for metric, (mean, sd) in metrics.items():
                    records.append({**common, "stage": stage, "transform": transform, "metric": metric,
                                    "mean": mean, "sd": sd, "delta": self.delta(group, (stage, transform), metric)})
            for key, (mean, sd) in group.prior_errors.items():
                records.append({**common, "stage": "estimate", "transform": "", "metric": key, "mean": mean,
                                "sd": sd, "delta": self.prior_delta(group, key)})
        return records


def compare(tracking_uri: str, experiment: str | None = None, run_ids: Iterable[str] = (),
            baseline: str | None = None, transforms: tuple[str, ...] | None = DEFAULT_TRANSFORMS) -> Comparison:
    """Jobs of ``run_ids`` (else of ``experiment``) with seeds folded; deltas against the group of the job of
    ``baseline`` (a run id, added to the jobs when it is not among them)."""
    run_ids = list(run_ids)
    jobs = load_jobs(tracking_uri, experiment, run_ids, transforms)
    baseline_id = None
    if baseline is not None:
        baseline_job = load_jobs(tracking_uri, run_ids=[baseline], transforms=transforms)[0]
        baseline_id = baseline_job.run_id
        if baseline_id not in {job.run_id for job in jobs}:
            jobs.insert(0, baseline_job)
    if not jobs:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise CompareError(f"no main-job runs with an evaluation of {SPLIT} in {where} of {tracking_uri}")
    groups = fold_seeds(jobs)
    found = next((g for g in groups if baseline_id in g.run_ids), None)
    return Comparison(groups, found)


# ------------------------------------------------------------------------------------------- output
def _number(mean: float, sd: float | None, delta: float | None = None) -> str:
    text = f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"
    return text if delta is None else f"{text} ({delta:+.2f})"


def _subset_metrics(comparison: Comparison) -> list[str]:
    return sorted({m for g in comparison.groups for r in g.rows.values() for m in r if m.startswith("miou_")})


def format_table(comparison: Comparison) -> str:
    """Markdown: mIoU (and mIoU* subsets) per row, per-class IoU per row, prior errors; ``(±Δ)`` vs baseline."""
    base = comparison.baseline
    title = f" (Δ vs {base.label}: {' '.join(base.run_ids)})" if base else ""
    subsets = _subset_metrics(comparison)
    lines = [f"mIoU on {SPLIT}{title}", "",
             "| job | runs | stage | transform | mIoU |" + "".join(f" {m} |" for m in subsets),
             "|---|---|---|---|---:|" + "---:|" * len(subsets)]
    classes: list[str] = []
    for group in comparison.groups:
        for row, metrics in group.rows.items():
            cells = [_number(*metrics[m], comparison.delta(group, row, m)) if m in metrics else ""
                     for m in ("miou", *subsets)]
            runs = " ".join(group.run_ids)  # full ids: what `--baseline` and RUN_ID take
            lines.append(f"| {group.label} | {runs} | {row[0]} | {row[1]} | " + " | ".join(cells) + " |")
            classes += [m for m in metrics if m.startswith("per_class_iou.") and m not in classes]
    lines += ["", f"per-class IoU on {SPLIT}", "",
              "| job | row | " + " | ".join(c.removeprefix("per_class_iou.") for c in classes) + " |",
              "|---|---|" + "---:|" * len(classes)]
    for group in comparison.groups:
        for row, metrics in group.rows.items():
            cells = [_number(*metrics[c], comparison.delta(group, row, c)) if c in metrics else "" for c in classes]
            lines.append(f"| {group.label} | {row[0]} · {row[1]} | " + " | ".join(cells) + " |")
    if any(group.prior_errors for group in comparison.groups):
        lines += ["", "prior errors (estimate stage, against the oracle of the same kind)", "",
                  "| job | measure | value |", "|---|---|---:|"]
        for group in comparison.groups:
            for key, (mean, sd) in group.prior_errors.items():
                delta = comparison.prior_delta(group, key)
                text = f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"
                lines.append(f"| {group.label} | {key} | {text}{'' if delta is None else f' ({delta:+.4f})'} |")
    return "\n".join(lines)


def format_records(comparison: Comparison, fmt: str) -> str:
    """``csv`` or ``json`` of :meth:`Comparison.records`."""
    records = comparison.records()
    if fmt == "json":
        return json.dumps({"baseline": comparison.baseline.run_ids if comparison.baseline else None,
                           "records": records}, indent=1)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["job", "runs", "seeds", "stage", "transform", "metric", "mean", "sd",
                                                "delta"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """Per-class IoU bars of every (group, row), with deltas to the baseline group's same row (without a
    baseline: to the first group's)."""
    from labelshift.plots import per_class_iou_bars

    reference = comparison.baseline or comparison.groups[0]
    series, errors, baselines = {}, {}, {}
    for group in comparison.groups:
        for row, metrics in group.rows.items():
            name = f"{group.label} · {row[0].removeprefix('evaluate_')} · {row[1]}"
            per_class = {m.removeprefix("per_class_iou."): v for m, v in metrics.items()
                         if m.startswith("per_class_iou.")}
            series[name] = {c: mean for c, (mean, _) in per_class.items()}
            errors[name] = {c: sd or 0.0 for c, (_, sd) in per_class.items()}
            if row in reference.rows and group is not reference:
                baselines[name] = f"{reference.label} · {row[0].removeprefix('evaluate_')} · {row[1]}"
    return per_class_iou_bars(series, Path(path), baseline=baselines, errors=errors,
                              title=f"per-class IoU on {SPLIT}")


# ------------------------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID",
                        help="runs to compare (a stage run stands for its job; default: every job of the experiment)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: every experiment)")
    parser.add_argument("--baseline", default=None, metavar="RUN_ID", help="deltas against this job's group")
    parser.add_argument("--format", default="table", choices=("table", "csv", "json"))
    parser.add_argument("--plot", default=None, metavar="FILE", help="PNG: per-class IoU bars with deltas")
    parser.add_argument("--all", action="store_true",
                        help="every transform evaluated (IA towards each estimate, ...), not only the results rows")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")


def run(args: argparse.Namespace) -> int:
    """``labelshift compare``: print the comparison; write the chart to ``--plot``."""
    from labelshift.tracking import default_tracking_uri

    comparison = compare(args.tracking_uri or default_tracking_uri(), args.experiment, args.run_ids, args.baseline,
                         None if args.all else DEFAULT_TRANSFORMS)
    sys.stdout.write((format_table(comparison) + "\n") if args.format == "table"
                     else format_records(comparison, args.format))
    if args.plot:
        print(f"chart written to {plot_comparison(comparison, Path(args.plot))}", file=sys.stderr)
    return 0
