"""Benchmark of the target-prior estimators and of Inference Adjustment (IA) on two problems.

1. **digits** (real data): scikit-learn's bundled handwritten digits. A multinomial logistic regression is
   trained on a source split; a labelled source-validation split fits BCTS and BBSE's confusion; target sets
   are drawn from a held-out pool with Dirichlet-shifted class priors. For each shift: the L1 error of each
   estimate against the true (empirical) target prior, and accuracy without adjustment, with IA using the
   ``em_bcts`` estimate and with IA using the oracle prior (both in the calibrated logit space).
2. **world** (the embedded synthetic world): the library's own pipeline, stages ``pretrain``, ``estimate`` and
   ``evaluate_adapted``, run in-process on CPU; its manifests give each estimator's prior error and IA mIoU.

``python -m labelshift.bench.priors [--world-config configs/demo.yaml] [--out DIR] [--skip-world]
[--digits-seeds N] [section.key=value ...]`` prints markdown tables, writes ``<out>/priors_benchmark.md`` and
``<out>/priors_benchmark.json``, and ends with one JSON line (``world`` is null with ``--skip-world``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from labelshift.adjust import ia_transform
from labelshift.calibrate import Calibration, fit_calibration
from labelshift.estimate import ESTIMATORS, PIXEL_METHODS, estimate_prior, estimator_class
from labelshift.atomic import write_json_atomic, write_text_atomic
from labelshift.config import AdjustConfig
from labelshift.priors import ClassPrior, prior_l1

if TYPE_CHECKING:
    from labelshift.config import ExperimentConfig

EM_BCTS = "em_bcts"  # EM on BCTS-calibrated posteriors (the other pixel methods see the raw softmax, bbse the calibrated)
DIGITS_PIXEL_METHODS = tuple(m for m in PIXEL_METHODS if m in ESTIMATORS)  # no ensemble: digits have no image prior
DIGITS_METHODS = (*DIGITS_PIXEL_METHODS, EM_BCTS)
DIGITS_ACCURACIES = ("accuracy_no_adjust", "accuracy_em_adjust", "accuracy_oracle_adjust")
DEFAULT_CONCENTRATIONS = (0.1, 1.0, 10.0)
DEFAULT_SEEDS = 5
DEFAULT_TARGET_SIZE = 500
WORLD_STAGES = ("pretrain", "estimate", "evaluate_adapted")
WORLD_SPLITS = ("source", "source_val", "target", "target_val")


@contextlib.contextmanager
def _quiet_floors() -> Iterator[None]:
    """Silence the (expected) warnings about floored zero-mass classes of sparse Dirichlet priors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*zero prior mass.*")
        yield


# ------------------------------------------------------------------------------------------------ digits
@dataclass
class DigitsTask:
    """A digits classifier trained on the source split and its logits on the held-out splits."""

    classes: tuple[str, ...]
    source_prior: np.ndarray  # (K,) class frequencies of the source training split
    calibration: Calibration  # BCTS fitted on the source-validation logits
    val_probs: torch.Tensor  # (Nv, K) calibrated probabilities of the source-validation split
    val_labels: torch.Tensor  # (Nv,)
    pool_logits: torch.Tensor  # (Np, K) raw logits of the target pool
    pool_labels: np.ndarray  # (Np,)
    source_accuracy: float  # on source validation, raw argmax


def prepare_digits(seed: int = 0, *, pool_fraction: float = 0.4, val_fraction: float = 0.5,
                   regularisation: float = 1.0) -> DigitsTask:
    """Split the digits (stratified, seeded) into source train / source val / target pool and fit the model.

    The classifier is a multinomial logistic regression (lbfgs, deterministic) on pixels scaled to [0, 1];
    ``regularisation`` is its inverse strength ``C``. Logits are its decision function (float64).
    """
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    features, labels = load_digits(return_X_y=True)
    features = features / 16.0
    x_source, x_pool, y_source, y_pool = train_test_split(features, labels, test_size=pool_fraction,
                                                          stratify=labels, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_source, y_source, test_size=val_fraction,
                                                      stratify=y_source, random_state=seed)
    model = LogisticRegression(C=regularisation, max_iter=5000).fit(x_train, y_train)
    num_classes = len(model.classes_)
    val_logits = torch.from_numpy(model.decision_function(x_val)).double()
    val_labels = torch.from_numpy(y_val).long()
    calibration = fit_calibration(val_logits, val_labels, "bcts")
    return DigitsTask(
        classes=tuple(str(c) for c in model.classes_),
        source_prior=np.bincount(y_train, minlength=num_classes) / len(y_train),
        calibration=calibration,
        val_probs=calibration.apply(val_logits).softmax(1),
        val_labels=val_labels,
        pool_logits=torch.from_numpy(model.decision_function(x_pool)).double(),
        pool_labels=np.asarray(y_pool),
        source_accuracy=float((val_logits.argmax(1) == val_labels).double().mean()),
    )


