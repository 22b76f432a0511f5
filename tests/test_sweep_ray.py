"""Sweeps on a real local Ray (the session's instance) with a temporary MLflow store: a 4-trial IA sweep and a
2-trial CR sweep through ``ray_jobs/sweep.py``, on the shared tiny world."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import yaml

from conftest import DEMO_CONFIG, PROJECT, tiny_overrides

pytest.importorskip("ray")
pytest.importorskip("mlflow")

SWEEP_CONFIG = DEMO_CONFIG.parent / "sweep_ia.yaml"
IA_SPACE = ("sweep.ia.parameters={adjust.temperature: {values: [1.0, 2.0]}, "
            "prior.method: {values: [em, em_raw]}}")
CR_SPACE = ["sweep.cr.parameters={train.refine.tau: {values: [0.5, 1.0]}}", "sweep.cr.report_every=2",
            "sweep.cr.search=grid"]


def _sweep_runs(out, space: str):
    """The sweep's one FINISHED MLflow parent run of ``space`` and its FINISHED nested trial runs."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    runs = [r for r in mlflow.search_runs(experiment_names=["labelshift-sweeps"], output_format="list")
            if r.data.tags.get("labelshift.sweep") == space]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    return parents[0], trial_runs


def _sweep_main():
    spec = importlib.util.spec_from_file_location("sweep_job", PROJECT / "ray_jobs" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, tiny_world):
    """The tiny experiment with a selection split: its pretrain and estimate stages, run once in-process."""
    from labelshift.config import load_config
    from labelshift.pipeline import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import Tracker

    out = tmp_path_factory.mktemp("sweep") / "run"
    overrides = tiny_overrides(out, world=tiny_world) + [
        "data.target.list_file=splits/adapt.txt", f"data.target_select.root={tiny_world}/cityscapes",
        "data.world.target_select_fraction=null", "ray.cpus_per_worker=1"]  # the shared world's knobs
    cfg = load_config(SWEEP_CONFIG, overrides)
    Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda m: None).run(("estimate",))
    return out, overrides


def test_ia_sweep_chooses_on_the_selection_split_and_matches_labelshift_evaluate(local_ray, sweep_run, tmp_path):
    from labelshift.cli import main as labelshift

    out, overrides = sweep_run
    assert _sweep_main()(["--config", str(SWEEP_CONFIG), *overrides, IA_SPACE, "sweep.selection.guard_level=0"]) == 0
    sweep_dir = out / "sweeps" / "ia"
    trials = json.loads((sweep_dir / "trials.json").read_text())
    settings = [tuple(sorted(t["setting"].items())) for t in trials]
    assert len(settings) == 4 and len(set(settings)) == 4
    assert len({t["metrics"]["select_miou"] for t in trials}) >= 2  # the settings decide differently

    summary = json.loads((sweep_dir / "summary.json").read_text())
    best = yaml.safe_load((sweep_dir / "best_overrides.yaml").read_text())
    assert best == summary["chosen"]["setting"]
    assert summary["chosen"]["select_miou"] == max(t["metrics"]["select_miou"] for t in trials)
    assert summary["chosen"]["guard"]["kept_top"] and summary["top"]["setting"] == best  # no guard: the top trial
    assert summary["uses_target_labels"] and summary["selection_split"] == "target_select"
    assert set(summary["label_free"]) == {"expected_miou", "pseudo_miou", "em_loglik", "neg_entropy"}

    estimate = out / "stages" / "estimate"
    direct = tmp_path / "direct.json"
    assert labelshift(["evaluate", "--config", str(SWEEP_CONFIG), "--checkpoint",
                       str(out / "stages" / "pretrain" / "model.safetensors"), "--split", "target_select",
                       "--adjust", "ia", "--source-prior", str(estimate / "source_pixel.json"),
                       "--target-prior", str(estimate / f"estimate_{best['prior.method']}.json"),
                       "--temperature", str(best["adjust.temperature"]),
                       "--tau-source", str(best.get("adjust.tau_source", 1.0)),
                       "--tau-target", str(best.get("adjust.tau_target", 1.0)), "--out", str(direct), *overrides]) == 0
    assert abs(json.loads(direct.read_text())["miou"] - summary["chosen"]["select_miou"]) <= 0.01

    parent, trial_runs = _sweep_runs(out, "ia")
    assert len(trial_runs) == 4
    assert {r.data.params["prior.method"] for r in trial_runs} == {"em", "em_raw"}
    assert all("select_miou" in r.data.metrics and "label_free_expected_miou" in r.data.metrics for r in trial_runs)
    assert parent.data.metrics["sweep_ia.chosen.select_miou"] == pytest.approx(summary["chosen"]["select_miou"])
    import mlflow

    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "sweep_ia")}
    assert {"sweep_ia/best_overrides.yaml", "sweep_ia/miou_over_tau_target_and_T.png"} <= artifacts


def test_cr_sweep_trains_on_ray_train_and_reports_the_selection_miou(local_ray, sweep_run, tmp_path):
    from labelshift.cli import main as labelshift

    out, overrides = sweep_run
    assert _sweep_main()(["--config", str(SWEEP_CONFIG), "--space", "cr", *overrides, *CR_SPACE]) == 0
    sweep_dir = out / "sweeps" / "cr"
    trials = json.loads((sweep_dir / "trials.json").read_text())
    assert sorted(t["setting"]["train.refine.tau"] for t in trials) == [0.5, 1.0]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["chosen"]["select_miou"] == max(t["metrics"]["select_miou"] for t in trials)
    direct = tmp_path / "direct.json"  # the chosen trial's final model, evaluated by the CLI
    assert labelshift(["evaluate", "--config", str(SWEEP_CONFIG), "--checkpoint", summary["chosen"]["model"],
                       "--split", "target_val", "--out", str(direct), *overrides]) == 0
    assert abs(json.loads(direct.read_text())["miou"] - summary["chosen"]["target_val_miou"]) <= 0.01
    parent, trial_runs = _sweep_runs(out, "cr")
    assert sorted(float(r.data.params["train.refine.tau"]) for r in trial_runs) == [0.5, 1.0]
    best = yaml.safe_load((sweep_dir / "best_overrides.yaml").read_text())
    assert set(best) == {"train.refine.tau"}


def test_an_optuna_ia_sweep_runs_its_trials_through_tune(local_ray, sweep_run, tmp_path):
    pytest.importorskip("optuna")
    out, overrides = sweep_run
    optuna_out = tmp_path / "optuna"
    shutil.copytree(out / "stages", optuna_out / "stages")  # the same pretrain and estimate stages: not re-run
    space = ("sweep.ia.parameters={adjust.temperature: {low: 0.5, high: 2.0}, prior.method: {values: [em, count]}}")
    assert _sweep_main()(["--config", str(SWEEP_CONFIG), *overrides, f"output_dir={optuna_out}",
                          f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", space, "sweep.ia.search=optuna",
                          "sweep.ia.num_samples=3", "sweep.selection.guard_level=0"]) == 0
    trials = json.loads((optuna_out / "sweeps" / "ia" / "trials.json").read_text())
    assert len(trials) == 3
    assert all(0.5 <= t["setting"]["adjust.temperature"] <= 2.0 and t["setting"]["prior.method"] in ("em", "count")
               for t in trials)
    assert len({t["setting"]["adjust.temperature"] for t in trials}) == 3  # TPE's draws, not a grid
