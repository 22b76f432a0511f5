"""A job a person can watch: the console shows stage lines, training progress and the results table; Ray's and
MLflow's output goes to the job log; a failing job says so on the console with the log's path."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_CONFIG, PROJECT
from labelshift.console import job_console
from labelshift.progress import StepBar, StepMilestones, step_progress
from labelshift.runners import LocalTrainRunner


def _milestones(total: int, reports: list[dict]) -> list[str]:
    lines: list[str] = []
    display = StepMilestones("source training", total, lines.append)
    for report in reports:
        display.update(report)
    return lines


def test_milestone_lines_mark_each_quarter_of_a_run_and_a_resume_starts_where_it_resumed():
    every_50 = [{"step": step, "loss": 1.0 / step} for step in range(50, 601, 50)]
    assert _milestones(600, every_50) == [
        "  source training: step 150/600 (25%), loss 0.0067", "  source training: step 300/600 (50%), loss 0.0033",
        "  source training: step 450/600 (75%), loss 0.0022", "  source training: step 600/600 (100%), loss 0.0017"]
    resumed = [{"step": 400, "loss": 0.5}, {"step": 450, "loss": 0.25}, {"step": 600}]  # 600: final ckpt again
    assert _milestones(600, resumed) == ["  source training: step 400/600 (66%), loss 0.5000",
                                         "  source training: step 450/600 (75%), loss 0.2500",
                                         "  source training: step 600/600 (100%)"]


def test_the_step_bar_shows_the_step_and_the_latest_loss():
    stream = io.StringIO()
    bar = StepBar("refine training", 150, stream)
    for step in (25, 50, 75):
        bar.update({"step": step, "loss": step / 100})
    assert bar.bar.n == 75
    bar.update({"step": 150, "loss": 0.125})
    bar.close()
    final = stream.getvalue().split("\r")[-1]
    assert final.startswith("refine training: 100%") and "150/150" in final and "loss=0.1250" in final


def test_the_local_runner_shows_every_report_of_its_run(shared_cfg, tmp_path):
    cfg = shared_cfg()
    lines: list[str] = []
    runner = LocalTrainRunner(tmp_path / "train", progress=step_progress("lines", log=lines.append))
    summary = runner.fit({"stage": "source", "config": cfg.model_dump(mode="json")}, "source",
                         tmp_path / "model.safetensors")
    assert [step for step, _ in summary["losses"]] == [1, 2, 3, 4]
    assert lines == [f"  source training: step {step}/4 ({25 * step}%), loss {loss:.4f}"
                     for step, loss in summary["losses"]]


def test_the_job_console_sends_everything_else_to_the_log(tmp_path, capfd):
    log_path = tmp_path / "logs" / "job.log"
    with job_console(log_path) as console:
        console.line("[stage] running")
        print("python stdout")
        print("python stderr", file=sys.stderr)
        os.write(1, b"C-level stdout\n")
        os.write(2, b"C-level stderr\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
        console.error("an error")
    print("after the block")
    captured = capfd.readouterr()
    assert captured.out == "[stage] running\nafter the block\n"
    assert captured.err == "an error\n"
    logged = log_path.read_text().splitlines()
    assert logged[0].startswith("==== ") and f"pid {os.getpid()}" in logged[0]
    assert logged[1:] == ["[stage] running", "python stdout", "python stderr",
                          "C-level stdout", "C-level stderr", "child out", "child err", "an error"]


def _refine_main():
    spec = importlib.util.spec_from_file_location("refine_job_watch", PROJECT / "ray_jobs" / "refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_failing_job_prints_its_error_and_the_log_path(local_ray, tiny_trained, tmp_path, capfd):
    """evaluate_refined without refine: the job fails on the console with the log's path; the traceback and
    MLflow's table creation are in the log; the MLflow parent run ends FAILED with the runtime environment."""
    import mlflow

    out = tiny_trained.copy_stages(tmp_path / "run")
    overrides = [o for o in tiny_trained.overrides if not o.startswith(("output_dir=", "tracking.tracking_uri="))]
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    status = _refine_main()(["--config", str(DEMO_CONFIG), "--stages", "evaluate_refined", f"output_dir={out}",
                             f"tracking.tracking_uri={tracking_uri}", *overrides])
    captured = capfd.readouterr()
    log_path = out / "logs" / "job.log"
    assert status == 1
    assert captured.out.splitlines() == [f"job log (Ray, MLflow, worker output): {log_path}",
                                         "[pretrain] complete (manifest valid): skipped"]
    assert captured.err.splitlines() == [
        "refine.py: error: RuntimeError: stage 'evaluate_refined' needs the outputs of stage 'refine', and "
        f"{out}/stages/refine is missing, incomplete, from another configuration or built from outputs that have "
        "changed since: run 'refine' first (e.g. --stages refine,evaluate_refined)",
        f"refine.py: traceback and logs: {log_path}"]
    logged = log_path.read_text()
    assert "Traceback (most recent call last)" in logged and "in _upstream_inputs" in logged
    assert "Creating initial MLflow database tables" in logged
    client = mlflow.MlflowClient(tracking_uri)
    [parent] = client.search_runs([client.get_experiment_by_name("labelshift-demo").experiment_id])
    assert (parent.info.run_name, parent.info.status) == ("demo", "FAILED")
    environment = json.loads((Path(parent.info.artifact_uri.removeprefix("file://")) / "environment.json")
                             .read_text())
    assert environment["torch_threads"] == 2 and environment["deterministic_algorithms"] is True
    assert parent.data.tags["labelshift.torch_threads"] == "2" and parent.data.tags["labelshift.gpu"] == "none"
    assert parent.data.tags["labelshift.version.ray"] == environment["packages"]["ray"] == local_ray.__version__