def sample_target(labels: np.ndarray, prior: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a target set of ``size`` points whose class counts are Multinomial(size, prior).

    Points of each class are drawn from the pool's points of that class, with replacement only when the
    class needs more points than the pool holds.
    """
    counts = rng.multinomial(size, prior)
    chosen = []
    for label, count in enumerate(counts):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, count, replace=count > len(members)))
    return rng.permutation(np.concatenate(chosen))


def _estimates(task: DigitsTask, logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Every digits estimate of the target prior from target logits (N, K), as (K,) vectors."""
    raw = logits.softmax(1)
    calibrated = task.calibration.apply(logits).softmax(1)
    common = {"classes": task.classes, "bootstrap": 0}
    priors = {}
    with _quiet_floors():
        for method in DIGITS_PIXEL_METHODS:
            if estimator_class(method).needs_source_labels:
                priors[method] = estimate_prior(calibrated, method, source_probs=task.val_probs,
                                                source_labels=task.val_labels, **common)
            else:
                priors[method] = estimate_prior(raw, method, source_prior=task.source_prior, **common)
        priors[EM_BCTS] = estimate_prior(calibrated, "em", source_prior=task.source_prior, **common)
    return {method: prior.probs for method, prior in priors.items()}


def _ia_accuracy(task: DigitsTask, logits: torch.Tensor, labels: torch.Tensor, target_prior: np.ndarray) -> float:
    """Accuracy of IA (the library's IA factory) in the calibrated space: z/T − log(π_s·e^{−b}) + log π_t."""
    with _quiet_floors():
        transform = ia_transform(AdjustConfig(space="calibrated"), ClassPrior(task.classes, task.source_prior, "pixel"),
                                 ClassPrior(task.classes, target_prior, "pixel"), task.calibration)
        adjusted = transform(logits)
    return float((adjusted.argmax(1) == labels).double().mean())


def evaluate_shift(task: DigitsTask, indices: np.ndarray) -> dict[str, Any]:
    """Prior errors and accuracies on the target set ``indices`` of the pool."""
    logits = task.pool_logits[indices]
    labels = torch.from_numpy(task.pool_labels[indices]).long()
    true_prior = np.bincount(task.pool_labels[indices], minlength=len(task.classes)) / len(indices)
    estimates = _estimates(task, logits)
    record: dict[str, Any] = {"true_prior": true_prior.tolist(),
                              "no_adjust_l1": prior_l1(task.source_prior, true_prior)}
    for method, estimate in estimates.items():
        record[f"{method}_l1"] = prior_l1(estimate, true_prior)
    record["accuracy_no_adjust"] = float((logits.argmax(1) == labels).double().mean())
    record["accuracy_em_adjust"] = _ia_accuracy(task, logits, labels, estimates[EM_BCTS])
    record["accuracy_oracle_adjust"] = _ia_accuracy(task, logits, labels, true_prior)
    return record


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}


def run_digits(*, seeds: int = DEFAULT_SEEDS, concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS,
               target_size: int = DEFAULT_TARGET_SIZE, seed: int = 0) -> dict[str, Any]:
    """The digits benchmark: ``seeds`` Dirichlet(α·1) target priors per concentration α.

    Returns {"settings", "source_accuracy", "calibration", "records" (one per shift), "per_alpha"
    ({α: {metric: {"mean", "std"}}}), "summary" ({metric: mean over every shift})}.
    """
    task = prepare_digits(seed)
    num_classes = len(task.classes)
    records = []
    for alpha in concentrations:
        for shift_seed in range(seeds):
            rng = np.random.default_rng([seed, shift_seed, round(alpha * 1_000_000)])
            prior = rng.dirichlet(np.full(num_classes, float(alpha)))
            record = evaluate_shift(task, sample_target(task.pool_labels, prior, target_size, rng))
            records.append({"alpha": float(alpha), "seed": shift_seed, **record})
    metrics = ["no_adjust_l1", *(f"{m}_l1" for m in DIGITS_METHODS), *DIGITS_ACCURACIES]
    per_alpha = {str(float(alpha)): {key: _mean_std([r[key] for r in records if r["alpha"] == float(alpha)])
                                     for key in metrics} for alpha in concentrations}
    return {
        "settings": {"seeds": seeds, "concentrations": [float(a) for a in concentrations],
                     "target_size": target_size, "seed": seed, "source_prior": task.source_prior.tolist(),
                     "model": "multinomial logistic regression (sklearn, C=1)"},
        "source_accuracy": task.source_accuracy,
        "calibration": task.calibration.to_dict(),
        "records": records,
        "per_alpha": per_alpha,
        "summary": {key: float(np.mean([r[key] for r in records])) for key in metrics},
    }


