"""``labelshift compare`` on the runs of real tiny jobs (the shared tiny model, a real MLflow sqlite store), the
results table as the parent run's metrics, and the charts every stage run logs."""
from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

mlflow = pytest.importorskip("mlflow")

from labelshift.artifacts import metric_key, per_class_iou_key, prior_error_key, results_key  # noqa: E402
from labelshift.cli import main  # noqa: E402
from labelshift.pipeline import Pipeline  # noqa: E402
from labelshift.runners import LocalTrainRunner  # noqa: E402
from labelshift.tracking import MlflowTracker  # noqa: E402

STAGES = ("evaluate_adapted", "refine", "evaluate_refined")
EXPERIMENT = "compare-test"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def jobs(tiny_trained, tmp_path_factory):
    """Three tiny jobs on copies of the shared pretrain + estimate stages, in one store: ``seed0`` and ``seed1``
    differ only in CR's seed; ``tau`` (CR seed 0) in IA's tau_target. Returns the store and the parent runs."""
    from conftest import DEMO_CONFIG
    from labelshift.config import load_config

    root = tmp_path_factory.mktemp("compare")
    store = f"sqlite:///{root}/mlflow.db"
    variants = {"seed0": ["train.refine.seed=0"], "seed1": ["train.refine.seed=1"],
                "tau": ["train.refine.seed=0", "adjust.tau_target=0.5"]}
    parents = {}
    for name, extra in variants.items():
        out = tiny_trained.copy_stages(root / name)
        overrides = [o.replace(str(tiny_trained.out), str(out)) for o in tiny_trained.overrides]
        cfg = load_config(DEMO_CONFIG, overrides + extra + [f"tracking.tracking_uri={store}", "name=tiny"])
        tracker = MlflowTracker(store, EXPERIMENT)
        with tracker.job(cfg):
            Pipeline(cfg, LocalTrainRunner(out / "train"), tracker, log=lambda m: None).run(STAGES)
        parents[name] = mlflow.MlflowClient(tracker.tracking_uri).get_run(tracker.parent_run_id)
    return {"store": store, "client": mlflow.MlflowClient(tracker.tracking_uri), "parents": parents, "root": root}


