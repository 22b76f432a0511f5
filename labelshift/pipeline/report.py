"""The job's summary table: target-val mIoU of each step of the method, from the stages' metrics."""
from __future__ import annotations

from labelshift.artifacts import LOCAL_IA, NO_ADJUST, ORACLE_IA, TARGET, evaluation_key, ia_name, results_key

ROWS = (  # (label, stage, transform, row id: the results/<row>.<column> keys of the parent run)
    ("source-only (adapted model)", "evaluate_adapted", NO_ADJUST, "source_only"),
    ("+IA (estimated prior)", "evaluate_adapted", ia_name(TARGET), "ia_estimate"),
    ("+IA (oracle prior)", "evaluate_adapted", ORACLE_IA, "ia_oracle"),
    ("+IA (per-image priors, adjust.mode: local)", "evaluate_adapted", LOCAL_IA, "ia_local"),
    ("+CR (classifier refinement)", "evaluate_refined", NO_ADJUST, "cr"),
    ("+self-distillation", "evaluate_distilled", NO_ADJUST, "self_distillation"),
)


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """One row per available result: name, row id, target-val mIoU, gain over source-only, source-val mIoU."""
    rows = []
    baseline = None
    for label, stage, variant, row_id in ROWS:
        metrics = results.get(stage, {}).get(evaluation_key("target_val", variant))
        if metrics is None:
            continue
        miou = metrics["miou"]
        baseline = miou if baseline is None else baseline
        source = results.get(stage, {}).get(evaluation_key("source_val", variant))
        row = {"model": label, "row": row_id, "target_val_miou": miou, "gain": round(miou - baseline, 2),
               "source_val_miou": source["miou"] if source else None}
        row.update({k: v for k, v in metrics.items() if k.startswith("miou_")})
        rows.append(row)
    return rows


def results_metrics(rows: list[dict]) -> dict[str, float]:
    """The table's numbers as the parent run's metrics: ``results/<row>.<column>`` (``artifacts.results_key``)."""
    return {results_key(row["row"], column): value for row in rows for column, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def format_summary(rows: list[dict]) -> str:
    header = "| model | target-val mIoU | gain | source-val mIoU |\n|---|---:|---:|---:|"
    lines = [header]
    for row in rows:
        source = "" if row["source_val_miou"] is None else f"{row['source_val_miou']:.2f}"
        lines.append(f"| {row['model']} | {row['target_val_miou']:.2f} | {row['gain']:+.2f} | {source} |")
    return "\n".join(lines)
