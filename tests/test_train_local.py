"""Training loops and the pipeline in one process (no Ray): resume, CR freezes the extractor, manifests."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from labelshift.build import build_model
from labelshift.models import checkpoint_sha256, load_checkpoint
from labelshift.pipeline import Pipeline
from labelshift.runners import LocalTrainRunner
from labelshift.build import ensure_world
from labelshift.tracking import Tracker
from labelshift.train.context import LocalContext
from labelshift.train.loop import GlobalBatchSampler
from labelshift.train.stages import run_stage


def test_global_batch_is_the_same_for_any_number_of_workers():
    one = GlobalBatchSampler(23, 4, rank=0, world_size=1, seed=3)
    two = [GlobalBatchSampler(23, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in (one, *two):
        sampler.set_position(epoch=1)
    for single, (a, b) in zip(one, zip(*two)):
        assert sorted(single) == sorted(a + b)
    assert one.steps_per_epoch == 5
    resumed = GlobalBatchSampler(23, 4, rank=0, world_size=1, seed=3)
    resumed.set_position(epoch=1, offset=3)
    assert list(resumed) == list(one)[3:]


def _world(tiny_cfg):
    cfg = tiny_cfg()
    ensure_world(cfg, log=lambda m: None)
    return cfg


def test_source_loop_checkpoints_and_resumes(tiny_cfg, tmp_path):
    cfg = _world(tiny_cfg)
    payload = {"stage": "source", "config": cfg.model_dump(mode="json")}
    ctx = LocalContext(tmp_path / "ckpt")
    first = run_stage(payload, ctx)
    assert (first["steps_run"], first["resumed_from"]) == (4, 0)
    assert [step for step, _ in first["losses"]] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
    longer = cfg.model_copy(deep=True)
    longer.train.source.iterations = 6
    second = run_stage({"stage": "source", "config": longer.model_dump(mode="json")}, LocalContext(tmp_path / "ckpt"))
    assert (second["steps_run"], second["resumed_from"]) == (2, 4)
    model = build_model(cfg, fresh=True)
    meta = load_checkpoint(model, tmp_path / "ckpt" / "step_00000006" / "model.safetensors")
    assert meta["stage"] == "source" and meta["classes"][0] == "road"


def test_refine_trains_only_the_head(tiny_cfg, tmp_path):
    from labelshift.priors import ClassPrior

    cfg = _world(tiny_cfg)
    adapted = build_model(cfg, fresh=True)
    from labelshift.models import save_checkpoint

    save_checkpoint(adapted, tmp_path / "adapted.safetensors", {})
    k = 19
    source = ClassPrior(adapted_names(), torch.full((k,), 1 / k).numpy(), "pixel")
    target = ClassPrior(adapted_names(), torch.linspace(1, 3, k).numpy(), "pixel")
    payload = {"stage": "refine", "config": cfg.model_dump(mode="json"),
               "init_checkpoint": str(tmp_path / "adapted.safetensors"),
               "source_prior": source.to_dict(), "target_prior": target.to_dict()}
    run_stage(payload, LocalContext(tmp_path / "refine"))
    refined = build_model(cfg, tmp_path / "refine" / "step_00000004" / "model.safetensors")
    before, after = adapted.state_dict(), refined.state_dict()
    head_keys = {n for n, p in refined.named_parameters() if any(p is q for q in refined.head_parameters())}
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same != (key in head_keys), key  # backbone (incl. BN statistics) unchanged, head changed


def adapted_names():
    from labelshift.classes import cityscapes19

    return cityscapes19().names


def test_pipeline_runs_skips_and_reruns_what_changed(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    logs: list[str] = []
    cfg = tiny_cfg(out=out)
    summary = Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=logs.append).run()
    models = [row["model"] for row in summary["rows"]]
    assert models == ["source-only (adapted model)", "+IA (estimated prior)", "+IA (oracle prior)",
                      "+CR (classifier refinement)", "+self-distillation"]
    assert all(0 <= row["target_val_miou"] <= 100 for row in summary["rows"])
    assert (out / "summary.json").is_file() and not list((out / "stages").glob("*.partial"))
    assert len(list((out / "stages" / "pseudo" / "labels").glob("*.png"))) == 16
    estimate = summary["stages"]["estimate"]
    for method in ("reference", "count", "soft_count", "presence", "em", "bbse"):
        assert 0 <= estimate[f"{method}_l1"] <= 2
    logs.clear()
    changed = tiny_cfg("train.refine.lr=0.0031", out=out)
    Pipeline(changed, LocalTrainRunner(out / "train"), Tracker(), log=logs.append).run()
    skipped = {line.split("]")[0][1:] for line in logs if line.endswith("skipped")}
    assert skipped == {"pretrain", "estimate", "evaluate_adapted"}
    info = json.loads((out / "stages" / "refine" / "checkpoint.json").read_text())
    assert info["sha256"] == checkpoint_sha256(out / "stages" / "refine" / "model.safetensors")
    assert info["training_run"]["location"].startswith(str(out / "train"))

    # an upstream stage that ran again (same configuration, new outputs) invalidates everything downstream
    shutil.rmtree(out / "stages" / "estimate")
    logs.clear()
    Pipeline(changed, LocalTrainRunner(out / "train"), Tracker(), log=logs.append).run()
    assert {line.split("]")[0][1:] for line in logs if line.endswith("skipped")} == {"pretrain"}

    with pytest.raises(RuntimeError, match="stage 'refine' needs the outputs of stage 'estimate'.*run 'estimate' "
                                           "first"):
        Pipeline(tiny_cfg(out=tmp_path / "other"), LocalTrainRunner(tmp_path / "other" / "train"), Tracker(),
                 log=logs.append).run(("refine",))

    # a stage further up changed (pretrain re-ran): running only a downstream stage must not use stale priors
    manifest_path = out / "stages" / "pretrain" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "commit": "a-later-pretrain-run"}))
    with pytest.raises(RuntimeError, match="stage 'refine' needs the outputs of stage 'estimate'"):  # the stale link
        Pipeline(changed, LocalTrainRunner(out / "train"), Tracker(), log=logs.append).run(("evaluate_refined",))


def test_cross_entropy_is_finite_when_every_pixel_is_ignored():
    from labelshift.train.stages import cross_entropy_over_valid_pixels

    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    loss = cross_entropy_over_valid_pixels(logits, ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels = torch.randint(0, 19, (2, 4, 4))
    labels[0] = 255
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert cross_entropy_over_valid_pixels(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
