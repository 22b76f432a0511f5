"""The prior-estimation benchmark: real properties of the digits part, and the world part end to end (tiny)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

from labelshift.bench.priors import DIGITS_ACCURACIES, DIGITS_METHODS, main, sample_target  # noqa: E402
from labelshift.estimate import METHODS  # noqa: E402

TINY_WORLD = [
    "data.world.num_source=40", "data.world.num_target_train=24", "data.world.num_target_val=16",
    "data.world.size=[64,32]", "train.source.iterations=6", "train.source.batch_size=4",
    "data.source_transform.size=[64,32]", "data.target_transform.size=[64,32]", "prior.bootstrap=5",
    "prior.em_sample_pixels=2000",
]


def _run(argv: list[str], capsys) -> tuple[dict, dict]:
    """Run the CLI; return the final JSON line and the written priors_benchmark.json."""
    assert main(argv) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    line = json.loads(stdout[-1])
    out_dir = argv[argv.index("--out") + 1]
    with open(f"{out_dir}/priors_benchmark.json") as stream:
        written = json.load(stream)
    return line, written


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[dict, dict, str]:
    """One fast digits run (1 seed, α in {0.1, 1}) shared by the tests; capsys is per test, so redirect."""
    out = tmp_path_factory.mktemp("bench_digits")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        argv = ["--skip-world", "--out", str(out), "--digits-seeds", "1", "--digits-concentrations", "0.1,1.0"]
        assert main(argv) == 0
    lines = buffer.getvalue().strip().splitlines()
    written = json.loads((out / "priors_benchmark.json").read_text())
    return json.loads(lines[-1]), written, (out / "priors_benchmark.md").read_text()


def test_sample_target_follows_the_prior_and_pool_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [5, 50, 50])
    indices = sample_target(labels, np.array([0.9, 0.1, 0.0]), 400, rng)
    counts = np.bincount(labels[indices], minlength=3)
    assert len(indices) == 400 and counts[2] == 0
    assert 320 < counts[0] < 400  # class 0 has only 5 pool points: drawn with replacement


def test_digits_json_line_has_the_required_keys(digits_run):
    line, written, _ = digits_run
    assert line["world"] is None
    required = {f"{m}_l1" for m in DIGITS_METHODS} | {"accuracy_no_adjust", "accuracy_em_adjust"}
    assert required <= set(line["digits"])
    assert all(math.isfinite(v) for v in line["digits"].values())
    assert written["summary"] == line
    assert len(written["digits"]["records"]) == 2


def test_calibrated_em_beats_classify_and_count(digits_run):
    line, _, _ = digits_run
    assert line["digits"]["em_bcts_l1"] < line["digits"]["count_l1"]
    assert line["digits"]["em_bcts_l1"] < line["digits"]["no_adjust_l1"] / 10


def test_ia_with_the_em_estimate_does_not_hurt_under_strong_shift(digits_run):
    _, written, _ = digits_run
    strong = written["digits"]["per_alpha"]["0.1"]
    assert strong["accuracy_em_adjust"]["mean"] >= strong["accuracy_no_adjust"]["mean"] - 0.01
    for key in DIGITS_ACCURACIES:
        assert 0.8 < strong[key]["mean"] <= 1.0


def test_digits_markdown_report(digits_run):
    _, _, report = digits_run
    assert "| em_bcts |" in report and "α=0.1" in report and "IA, oracle prior" in report


WORLD_METHODS = set(METHODS)  # every registered estimator runs in the estimate stage


def _recovered(world: dict, method: str) -> float | None:
    gain = world["oracle_gain"]
    return (world[f"{method}_ia_miou"] - world["no_adjust_miou"]) / gain if gain > 1e-9 else None


def test_world_part_generates_its_world_under_out(tmp_path, capsys):
    """Without data roots in the overrides, the world part generates its own world (other knobs than the
    session's shared world) under --out and runs pretrain, estimate and evaluate_adapted on it."""
    line, written = _run(["--out", str(tmp_path), "--digits-seeds", "1", "--digits-concentrations", "1.0",
                          *TINY_WORLD], capsys)
    world = written["world"]
    assert (tmp_path / "world" / "data" / "world.json").is_file()  # the world lives under --out
    manifest = json.loads((tmp_path / "world" / "data" / "world.json").read_text())
    assert (manifest["knobs"]["num_target_train"], manifest["knobs"]["num_target_val"]) == (24, 16)
    assert set(world["methods"]) == WORLD_METHODS
    for method in WORLD_METHODS:
        assert world[f"{method}_recovered_fraction"] == _recovered(world, method)
        assert line["world"][f"{method}_l1"] == world[f"{method}_l1"]
    assert "| em | pixel |" in (tmp_path / "priors_benchmark.md").read_text()


def test_world_part_reports_the_estimate_stage_of_its_run(tiny_trained, tmp_path, capsys):
    """On the shared world, with the shared pretrain/estimate stages copied under --out (so that only
    evaluate_adapted runs), the world numbers are the estimate stage's metrics."""
    from conftest import DEMO_CONFIG

    tiny_trained.copy_stages(tmp_path / "world")  # the world part's output_dir is <out>/world
    _, written = _run(["--out", str(tmp_path), "--world-config", str(DEMO_CONFIG), "--digits-seeds", "1",
                       "--digits-concentrations", "1.0", *tiny_trained.overrides], capsys)
    world = written["world"]
    estimate = tiny_trained.manifest("estimate")["metrics"]
    assert json.loads((tmp_path / "world" / "stages" / "estimate" / "manifest.json").read_text())["commit"] == \
        tiny_trained.manifest("estimate")["commit"]  # skipped, not re-run
    assert world["calibration_temperature"] == estimate["calibration_temperature"]
    for key in ("no_adjust_pixel_l1", "no_adjust_image_l1"):
        assert world[key] == estimate[key]
    for method in WORLD_METHODS:
        assert (world[f"{method}_l1"], world[f"{method}_kl"]) == (estimate[f"{method}_l1"], estimate[f"{method}_kl"])
