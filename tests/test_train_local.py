"""Training loops and the pipeline in one process (no Ray): resume, CR freezes the extractor, manifests.

The pretrain and estimate stages come from the session's shared tiny run (``tiny_trained``); a test that runs
more stages works on a copy of them (or of this module's completed run) in its own ``tmp_path``.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import DEMO_CONFIG, SHARED_STAGES, tiny_overrides
from labelshift.build import build_model
from labelshift.config import load_config
from labelshift.models import checkpoint_sha256, load_checkpoint
from labelshift.models.checkpoint import read_state_dict
from labelshift.estimate import METHODS
from labelshift.pipeline import Pipeline
from labelshift.pipeline.job import ALL_STAGES, STAGES
from labelshift.runners import LocalTrainRunner
from labelshift.tracking import Tracker
from labelshift.train.context import LocalContext
from labelshift.train.loop import GlobalBatchSampler
from labelshift.train.stages import run_stage

ALL_AFTER_ESTIMATE = [name for name in ALL_STAGES if name not in SHARED_STAGES]
ROWS = ["source-only (adapted model)", "+IA (estimated prior)", "+IA (oracle prior)", "+CR (classifier refinement)",
        "+self-distillation"]


def _stages(logs: list[str], event: str) -> list[str]:
    """The stages of the pipeline's log lines ending in ``event`` (``skipped`` | ``running``), in order."""
    return [line.split("]")[0][1:] for line in logs if line.endswith(event)]


def _downstream_of(name: str) -> list[str]:
    """``name`` and every stage that consumes its outputs, directly or not (the stage table), in order."""
    found = [name]
    for stage in STAGES:
        if stage.name not in found and set(stage.upstream) & set(found):
            found.append(stage.name)
    return found


def _run(cfg, logs: list[str] | None = None, stages: tuple[str, ...] | None = None) -> dict:
    out = cfg.output_dir
    return Pipeline(cfg, LocalTrainRunner(f"{out}/train"), Tracker(),
                    log=(logs.append if logs is not None else lambda m: None)).run(stages)


def _same_weights(a, b) -> bool:
    first, second = read_state_dict(a)[0], read_state_dict(b)[0]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------- sampler