def _stage_run(jobs, job: str, stage: str):
    parent = jobs["parents"][job].info.run_id
    runs = jobs["client"].search_runs([jobs["parents"][job].info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                    f"tags.`labelshift.stage` = '{stage}'")
    assert len(runs) == 1
    return runs[0]


def _compare(capsys, jobs, *args: str) -> tuple[int, str, str]:
    code = main(["compare", "--tracking-uri", jobs["store"], *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_parent_run_carries_the_results_table(jobs):
    parent = jobs["parents"]["seed0"]
    adapted = _stage_run(jobs, "seed0", "evaluate_adapted").data.metrics
    refined = _stage_run(jobs, "seed0", "evaluate_refined").data.metrics
    metrics = parent.data.metrics
    assert metrics[results_key("source_only", "target_val_miou")] == adapted[metric_key("target_val", "none", "miou")]
    ia_target = metric_key("target_val", "ia_target", "miou")
    assert metrics[results_key("ia_estimate", "target_val_miou")] == adapted[ia_target]
    assert metrics[results_key("cr", "target_val_miou")] == refined[metric_key("target_val", "none", "miou")]
    cr, source_only = (metrics[results_key(row, "target_val_miou")] for row in ("cr", "source_only"))
    assert metrics[results_key("cr", "gain")] == pytest.approx(round(cr - source_only, 2))
    assert metrics[results_key("source_only", "source_val_miou")] == adapted[metric_key("source_val", "none", "miou")]


def test_every_stage_run_logs_its_charts(jobs):
    client = jobs["client"]

    def plots(stage):
        run = _stage_run(jobs, "seed0", stage)
        return {f.path.rsplit("/", 1)[-1]: f.file_size for f in client.list_artifacts(run.info.run_id, "plots")}

    adapted = plots("evaluate_adapted")
    assert {"per_class_iou_target_val.png", "per_class_iou_source_val.png", "confusion_target_val_none.png",
            "confusion_target_val_ia_target.png", "confusion_target_val_ia_oracle.png"} <= set(adapted)
    assert plots("refine").keys() == {"loss_curve.png"}
    assert all(size > 5000 for size in adapted.values())
    run = _stage_run(jobs, "seed0", "refine")
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/loss_curve.png",
                                                tracking_uri=jobs["store"], dst_path=str(jobs["root"] / "dl"))
    assert open(local, "rb").read(8) == PNG_MAGIC


def test_estimated_vs_oracle_prior_chart_from_the_estimate_stage(tiny_trained, tmp_path):
    """The estimate stage is shared (it ran without tracking), so its chart is drawn here from its directory."""
    from labelshift.plots import stage_plots

    written = stage_plots(tiny_trained.estimate, tiny_trained.manifest("estimate")["metrics"], tmp_path)
    assert [p.name for p in written] == ["prior_estimate_vs_oracle_pixel.png", "prior_estimate_vs_oracle_image.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written)


def test_compare_folds_seeds_and_gives_deltas_against_the_baseline(jobs, capsys, tmp_path):
    parents = {name: run.info.run_id for name, run in jobs["parents"].items()}
    chart = tmp_path / "chart.png"
    code, out, err = _compare(capsys, jobs, parents["seed0"], parents["seed1"], parents["tau"],
                              "--baseline", parents["tau"], "--format", "json", "--plot", str(chart))
    assert code == 0 and chart.read_bytes()[:8] == PNG_MAGIC and str(chart) in err
    report = json.loads(out)
    assert report["baseline"] == [parents["tau"]]
    records = {(r["runs"], r["stage"], r["transform"], r["metric"]): r for r in report["records"]}
    folded = f"{parents['seed0']} {parents['seed1']}"
    assert {r["runs"] for r in report["records"]} == {folded, parents["tau"]}  # the seeds folded into one group

    def logged(job, stage, transform, metric):
        return _stage_run(jobs, job, stage).data.metrics[metric_key("target_val", transform, metric)]

    for stage, transform in (("evaluate_adapted", "none"), ("evaluate_adapted", "ia_target"),
                             ("evaluate_refined", "none")):
        values = [logged(job, stage, transform, "miou") for job in ("seed0", "seed1")]
        row = records[(folded, stage, transform, "miou")]
        assert row["seeds"] == 2 and row["mean"] == pytest.approx(statistics.fmean(values))
        assert row["sd"] == pytest.approx(statistics.stdev(values))
        assert row["delta"] == pytest.approx(row["mean"] - logged("tau", stage, transform, "miou"))
    # evaluate_adapted does not depend on CR's seed: the two seeds agree there, and differ after CR
    assert records[(folded, "evaluate_adapted", "none", "miou")]["sd"] == 0.0
    road = per_class_iou_key("target_val", "ia_target", "road").split("target_val/ia_target.")[1]
    assert records[(folded, "evaluate_adapted", "ia_target", road)]["delta"] == pytest.approx(
        logged("seed0", "evaluate_adapted", "ia_target", road) - logged("tau", "evaluate_adapted", "ia_target", road))
    # the shared estimate stage was complete in each copy: skipped, so no stage run holds its prior errors
    assert (folded, "estimate", "", prior_error_key("em", "l1")) not in records


def test_compare_prints_a_table_and_csv_of_the_experiment(jobs, capsys):
    parents = {name: run.info.run_id for name, run in jobs["parents"].items()}
    code, out, _ = _compare(capsys, jobs, "--experiment", EXPERIMENT, "--baseline", parents["seed0"])
    assert code == 0
    miou = _stage_run(jobs, "tau", "evaluate_adapted").data.metrics[metric_key("target_val", "ia_target", "miou")]
    base = _stage_run(jobs, "seed0", "evaluate_adapted").data.metrics[metric_key("target_val", "ia_target", "miou")]
    line = next(line for line in out.splitlines() if line.startswith(f"| tiny | {parents['tau']} | "
                                                                     "evaluate_adapted | ia_target |"))
    assert f"{miou:.2f} ({miou - base:+.2f})" in line
    assert "| tiny (n=2) |" in out and "per-class IoU on target_val" in out
    code, out, _ = _compare(capsys, jobs, "--experiment", EXPERIMENT, "--format", "csv", "--all")
    rows = list(csv.DictReader(io.StringIO(out)))
    transforms = {row["transform"] for row in rows if row["stage"] == "evaluate_adapted"}
    assert {"none", "ia_target", "ia_oracle", "ia_estimate_em"} <= transforms  # --all: every evaluated transform


def test_a_missing_run_id_is_a_clear_error(jobs, capsys):
    code, out, err = _compare(capsys, jobs, "0123456789abcdef0123456789abcdef")
    assert code == 2 and out == ""
    assert err.startswith("labelshift compare: error: no MLflow run '0123456789abcdef0123456789abcdef' in sqlite:")
    code, _, err = _compare(capsys, jobs, "--experiment", "no-such-experiment")
    assert code == 2 and "no MLflow experiment 'no-such-experiment'" in err
