"""``make mlflow-ui`` over a tiny job's store, in headless Chromium: the experiment page lists the job's runs
(the parent and, expanded, its stage runs), the server hands out a stage run's chart; a screenshot goes to
outputs/test-artifacts/mlflow_ui.png."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from conftest import DEMO_CONFIG, PROJECT  # noqa: E402
from test_serve import _chromium  # noqa: E402  (the Serve page's headless Chromium: installed under CI=true)

JOB_NAME = "tiny-ui-job"
STAGES = ("evaluate_adapted", "refine")


@pytest.fixture
def job_store(tiny_trained, tmp_path):
    """A tiny job (two stages on a copy of the shared pretrain + estimate) logged to a sqlite store."""
    from labelshift.config import load_config
    from labelshift.pipeline import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import MlflowTracker

    out = tiny_trained.copy_stages(tmp_path / "job")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [o.replace(str(tiny_trained.out), str(out)) for o in tiny_trained.overrides]
    cfg = load_config(DEMO_CONFIG, overrides + [f"tracking.tracking_uri={store}", f"name={JOB_NAME}"])
    tracker = MlflowTracker(store, "ui-test")
    with tracker.job(cfg):
        Pipeline(cfg, LocalTrainRunner(out / "train"), tracker, log=lambda m: None).run(STAGES)
    refine = mlflow.MlflowClient(tracker.tracking_uri).search_runs(
        [tracker.experiment_id], filter_string="tags.`labelshift.stage` = 'refine'")[0]
    return store, tracker.experiment_id, refine.info.run_id


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"make mlflow-ui exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def test_make_mlflow_ui_lists_the_jobs_runs_in_headless_chromium(job_store, tmp_path):
    found = _chromium()
    if found is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; under CI=true "
                    "the test installs it)")
    from labelshift.bench.serve import free_port
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    store, experiment_id, refine_run = job_store
    port = free_port()
    # -o: the installed .venv counts as up to date (a test must not reinstall it)
    server = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "mlflow-ui", f"MLFLOW_STORE={store}",
                               f"MLFLOW_PORT={port}"], cwd=PROJECT, start_new_session=True,
                              stdout=open(tmp_path / "ui.log", "wb"), stderr=subprocess.STDOUT)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    driver = None
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", server)
        chart = f"http://127.0.0.1:{port}/get-artifact?path=plots/loss_curve.png&run_uuid={refine_run}"
        with urllib.request.urlopen(chart, timeout=30) as answer:  # the UI serves the stage run's charts
            assert answer.read(8) == b"\x89PNG\r\n\x1a\n"
        driver = webdriver.Chrome(service=Service(found[1]), options=options)
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs")
        WebDriverWait(driver, 90).until(lambda d: JOB_NAME in d.find_element(By.TAG_NAME, "body").text)
        for expander in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"):
            expander.click()  # the parent run's row: show its nested stage runs
        WebDriverWait(driver, 30).until(lambda d: all(stage in d.find_element(By.TAG_NAME, "body").text
                                                      for stage in STAGES))
        artifacts = Path(os.environ.get("LABELSHIFT_TEST_ARTIFACTS", PROJECT / "outputs" / "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(artifacts / "mlflow_ui.png"))
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