# ------------------------------------------------------------------------------------------------- world
def world_config(path: str | Path, out: Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment config with ``output_dir=<out>/world``; an embedded world is generated under it too.

    Unless an override sets a ``.root``, the data roots of an embedded world are moved under
    ``<out>/world/data`` so that worlds of different knobs never share (and clash in) one directory.
    """
    from labelshift.config import load_config

    overrides = [*overrides, f"output_dir={out / 'world'}"]
    cfg = load_config(path, overrides)
    if cfg.data.world is None or any(o.split("=", 1)[0].strip().endswith(".root") for o in overrides):
        return cfg
    old_root = Path(cfg.data.source.root).parent
    moved = []
    for split in WORLD_SPLITS:
        dataset = getattr(cfg.data, split)
        if dataset is not None and Path(dataset.root).is_relative_to(old_root):
            moved.append(f"data.{split}.root={out / 'world' / 'data' / Path(dataset.root).relative_to(old_root)}")
    return load_config(path, [*overrides, *moved])


def run_world(config: str | Path, out: Path, overrides: Sequence[str] = (),
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run pretrain, estimate and evaluate_adapted in-process on CPU; returns :func:`world_metrics`."""
    from labelshift.pipeline.job import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import Tracker

    cfg = world_config(config, out, overrides)
    pipeline = Pipeline(cfg, LocalTrainRunner(out / "train", "cpu"), Tracker(), device="cpu", log=log)
    pipeline.run(WORLD_STAGES)
    return world_metrics(pipeline.results["estimate"], pipeline.results["evaluate_adapted"])


def world_metrics(estimate: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """Summary of the estimate and evaluate_adapted stage metrics (mIoU in percent points).

    ``<method>_recovered_fraction`` = (IA mIoU − no-adjust mIoU) / (pixel-oracle IA mIoU − no-adjust mIoU),
    None when the oracle gain is not positive (the ratio means nothing then).
    """
    from labelshift.artifacts import (NO_ADJUST, estimate_name, evaluation_key, ia_name, oracle_name,
                                      prior_error_key)
    from labelshift.estimate import METHODS, method_kind

    def miou(split: str, transform: str) -> float:
        return float(evaluation[evaluation_key(split, transform)]["miou"])

    none, oracle = miou("target_val", NO_ADJUST), miou("target_val", ia_name(oracle_name("pixel")))
    gain = oracle - none
    metrics: dict[str, Any] = {
        "no_adjust_miou": none, "oracle_ia_miou": oracle, "oracle_gain": gain,
        "oracle_image_ia_miou": miou("target_val", ia_name(oracle_name("image"))),
        "source_val_miou": miou("source_val", NO_ADJUST) if evaluation_key("source_val", NO_ADJUST) in evaluation
        else None,
        "no_adjust_pixel_l1": estimate.get(prior_error_key("no_adjust_pixel", "l1")),
        "no_adjust_image_l1": estimate.get(prior_error_key("no_adjust_image", "l1")),
        "calibration_temperature": estimate.get("calibration_temperature"),
    }
    order = sorted(METHODS, key=lambda m: method_kind(m) != "pixel")  # pixel methods first
    methods = [m for m in order if prior_error_key(m, "l1") in estimate]
    for method in methods:
        ia_miou = miou("target_val", ia_name(estimate_name(method)))
        metrics[f"{method}_kind"] = method_kind(method)
        metrics[f"{method}_l1"] = float(estimate[prior_error_key(method, "l1")])
        metrics[f"{method}_kl"] = float(estimate[prior_error_key(method, "kl")])
        metrics[f"{method}_ia_miou"] = ia_miou
        metrics[f"{method}_recovered_fraction"] = (ia_miou - none) / gain if gain > 1e-9 else None
    metrics["methods"] = methods
    return metrics


# ----------------------------------------------------------------------------------------------- reports
def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def world_table(world: dict[str, Any]) -> str:
    """Markdown: method | prior kind | L1 | KL | IA mIoU | recovered fraction, with no-adjust and oracle rows."""
    rows = [["no adjustment (source prior)", "pixel / image",
             f"{_cell(world['no_adjust_pixel_l1'])} / {_cell(world['no_adjust_image_l1'])}", "–",
             _cell(world["no_adjust_miou"], 2), "0"]]
    for method in world["methods"]:
        rows.append([method, world[f"{method}_kind"], _cell(world[f"{method}_l1"]), _cell(world[f"{method}_kl"]),
                     _cell(world[f"{method}_ia_miou"], 2), _cell(world[f"{method}_recovered_fraction"], 3)])
    rows.append(["oracle (target-train pixel prior)", "pixel", "0", "0", _cell(world["oracle_ia_miou"], 2), "1"])
    rows.append(["oracle (target-train image prior)", "image", "0", "0", _cell(world["oracle_image_ia_miou"], 2),
                 "–"])
    table = _markdown(["method", "kind", "L1", "KL(oracle‖est)", "IA mIoU", "recovered fraction"], rows)
    return (f"{table}\n\noracle gain {world['oracle_gain']:.2f} mIoU points; source-val mIoU "
            f"{_cell(world['source_val_miou'], 2)}; BCTS temperature {_cell(world['calibration_temperature'], 3)}.")


def digits_tables(digits: dict[str, Any]) -> str:
    """Markdown: mean ± std L1 per method and α, and accuracy per adjustment and α."""
    alphas = list(digits["per_alpha"])
    header = ["method", *(f"α={a}" for a in alphas), "all shifts"]

    def row(label: str, key: str) -> list[str]:
        stats = [digits["per_alpha"][alpha][key] for alpha in alphas]
        cells = [f"{stat['mean']:.4f} ± {stat['std']:.4f}" for stat in stats]
        return [label, *cells, f"{digits['summary'][key]:.4f}"]

    l1_rows = [row("no adjustment (source prior)", "no_adjust_l1")] + [row(m, f"{m}_l1") for m in DIGITS_METHODS]
    labels = {"accuracy_no_adjust": "no adjustment", "accuracy_em_adjust": "IA, em_bcts estimate",
              "accuracy_oracle_adjust": "IA, oracle prior"}
    accuracy_rows = [row(labels[key], key) for key in DIGITS_ACCURACIES]
    settings = digits["settings"]
    return (f"Prior L1 error vs the true target prior (mean ± std over {settings['seeds']} seeds, "
            f"{settings['target_size']} target points per shift):\n\n{_markdown(header, l1_rows)}\n\n"
            f"Target accuracy (source-val accuracy {digits['source_accuracy']:.4f}):\n\n"
            f"{_markdown(['adjustment', *header[1:]], accuracy_rows)}")


def _finite_or_none(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


def final_summary(world: dict[str, Any] | None, digits: dict[str, Any]) -> dict[str, Any]:
    """The one-line result: world numbers (or None) and digits means over every shift."""
    world_line = None
    if world is not None:
        keys = ["no_adjust_miou", "oracle_ia_miou", "oracle_gain"]
        for method in world["methods"]:
            keys += [f"{method}_l1", f"{method}_ia_miou", f"{method}_recovered_fraction"]
        world_line = {key: _finite_or_none(world[key]) for key in keys}
    summary = digits["summary"]
    digits_line = {f"{m}_l1": summary[f"{m}_l1"] for m in DIGITS_METHODS}
    digits_line.update({key: summary[key] for key in DIGITS_ACCURACIES})
    digits_line["no_adjust_l1"] = summary["no_adjust_l1"]
    return {"world": world_line, "digits": digits_line}


# -------------------------------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"concentrations must be positive numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labelshift.bench.priors", description=__doc__.split("\n")[0])
    parser.add_argument("--world-config", default="configs/demo.yaml", help="experiment config of the world part")
    parser.add_argument("--out", default="outputs/bench_priors", help="output directory")
    parser.add_argument("--skip-world", action="store_true", help="run the digits part only")
    parser.add_argument("--digits-seeds", type=int, default=DEFAULT_SEEDS, help="target priors per concentration")
    parser.add_argument("--digits-concentrations", type=_floats, default=DEFAULT_CONCENTRATIONS,
                        help="comma-separated Dirichlet concentrations α of the target priors, e.g. 0.1,1,10")
    parser.add_argument("--digits-target-size", type=int, default=DEFAULT_TARGET_SIZE, help="points per target set")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the world config")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; stage logs go to stderr, tables and the final JSON line to stdout."""
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    digits = run_digits(seeds=args.digits_seeds, concentrations=args.digits_concentrations,
                        target_size=args.digits_target_size)
    world = None
    if not args.skip_world:
        world = run_world(args.world_config, out, args.overrides, log=lambda line: print(line, file=sys.stderr))
    sections = ["# Prior-estimation benchmark", "## Digits (scikit-learn, real data)", digits_tables(digits)]
    if world is not None:
        sections += [f"## Embedded world ({args.world_config})", world_table(world)]
    report = "\n\n".join(sections) + "\n"
    summary = final_summary(world, digits)
    write_text_atomic(out / "priors_benchmark.md", report)
    write_json_atomic(out / "priors_benchmark.json", {"summary": summary, "world": world, "digits": digits})
    print(report)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
