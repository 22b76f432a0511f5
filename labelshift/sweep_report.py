"""What a sweep leaves behind, under ``<output_dir>/sweeps/<space>/``:

- ``trials.json``: every trial's setting and metrics;
- ``best_overrides.yaml``: the chosen setting as ``{config path: value}`` (``ray_jobs/refine.py --config C``
  plus these as ``path=value`` overrides; the HTTP server reads the ``adjust``/``prior`` keys);
- ``best_config.yaml``: the whole experiment config with the chosen setting (``refine.py --config`` takes it as
  it is; no ``sweep`` section);
- ``summary.json``: the labelled choice with its target-val mIoU (evaluated once), the reference setting, and
  the label-free choices with their regret;
- plots (IA): ``miou_over_tau_target_and_T.png`` and ``labelled_vs_label_free.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from labelshift.atomic import write_json_atomic, write_text_atomic
from labelshift.config import ExperimentConfig, config_from_dict, dump_config
from labelshift.config.sweep import SELECT_METRIC, with_setting

TRIALS_FILE, BEST_OVERRIDES_FILE, BEST_CONFIG_FILE, SUMMARY_FILE = (
    "trials.json", "best_overrides.yaml", "best_config.yaml", "summary.json")
MIOU_PLOT, OBJECTIVE_PLOT = "miou_over_tau_target_and_T.png", "labelled_vs_label_free.png"


def write_sweep_outputs(directory: Path, cfg: ExperimentConfig, records: Sequence[dict], summary: dict,
                        plots: bool = True) -> list[Path]:
    """Write the files above; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    best = summary["chosen"]["setting"]
    chosen_cfg = config_from_dict(with_setting({k: v for k, v in dump_config(cfg).items() if k != "sweep"}, best))
    files = [directory / TRIALS_FILE, directory / BEST_OVERRIDES_FILE, directory / BEST_CONFIG_FILE,
             directory / SUMMARY_FILE]
    write_json_atomic(files[0], list(records))
    write_text_atomic(files[1], yaml.safe_dump(dict(best), sort_keys=False))
    write_text_atomic(files[2], "# the experiment config with the setting the sweep chose on data.target_select\n"
                      + yaml.safe_dump({k: v for k, v in dump_config(chosen_cfg).items() if k != "sweep"},
                                       sort_keys=False))
    write_json_atomic(files[3], summary)
    if plots and summary["space"] == "ia":
        defaults = {"adjust.temperature": cfg.adjust.temperature, "adjust.tau_target": cfg.adjust.tau_target}
        files += plot_ia_trials(directory, records, summary.get("label_free_objective"), defaults)
    return files


def plot_ia_trials(directory: Path, records: Sequence[dict], objective: str | None,
                   defaults: dict[str, float]) -> list[Path]:
    """Selection mIoU over τ_target (one line per T, best over the other axes; ``defaults`` for an axis the sweep
    did not search); labelled vs label-free score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if not r["metrics"].get("skipped")]  # combinations the library cannot apply
    best: dict[tuple[float, float], float] = {}
    for record in records:
        setting = {**defaults, **record["setting"]}
        key = (float(setting["adjust.temperature"]), float(setting["adjust.tau_target"]))
        best[key] = max(best.get(key, float("-inf")), record["metrics"][SELECT_METRIC])
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for temperature in sorted({t for t, _ in best}):
        taus = sorted(tau for t, tau in best if t == temperature)
        axes.plot(taus, [best[(temperature, tau)] for tau in taus], marker="o", label=f"T = {temperature:g}")
    axes.set(xlabel="τ_target", ylabel="selection mIoU (%)", title="IA: best over the other settings")
    axes.legend()
    paths = [directory / MIOU_PLOT]
    figure.tight_layout()
    figure.savefig(paths[0], dpi=100)
    plt.close(figure)
    key = f"label_free_{objective}" if objective else None
    if key and all(key in record["metrics"] for record in records):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        axes.scatter([r["metrics"][key] for r in records], [r["metrics"][SELECT_METRIC] for r in records], s=12)
        axes.set(xlabel=f"label-free objective: {objective}", ylabel="selection mIoU (%) (labelled)",
                 title="one point per trial")
        figure.tight_layout()
        paths.append(directory / OBJECTIVE_PLOT)
        figure.savefig(paths[1], dpi=100)
        plt.close(figure)
    return paths


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The sweep's headline numbers as flat MLflow metrics."""
    metrics = {"trials": float(summary["trials"]), "chosen.select_miou": summary["chosen"]["select_miou"]}
    if summary["chosen"].get("target_val_miou") is not None:
        metrics["chosen.target_val_miou"] = summary["chosen"]["target_val_miou"]
    for row in ("reference", "top"):  # the paper's setting; the top trial before the guard (IA)
        if summary.get(row):
            metrics.update({f"{row}.{k}": v for k, v in summary[row].items() if isinstance(v, float)})
    guard = summary["chosen"].get("guard") or {}
    if "top_beats_fallback" in guard:
        metrics.update({"guard.top_beats_fallback": guard["top_beats_fallback"],
                        "guard.kept_top": float(guard["kept_top"])})
    for objective, row in (summary.get("label_free") or {}).items():
        metrics[f"label_free.{objective}.regret"] = row["regret"]
        metrics[f"label_free.{objective}.differs"] = float(row["differs"])
    return metrics
