"""Self-distillation on the teacher's top-k soft labels (``train.distill.targets: soft``) end to end: the job's
``pseudo`` and ``distill`` stages on the shared tiny model, against hard targets with the same seeds, and the
first step's loss against a hand computation on the same batch."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.timeout(300)

TEACHER = ("pseudo.teacher=refined", "pseudo.confidence_threshold=0.12")  # the CR model: unsure, top-1 ~0.12


def _distill(cfg, out) -> dict:
    """Run the job's refine, pseudo and distill stages (the shared pretrain/estimate stages copied into
    ``out``; stages already there with the same settings are kept); returns the distill stage's manifest."""
    from labelshift.pipeline import Pipeline
    from labelshift.runners import LocalTrainRunner
    from labelshift.tracking import Tracker

    Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda m: None).run(("refine", "pseudo", "distill"))
    return json.loads((out / "stages" / "distill" / "manifest.json").read_text())


def test_soft_target_distillation_runs_through_the_job_and_differs_from_hard(shared_cfg, tiny_trained, tmp_path):
    from labelshift.models import checkpoint_sha256

    out = tiny_trained.copy_stages(tmp_path / "run")
    soft = _distill(shared_cfg(*TEACHER, "train.distill.targets=soft", out=out), out)
    soft_model = checkpoint_sha256(out / "stages" / "distill" / "model.safetensors")
    pseudo_commit = json.loads((out / "stages" / "pseudo" / "manifest.json").read_text())["commit"]
    hard = _distill(shared_cfg(*TEACHER, "train.distill.targets=hard", out=out), out)
    hard_model = checkpoint_sha256(out / "stages" / "distill" / "model.safetensors")

    assert json.loads((out / "stages" / "pseudo" / "manifest.json").read_text())["commit"] == pseudo_commit  # reused
    assert soft["config"]["train"]["distill"]["targets"] == "soft"
    assert hard["config"]["train"]["distill"]["targets"] == "hard"
    for manifest in (soft, hard):
        assert manifest["metrics"]["steps_run"] == 4 and math.isfinite(manifest["metrics"]["final_loss"])
        assert manifest["inputs"]["pseudo"] == pseudo_commit
    assert soft["metrics"]["final_loss"] != hard["metrics"]["final_loss"]
    assert soft_model != hard_model  # the same seeds, batches and start: only the targets differ


def test_first_soft_distillation_step_loss_equals_a_hand_computation(shared_cfg, tiny_trained, tmp_path):
    from labelshift.build import build_split, build_student
    from labelshift.data.pseudo_labels import PseudoLabelDataset
    from labelshift.models import align_corners_of, upsample_logits
    from labelshift.pipeline import Pipeline
    from labelshift.pseudo import LABELS, SOFT
    from labelshift.runners import LocalTrainRunner
    from labelshift.runtime import apply_runtime
    from labelshift.tracking import Tracker
    from labelshift.train.context import LocalContext
    from labelshift.train.loop import GlobalBatchSampler, endless_batches
    from labelshift.train.stages import run_stage

    out = tiny_trained.copy_stages(tmp_path / "run")
    cfg = shared_cfg(*TEACHER, "train.distill.targets=soft", "train.distill.iterations=1", out=out)
    Pipeline(cfg, LocalTrainRunner(out / "train"), Tracker(), log=lambda m: None).run(("refine", "pseudo"))
    pseudo_dir = out / "stages" / "pseudo"
    payload = {"stage": "distill", "config": cfg.model_dump(mode="json"), "init_checkpoint": str(tiny_trained.model),
               "pseudo_label_dir": str(pseudo_dir / LABELS), "soft_label_dir": str(pseudo_dir / SOFT)}
    summary = run_stage(payload, LocalContext(tmp_path / "checkpoints"))
    assert summary["steps_run"] == 1 and len(summary["losses"]) == 1
    trained_loss = summary["losses"][0][1]

    # by hand: the student before its first step, on the first batch of the same sampler and augmentation
    optim = cfg.train.distill
    apply_runtime(cfg.runtime.torch_threads, cfg.runtime.deterministic)
    student = build_student(cfg, tiny_trained.model).train()
    torch.manual_seed(optim.seed)
    images = build_split(cfg, "target", train=True, with_labels=False, seed=optim.seed)
    dataset = PseudoLabelDataset(images, "soft", pseudo_dir / SOFT, cfg.pseudo.confidence_threshold)
    sampler = GlobalBatchSampler(len(dataset), optim.batch_size, 0, 1, optim.seed)
    batch = next(endless_batches(dataset, sampler, 0, cfg.data.num_workers))
    targets = batch["label"]
    assert targets.shape == (optim.batch_size, 19, 32, 64) and targets.dtype == torch.float32  # distributions
    mass = targets.sum(1)
    valid = mass > 0
    assert torch.allclose(mass[valid], torch.ones(()), atol=1e-5) and 0.0 < valid.float().mean() < 1.0
    assert ((targets > 0).sum(1) <= cfg.pseudo.top_k).all()
    with torch.no_grad():
        logits = upsample_logits(student(batch["image"]).float(), (32, 64), align_corners=align_corners_of(student))
    per_pixel = -(targets * torch.log_softmax(logits, dim=1)).sum(1)
    hand_loss = float(per_pixel[valid].mean())
    assert trained_loss == pytest.approx(hand_loss, rel=1e-5)
    hard_loss = float(torch.nn.functional.cross_entropy(logits, targets.argmax(1).masked_fill(~valid, 255),
                                                         ignore_index=255))
    assert abs(hard_loss - hand_loss) > 1e-3  # the soft targets, not their argmax, made the loss