def test_the_job_console_shows_stages_progress_and_results_and_logs_the_rest(tiny_trained, tmp_path):
    """refine.py run as a command (its own local Ray, no terminal, tracking disabled): the console is the stage
    lines, a line per quarter of CR with the loss rank 0 reported at that step, the table; Ray's banner and the
    Ray Train controller's and workers' lines are in the log, without colour codes."""
    out = tiny_trained.copy_stages(tmp_path / "run")
    overrides = [o for o in tiny_trained.overrides if not o.startswith("output_dir=")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run([sys.executable, str(PROJECT / "ray_jobs" / "refine.py"), "--config", str(DEMO_CONFIG),
                           "--stages", "refine", *overrides, f"output_dir={out}", "ray.cpus_per_worker=1",
                           "tracking.enabled=false"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    log_path = out / "logs" / "job.log"
    assert done.returncode == 0, done.stderr[-3000:] + log_path.read_text()[-5000:]
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[:3] == [f"job log (Ray, MLflow, worker output): {log_path}",
                         "[pretrain] complete (manifest valid): skipped", "[refine] running"]
    logged = log_path.read_text()
    reported = {int(step): float(loss) for step, loss in  # what rank 0 reported, as Ray Train logs it
                re.findall(r"\(RayTrainWorker pid=\d+\) Reporting training result \d+: .*?metrics=\{'step': (\d+), "
                           r"'loss': ([-\d.e]+)", logged)}
    assert sorted(reported) == [1, 2, 3, 4]
    quarter_lines = [line for line in lines if line.startswith("  refine training: step ")]
    # the driver polls every 0.5 s and may see a later report first; each quarter line is that of one report
    steps = [int(re.search(r"step (\d)/4", line).group(1)) for line in quarter_lines]
    assert steps[-1] == 4 and steps == sorted(set(steps))
    assert quarter_lines == [f"  refine training: step {step}/4 ({25 * step}%), loss {reported[step]:.4f}"
                             for step in steps]
    assert re.fullmatch(r"\[refine\] done in \d+\.\ds", lines[3 + len(quarter_lines)])
    assert lines[4 + len(quarter_lines)] == "| model | target-val mIoU | gain | source-val mIoU |"
    assert lines[-1] == f"summary written to {out / 'summary.json'}"
    assert "Started a local Ray instance" in logged and "(TrainController pid=" in logged
    assert "Started a local Ray instance" not in done.stdout and "pid=" not in done.stdout
    assert "\x1b[36m(TrainController" not in logged  # RAY_COLOR_PREFIX=0