def test_global_batch_is_the_same_for_any_number_of_workers():
    one = GlobalBatchSampler(23, 4, rank=0, world_size=1, seed=3)
    two = [GlobalBatchSampler(23, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in (one, *two):
        sampler.set_position(epoch=1)
    batches = list(one)
    assert len(batches) == one.steps_per_epoch == 5  # 23 // 4: the last 3 items of the epoch are dropped
    for single, a, b in zip(batches, *two, strict=True):
        assert (len(a), len(b)) == (2, 2) and sorted(single) == sorted(a + b)


def test_a_sampler_set_mid_epoch_yields_the_rest_of_that_epoch():
    one = GlobalBatchSampler(23, 4, rank=0, world_size=1, seed=3)
    one.set_position(epoch=1)
    resumed = GlobalBatchSampler(23, 4, rank=0, world_size=1, seed=3)
    resumed.set_position(epoch=1, offset=3)
    assert len(resumed) == 2 and list(resumed) == list(one)[3:]


# --------------------------------------------------------------------------------------------- loops
def test_the_source_loop_is_the_pretrain_stage_and_checkpoints_every_two_steps(shared_cfg, tiny_trained, tmp_path):
    summary = run_stage({"stage": "source", "config": shared_cfg().model_dump(mode="json")},
                        LocalContext(tmp_path / "ckpt"))
    assert (summary["steps_run"], summary["resumed_from"], summary["world_size"]) == (4, 0, 1)
    assert [step for step, _ in summary["losses"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
    assert _same_weights(tmp_path / "ckpt" / "step_00000004" / "model.safetensors", tiny_trained.model)


def test_a_resumed_run_repeats_the_uninterrupted_run_exactly(shared_cfg, tmp_path):
    payload = {"stage": "source", "config": shared_cfg(iterations=6).model_dump(mode="json")}
    straight = run_stage(payload, LocalContext(tmp_path / "ckpt"))
    final = tmp_path / "ckpt" / "step_00000006"
    shutil.copyfile(final / "model.safetensors", tmp_path / "straight.safetensors")
    shutil.rmtree(final)  # as if the run had died after its step-4 checkpoint
    resumed = run_stage(payload, LocalContext(tmp_path / "ckpt"))
    assert (resumed["steps_run"], resumed["resumed_from"]) == (2, 4)
    assert resumed["losses"] == straight["losses"][4:]  # steps 5 and 6, bit for bit
    assert _same_weights(final / "model.safetensors", tmp_path / "straight.safetensors")


def test_a_longer_run_resumes_from_the_final_checkpoint_of_a_shorter_one(shared_cfg, tmp_path):
    run_stage({"stage": "source", "config": shared_cfg().model_dump(mode="json")}, LocalContext(tmp_path / "ckpt"))
    longer = run_stage({"stage": "source", "config": shared_cfg(iterations=6).model_dump(mode="json")},
                       LocalContext(tmp_path / "ckpt"))
    assert (longer["steps_run"], longer["resumed_from"]) == (2, 4)
    assert [step for step, _ in longer["losses"]] == [5, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000002", "step_00000004",
                                                                    "step_00000006"]
    meta = load_checkpoint(build_model(shared_cfg(), fresh=True),
                           tmp_path / "ckpt" / "step_00000006" / "model.safetensors")
    assert meta["stage"] == "source" and meta["classes"][0] == "road"


def test_refine_trains_only_the_head(shared_cfg, tiny_trained, tmp_path):
    cfg = shared_cfg()
    priors = tiny_trained.priors()
    payload = {"stage": "refine", "config": cfg.model_dump(mode="json"), "init_checkpoint": str(tiny_trained.model),
               "source_prior": priors["source_pixel"].to_dict(), "target_prior": priors["target"].to_dict()}
    run_stage(payload, LocalContext(tmp_path / "refine"))
    adapted = build_model(cfg, tiny_trained.model)
    refined = build_model(cfg, tmp_path / "refine" / "step_00000004" / "model.safetensors")
    before, after = adapted.state_dict(), refined.state_dict()
    head_keys = {n for n, p in refined.named_parameters() if any(p is q for q in refined.head_parameters())}
    assert head_keys and head_keys < set(before)
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same != (key in head_keys), key  # backbone (incl. BN statistics) unchanged, head changed


def test_cross_entropy_is_finite_when_every_pixel_is_ignored():
    from labelshift.train.stages import cross_entropy_over_valid_pixels

    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    loss = cross_entropy_over_valid_pixels(logits, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_cross_entropy_over_valid_pixels_is_torchs_with_ignore_index():
    from labelshift.train.stages import cross_entropy_over_valid_pixels

    logits = torch.randn(2, 19, 4, 4)
    labels = torch.randint(0, 19, (2, 4, 4))
    labels[0] = 255
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert cross_entropy_over_valid_pixels(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def completed_run(tiny_trained, tmp_path_factory):
    """Every stage run locally after the shared pretrain/estimate stages (read-only: tests copy it)."""
    out = tiny_trained.copy_stages(tmp_path_factory.mktemp("completed") / "run")
    logs: list[str] = []
    summary = _run(load_config(DEMO_CONFIG, tiny_overrides(out, world=tiny_trained.world)), logs)
    return {"out": out, "summary": summary, "logs": logs, "world": tiny_trained.world}


def _copy_of(completed_run, tmp_path, *extra: str):
    """A copy of the completed run in ``tmp_path`` and its config (with ``extra`` overrides)."""
    out = tmp_path / "run"
    shutil.copytree(completed_run["out"], out)
    return out, load_config(DEMO_CONFIG, [*tiny_overrides(out, world=completed_run["world"]), *extra])


def test_the_pipeline_skips_the_shared_stages_and_runs_every_other(completed_run):
    assert _stages(completed_run["logs"], "skipped") == ["pretrain", "estimate"]
    assert _stages(completed_run["logs"], "running") == ALL_AFTER_ESTIMATE
    out = completed_run["out"]
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(ALL_STAGES)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(completed_run["summary"]))


def test_the_summary_rows_are_the_evaluation_stages_mious(completed_run):
    stages = completed_run["summary"]["stages"]
    expected = [stages["evaluate_adapted"]["target_val/none"]["miou"],
                stages["evaluate_adapted"]["target_val/ia_target"]["miou"],
                stages["evaluate_adapted"]["target_val/ia_oracle"]["miou"],
                stages["evaluate_refined"]["target_val/none"]["miou"],
                stages["evaluate_distilled"]["target_val/none"]["miou"]]
    rows = completed_run["summary"]["rows"]
    assert [row["model"] for row in rows] == ROWS
    assert [row["target_val_miou"] for row in rows] == expected
    assert [row["gain"] for row in rows] == [round(miou - expected[0], 2) for miou in expected]
    assert rows[0]["source_val_miou"] == stages["evaluate_adapted"]["source_val/none"]["miou"]


def test_pseudo_labels_one_png_per_target_train_image(completed_run):
    labels = completed_run["out"] / "stages" / "pseudo" / "labels"
    assert len(list(labels.glob("*.png"))) == 16  # data.world.num_target_train


def test_the_estimate_stage_reports_the_l1_error_of_every_prior_it_wrote(tiny_trained):
    metrics = tiny_trained.manifest("estimate")["metrics"]
    priors = tiny_trained.priors()
    assert {name for name in priors if name.startswith("estimate_")} == {f"estimate_{m}" for m in METHODS}
    for method in METHODS:
        estimate = priors[f"estimate_{method}"]
        oracle = priors[f"oracle_{estimate.kind}"]
        assert metrics[f"{method}_l1"] == pytest.approx(np.abs(estimate.probs - oracle.probs).sum(), abs=1e-12)
    assert priors["target"].probs.tolist() == priors["estimate_ensemble"].probs.tolist()  # prior.method: ensemble


def test_a_changed_refine_setting_reruns_refine_and_everything_after_it(completed_run, tmp_path):
    out, changed = _copy_of(completed_run, tmp_path, "train.refine.lr=0.0031")
    logs: list[str] = []
    _run(changed, logs)
    assert _stages(logs, "skipped") == ["pretrain", "estimate", "evaluate_adapted"]
    assert _stages(logs, "running") == _downstream_of("refine")
    info = json.loads((out / "stages" / "refine" / "checkpoint.json").read_text())
    assert info["sha256"] == checkpoint_sha256(out / "stages" / "refine" / "model.safetensors")
    assert info["training_run"]["location"] == f"{out}/train/{info['training_run']['name']}"


def test_an_upstream_stage_that_ran_again_invalidates_everything_downstream(completed_run, tmp_path):
    out, cfg = _copy_of(completed_run, tmp_path)
    shutil.rmtree(out / "stages" / "estimate")  # same configuration, new outputs (a new commit id)
    logs: list[str] = []
    _run(cfg, logs)
    assert _stages(logs, "skipped") == ["pretrain"]
    assert _stages(logs, "running") == _downstream_of("estimate")


def test_a_stage_version_changes_its_fingerprint_and_every_downstream_one(completed_run, tmp_path, monkeypatch):
    """Outputs of an older labelshift whose form changed (estimate's version 2: the presence model in
    calibration.json) are not reused: the stage's fingerprint and its dependants' change, the others' do not."""
    import dataclasses

    from labelshift.pipeline import job as job_module

    _, cfg = _copy_of(completed_run, tmp_path)
    before = Pipeline(cfg, LocalTrainRunner(tmp_path / "train"), Tracker(), log=lambda m: None).fingerprints
    assert job_module.STAGE_TABLE["estimate"].version == 2
    monkeypatch.setattr(job_module, "STAGES", tuple(dataclasses.replace(stage, version=1) if stage.name == "estimate"
                                                    else stage for stage in STAGES))
    older = Pipeline(cfg, LocalTrainRunner(tmp_path / "train"), Tracker(), log=lambda m: None).fingerprints
    changed = sorted(name for name in before if before[name] != older[name])
    assert changed == sorted(_downstream_of("estimate"))


def test_a_stage_whose_upstream_never_ran_is_an_error(tiny_trained, shared_cfg, tmp_path):
    out = tiny_trained.copy_stages(tmp_path / "run", stages=("pretrain",))
    with pytest.raises(RuntimeError, match="stage 'refine' needs the outputs of stage 'estimate'.*run 'estimate' "
                                           "first"):
        _run(shared_cfg(out=out), stages=("refine",))


def test_a_downstream_stage_never_uses_the_outputs_of_a_stale_upstream(completed_run, tmp_path):
    """pretrain re-ran (a new commit id) since estimate ran: running only evaluate_refined must not use the
    priors estimated with the old model."""
    out, cfg = _copy_of(completed_run, tmp_path)
    manifest_path = out / "stages" / "pretrain" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "commit": "a-later-pretrain-run"}))
    with pytest.raises(RuntimeError, match="stage 'refine' needs the outputs of stage 'estimate'"):
        _run(cfg, stages=("evaluate_refined",))
