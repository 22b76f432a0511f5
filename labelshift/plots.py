"""Charts of a job's results (PNG, matplotlib with the Agg backend, imported lazily): per-class IoU bars with
deltas, estimated vs oracle priors, a confusion-matrix heatmap, a loss curve; and :func:`stage_plots`, which
draws the charts of one finished stage from its output directory (what the job logs to each stage's MLflow
run, under ``plots/``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from labelshift.artifacts import (CONFUSION_FILE, NO_ADJUST, ORACLE_IA, PRIOR_INDEX, TARGET, estimate_name,
                                  evaluation_key, ia_name, oracle_name, read_priors)
from labelshift.priors import ClassPrior

PER_CLASS_PLOT = "per_class_iou_{split}.png"
CONFUSION_PLOT = "confusion_{split}_{transform}.png"
PRIOR_PLOT = "prior_estimate_vs_oracle.png"
LOSS_PLOT = "loss_curve.png"
PLOTTED_TRANSFORMS = (NO_ADJUST, ia_name(TARGET), ORACLE_IA)  # what a stage's per-class chart shows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def per_class_iou_bars(per_class: Mapping[str, Mapping[str, float | None]], path: Path, *,
                       baseline: str | Mapping[str, str] | None = None,
                       errors: Mapping[str, Mapping[str, float]] | None = None, title: str = "per-class IoU") -> Path:
    """Grouped bars: one group per class, one bar per series of ``per_class`` ({series: {class: IoU %}}, None:
    class absent), with ``errors`` ({series: {class: sd}}) as error bars. With ``baseline`` (a series, or
    {series: its baseline series}), a second panel shows each series' delta to its baseline per class."""
    plt = _pyplot()
    series = list(per_class)
    classes = list(dict.fromkeys(name for values in per_class.values() for name in values))
    values = np.array([[np.nan if per_class[s].get(c) is None else per_class[s][c] for c in classes]
                       for s in series], dtype=np.float64)  # (S, K)
    if isinstance(baseline, str):
        baseline = {name: baseline for name in series if name != baseline} if baseline in series else {}
    baseline_of = {name: base for name, base in (baseline or {}).items() if name in series and base in series}
    others = [i for i, name in enumerate(series) if name in baseline_of]
    width_inches = max(6.0, 0.45 * len(classes) * max(1, len(series)) ** 0.5)
    figure, axes = plt.subplots(2 if others else 1, 1, figsize=(width_inches, 6.5 if others else 3.8), squeeze=False)
    width = 0.8 / len(series)
    positions = np.arange(len(classes))
    for i, name in enumerate(series):
        sd = None if errors is None or name not in errors else [errors[name].get(c, 0.0) for c in classes]
        axes[0, 0].bar(positions + (i - (len(series) - 1) / 2) * width, values[i], width, yerr=sd, label=name)
    axes[0, 0].set(ylabel="IoU (%)", title=title, ylim=(0, 100))
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if others:
        width = 0.8 / len(others)
        for j, i in enumerate(others):
            delta = values[i] - values[series.index(baseline_of[series[i]])]
            axes[1, 0].bar(positions + (j - (len(others) - 1) / 2) * width, delta, width, label=series[i])
        axes[1, 0].axhline(0.0, color="black", linewidth=0.7)
        bases = sorted(set(baseline_of.values()))
        axes[1, 0].set(ylabel=f"Δ IoU vs {bases[0] if len(bases) == 1 else 'baseline'} (points)")
        axes[1, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for row in axes[:, 0]:
        row.set_xticks(positions, classes, rotation=60, ha="right", fontsize=7)
    return _save(figure, path)


def prior_vs_oracle(estimates: Mapping[str, ClassPrior], oracle: ClassPrior, path: Path) -> Path:
    """Bars of each estimated prior beside the oracle (the target labels' prior of the same kind), per class."""
    plt = _pyplot()
    names = ["oracle", *estimates]
    probs = [oracle.probs, *(prior.probs for prior in estimates.values())]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(oracle.classes)), 3.8))
    width = 0.8 / len(names)
    positions = np.arange(len(oracle.classes))
    for i, (name, values) in enumerate(zip(names, probs)):
        axes.bar(positions + (i - (len(names) - 1) / 2) * width, values, width, label=name,
                 color="black" if name == "oracle" else None)
    axes.set_xticks(positions, list(oracle.classes), rotation=60, ha="right", fontsize=7)
    axes.set(ylabel=f"{oracle.kind} prior", title=f"estimated vs oracle target prior ({oracle.kind})")
    axes.legend(fontsize=7)
    return _save(figure, path)


