"""The stage bodies of :class:`labelshift.pipeline.job.Pipeline`, one function per stage."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from labelshift.adjust import adjust_logits
from labelshift.calibrate import Calibration
from labelshift.build import eval_subsets
from labelshift.inference import evaluate
from labelshift.models import checkpoint_sha256
from labelshift.pipeline.job import CHECKPOINT_INFO, MODEL_FILE, Pipeline
from labelshift.pipeline.manifest import StageDir, write_json_atomic
from labelshift.pipeline.priors_stage import IMAGE_METHODS, PIXEL_METHODS, estimate_target_priors, prior_errors
from labelshift.priors import ClassPrior, load_prior
from labelshift.pseudo import write_pseudo_labels


def _train(p: Pipeline, stage: StageDir, train_stage: str, **payload_extra) -> dict:
    """Run a training stage through the pipeline's runner; writes the model, ``checkpoint.json`` (the model's
    sha256 and the training run it came from) and logs rank 0's loss curve to the stage's tracking run."""
    payload = {"stage": train_stage, "config": p.cfg.model_dump(mode="json"), **payload_extra}
    run_name = f"{p.cfg.name}-{stage.name}-{stage.run_key}"  # same work, same run: a re-run resumes it
    model_path = stage.partial / MODEL_FILE
    summary = p.runner.fit(payload, run_name, model_path)
    losses = summary.get("losses") or []
    for step, loss in losses:
        p.tracker.log_metrics({"train_loss": loss}, step=step)
    write_json_atomic(stage.partial / CHECKPOINT_INFO, {
        "model": MODEL_FILE, "sha256": checkpoint_sha256(model_path), "bytes": model_path.stat().st_size,
        "training_run": {"name": run_name, "location": p.runner.run_location(run_name)},
        "initialised_from": _initialisation(p, train_stage, payload_extra.get("init_checkpoint"))})
    return {"steps_run": summary.get("steps_run"), "resumed_from": summary.get("resumed_from"),
            "final_loss": losses[-1][1] if losses else None, "train_seconds": summary.get("seconds"),
            "world_size": summary.get("world_size")}


def _initialisation(p: Pipeline, train_stage: str, init_checkpoint: str | None) -> str | None:
    """What the trained model started from: a checkpoint, or for a fresh student its pretrained weights."""
    if train_stage == "distill" and p.cfg.train.distill.init == "fresh":
        return p.cfg.train.distill.student_pretrained
    return init_checkpoint


def pretrain(p: Pipeline) -> None:
    """Embedded world: generate it (deterministic) and train the source-only model (stand-in for FADA)."""
    if p.cfg.data.world is not None:
        ensure_world(p)

    def body(stage, partial):
        return [MODEL_FILE, CHECKPOINT_INFO], _train(p, stage, "source")

    p._run_stage("pretrain", body)


def ensure_world(p: Pipeline) -> None:
    """Generate the configured world (a no-op when the same world is already there; replaced when it differs)."""
    from labelshift.build import world_root_of
    from labelshift.data.world import generate_world, read_world_manifest

    root = world_root_of(p.cfg)
    if read_world_manifest(root) is None:
        p.log(f"[world] generating the embedded world in {root}")
    generate_world(root, **p.cfg.data.world.model_dump(exclude_none=True), overwrite=True)


def estimate(p: Pipeline) -> None:
    """Source prior, calibration on source val, every estimator on target train, oracle errors."""
    prior_cfg = p.cfg.prior

    def body(stage, partial):
        methods = tuple(dict.fromkeys((prior_cfg.method, *PIXEL_METHODS, *IMAGE_METHODS)))
        found = estimate_target_priors(p.cfg, p.load(), p.adapted_model_path(), device=p.device, methods=methods,
                                       with_oracle=prior_cfg.oracle, seed=p.cfg.train.source.seed,
                                       checkpoint_hash=p.adapted_model_sha256())
        outputs = {"source_pixel": found.source_pixel, "source_image": found.source_image,
                   "source_calibrated": found.calibrated_source,
                   **{f"estimate_{m}": e for m, e in found.estimates.items()}}
        chosen = (load_prior(prior_cfg.target_prior, p.class_set) if prior_cfg.target_prior
                  else found.estimates[prior_cfg.method])
        outputs["target"] = chosen
        metrics = {"calibration_temperature": found.calibration.temperature}
        if found.oracle is not None:
            oracle_meta = {"dataset": p.cfg.data.target.kind,
                           "split": p.cfg.data.target.split or p.cfg.data.target.list_file,
                           "note": "oracle, evaluation only"}
            outputs["oracle_pixel"] = found.oracle.pixel_prior(**oracle_meta)
            outputs["oracle_image"] = found.oracle.image_prior(**oracle_meta)
            metrics.update(prior_errors(found.estimates, outputs["oracle_pixel"], outputs["oracle_image"],
                                        found.source_pixel, found.source_image))
        for name, prior in outputs.items():
            prior.to_json(partial / f"{name}.json")
        write_json_atomic(partial / "calibration.json", found.calibration.to_dict())
        return [f"{n}.json" for n in outputs] + ["calibration.json"], metrics

    p._run_stage("estimate", body)


def _ia(calibration: Calibration, priors: dict[str, ClassPrior], target: ClassPrior, p: Pipeline):
    """IA of the logits towards ``target`` (``adjust.space``): raw logits against the exact source prior of the
    same kind, or, for pixel priors in the calibrated space, z/T + b − log π_cal + log π_t written as
    z/T − log(π_cal·e^(−b)) + log π_t."""
    adjust = p.cfg.adjust
    if target.kind == "pixel" and adjust.space == "calibrated":
        source = calibration.effective_source_prior(priors["source_calibrated"])
        temperature = calibration.temperature
    else:
        source = priors["source_pixel" if target.kind == "pixel" else "source_image"]
        temperature = adjust.temperature
    return functools.partial(adjust_logits, source_prior=source, target_prior=target, temperature=temperature,
                             tau_source=adjust.tau_source, tau_target=adjust.tau_target)


def _evaluate(p: Pipeline, model_stage: str | None, transforms: dict, partial: Path, with_source: bool) -> tuple[list[str], dict]:
    model = p.load(model_stage)
    subsets = eval_subsets(p.cfg)
    metrics: dict = {}
    splits = {"target_val": transforms}
    if with_source and p.cfg.data.source_val is not None:
        splits["source_val"] = {"none": None}
    for split, split_transforms in splits.items():
        matrices = evaluate(model, p.loader(split), p.class_set.num_classes, device=p.device,
                            logit_transforms=split_transforms, flip=p.cfg.eval.flip, scales=p.cfg.eval.scales)
        for name, matrix in matrices.items():
            metrics[f"{split}/{name}"] = matrix.to_dict(p.class_set.names, subsets)
    write_json_atomic(partial / "metrics.json", metrics)
    return ["metrics.json"], metrics


def evaluate_adapted(p: Pipeline) -> None:
    def body(stage, partial):
        priors, calibration = p.priors(), p.calibration()
        transforms = {"none": None}
        for name, prior in priors.items():
            if name == "target" or name.startswith(("estimate_", "oracle_")):
                transforms[f"ia_{name}"] = _ia(calibration, priors, prior, p)
        oracle_same_kind = f"oracle_{priors['target'].kind}"
        if oracle_same_kind in priors:  # the ceiling for the configured estimate: the oracle of the same kind
            transforms["ia_oracle"] = transforms[f"ia_{oracle_same_kind}"]
        return _evaluate(p, None, transforms, partial, with_source=True)

    p._run_stage("evaluate_adapted", body)


def refine(p: Pipeline) -> None:
    """Classifier Refinement: head-only training with the logit-adjusted CE (source prior -> estimated target)."""
    def body(stage, partial):
        priors = p.priors()
        target = priors["target"]
        source = priors["source_pixel" if target.kind == "pixel" else "source_image"]
        return [MODEL_FILE, CHECKPOINT_INFO], _train(p, stage, "refine", init_checkpoint=str(p.adapted_model_path()),
                                                     source_prior=source.to_dict(), target_prior=target.to_dict())

    p._run_stage("refine", body)


def evaluate_refined(p: Pipeline) -> None:
    p._run_stage("evaluate_refined", lambda stage, partial: _evaluate(p, "refine", {"none": None}, partial, with_source=False))


def pseudo(p: Pipeline) -> None:
    """The CR-refined model labels target train (hard labels, low-confidence pixels ignored)."""
    def body(stage, partial):
        model = p.load("refine")
        counts = write_pseudo_labels(model, p.loader("target", with_labels=False), partial / "labels",
                                     device=p.device, confidence_threshold=p.cfg.train.distill.confidence_threshold)
        return ["labels"], counts

    p._run_stage("pseudo", body)


def distill(p: Pipeline) -> None:
    def body(stage, partial):
        return [MODEL_FILE, CHECKPOINT_INFO], _train(p, stage, "distill", init_checkpoint=str(p.adapted_model_path()),
                                                     pseudo_label_dir=str(p.stages_root / "pseudo" / "labels"))

    p._run_stage("distill", body)


def evaluate_distilled(p: Pipeline) -> None:
    p._run_stage("evaluate_distilled", lambda stage, partial: _evaluate(p, "distill", {"none": None}, partial, with_source=False))