def confusion_heatmap(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """``matrix``: (K, K) pixel counts, rows true classes, columns predictions; drawn row-normalised (recall)."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    image = axes.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, list(class_names), rotation=90, fontsize=6)
    axes.set_yticks(ticks, list(class_names), fontsize=6)
    axes.set(xlabel="predicted", ylabel="true", title=title or "confusion (row-normalised)")
    figure.colorbar(image, ax=axes, fraction=0.046)
    return _save(figure, path)


def loss_curve(steps: Sequence[int], losses: Sequence[float], path: Path, title: str = "training loss") -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot(list(steps), list(losses), marker="." if len(steps) < 50 else None)
    axes.set(xlabel="step", ylabel="loss", title=title)
    return _save(figure, path)


def _evaluation_plots(stage_dir: Path, metrics: Mapping, out: Path) -> list[Path]:
    """Per split, the per-class IoU of the plotted transforms (deltas to no adjustment); a heatmap per
    plotted evaluation whose confusion matrix the stage wrote."""
    paths = []
    confusion_path = stage_dir / CONFUSION_FILE
    confusions = json.loads(confusion_path.read_text()) if confusion_path.is_file() else {}
    for split in dict.fromkeys(key.split("/")[0] for key in metrics if "/" in key):
        series = {transform: metrics[evaluation_key(split, transform)]["per_class_iou"]
                  for transform in PLOTTED_TRANSFORMS if evaluation_key(split, transform) in metrics}
        if not series:
            continue
        paths.append(per_class_iou_bars(series, out / PER_CLASS_PLOT.format(split=split), baseline=NO_ADJUST,
                                        title=f"{stage_dir.name}: per-class IoU on {split}"))
        for transform, per_class in series.items():
            matrix = confusions.get(evaluation_key(split, transform))
            if matrix is not None:
                paths.append(confusion_heatmap(np.array(matrix), list(per_class),
                                               out / CONFUSION_PLOT.format(split=split, transform=transform),
                                               title=f"{split} · {transform}"))
    return paths


def _prior_plots(stage_dir: Path, out: Path) -> list[Path]:
    """Every estimate of the oracle's kind (and the target prior IA uses) against the oracle, when the target
    labels gave one."""
    priors = read_priors(stage_dir)
    paths = []
    for kind in ("pixel", "image"):
        oracle = priors.get(oracle_name(kind))
        if oracle is None:
            continue
        estimates = {name.removeprefix(estimate_name("")): prior for name, prior in priors.items()
                     if name.startswith(estimate_name("")) and prior.kind == kind}
        if priors[TARGET].kind == kind:
            estimates[TARGET] = priors[TARGET]
        if estimates:
            paths.append(prior_vs_oracle(estimates, oracle, out / PRIOR_PLOT.replace(".png", f"_{kind}.png")))
    return paths


def stage_plots(stage_dir: Path, metrics: Mapping, out: Path,
                loss_history: Sequence[tuple[int, float]] = ()) -> list[Path]:
    """The charts of one finished stage, written under ``out``: per-class IoU and confusion heatmaps for an
    evaluation stage (its ``<split>/<transform>`` metrics, ``confusion.json``), estimated vs oracle priors for
    the estimate stage (its ``priors.json``), the loss curve of a training stage (``loss_history``: (step,
    loss) pairs). Returns the files written (none for a stage without anything to draw)."""
    stage_dir, out = Path(stage_dir), Path(out)
    paths = _evaluation_plots(stage_dir, metrics, out)
    if (stage_dir / PRIOR_INDEX).is_file():
        paths += _prior_plots(stage_dir, out)
    if loss_history:
        steps, losses = zip(*sorted(loss_history))
        paths.append(loss_curve(steps, losses, out / LOSS_PLOT, title=f"{stage_dir.name}: training loss"))
    return paths
