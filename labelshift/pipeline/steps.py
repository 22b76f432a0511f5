"""The bodies of the main job's stages, one function per stage: ``body(job, stage) -> (outputs, metrics)``.

A body writes its outputs into ``stage.partial`` and returns their relative paths and its metrics; the job
(``labelshift.pipeline.job``) owns the stage table, manifests and tracking. Bodies call library passes only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch

from labelshift.adjust import ia_transform
from labelshift.artifacts import (CALIBRATION_FILE, CONFUSION_FILE, LOCAL_IA, NO_ADJUST, ORACLE_IA, SOURCE_CALIBRATED,
                                  TARGET, estimate_name, evaluation_key, ia_name, oracle_name, source_prior_name,
                                  source_priors_from, write_priors)
from labelshift.atomic import write_json_atomic
from labelshift.build import build_split, eval_subsets
from labelshift.bundle import export_bundle
from labelshift.calibrate import Calibration
from labelshift.classes import ClassSet
from labelshift.config import ExperimentConfig
from labelshift.estimate import METHODS, prior_errors
from labelshift.models import checkpoint_sha256
from labelshift.pipeline.manifest import StageDir
from labelshift.priors import ClassPrior, load_prior
from labelshift.pseudo import LABEL_MANIFEST, LABELS, SOFT, pseudo_settings, write_label_manifest
from labelshift.tracking import Tracker

MODEL_FILE = "model.safetensors"
CHECKPOINT_INFO = "checkpoint.json"  # a training stage's model reference: sha256 and the training run
StageResult = tuple[list[str], dict]


class JobContext(Protocol):
    """What a stage body uses of the running job (``labelshift.pipeline.job.Pipeline``)."""

    cfg: ExperimentConfig
    class_set: ClassSet
    device: torch.device
    runner: object
    tracker: Tracker
    stages_root: Path

    def adapted_model_path(self) -> Path: ...
    def adapted_model_sha256(self) -> str: ...
    def model_path(self, stage: str) -> Path: ...
    def load(self, stage: str | None = None) -> torch.nn.Module: ...
    def loader(self, which: str, *, with_labels: bool = True, max_images: int | None = None,
               size: tuple[int, int] | None = None): ...
    def priors(self) -> dict[str, ClassPrior]: ...
    def calibration(self) -> Calibration: ...
    passes: object  # the data passes (labelshift.runners.data: InProcessPasses or RayDataPasses)


def _train(job: JobContext, stage: StageDir, train_stage: str, **payload_extra) -> dict:
    """Run a training stage through the job's runner; writes the model, ``checkpoint.json`` (the model's
    sha256 and the training run it came from); the runner sends the training loss to the stage's run while it
    trains (so a killed attempt keeps its curve)."""
    payload = {"stage": train_stage, "config": job.cfg.model_dump(mode="json"), **payload_extra}
    run_name = f"{job.cfg.name}-{stage.name}-{stage.run_key}"  # same work, same run: a re-run resumes it
    model_path = stage.partial / MODEL_FILE
    summary = job.runner.fit(payload, run_name, model_path, metric_sink=job.tracker.metric_sink())
    losses = summary.get("losses") or []
    write_json_atomic(stage.partial / CHECKPOINT_INFO, {
        "model": MODEL_FILE, "sha256": checkpoint_sha256(model_path), "bytes": model_path.stat().st_size,
        "training_run": {"name": run_name, "location": job.runner.run_location(run_name)},
        "initialised_from": _initialisation(job, train_stage, payload_extra.get("init_checkpoint"))})
    return {"steps_run": summary.get("steps_run"), "resumed_from": summary.get("resumed_from"),
            "final_loss": losses[-1][1] if losses else None, "train_seconds": summary.get("seconds"),
            "world_size": summary.get("world_size")}


def _initialisation(job: JobContext, train_stage: str, init_checkpoint: str | None) -> str | None:
    """What the trained model started from: a checkpoint, or for a fresh student its pretrained weights."""
    if train_stage == "distill" and job.cfg.train.distill.init == "fresh":
        return job.cfg.train.distill.student_pretrained
    return init_checkpoint


def pretrain(job: JobContext, stage: StageDir) -> StageResult:
    """Train the source-only model (on the embedded world: the stand-in for a FADA-adapted model)."""
    return [MODEL_FILE, CHECKPOINT_INFO], _train(job, stage, "source")


def estimate(job: JobContext, stage: StageDir) -> StageResult:
    """Source prior, calibration on source val, every registered estimator on target train, oracle errors.
    Writes each prior as JSON with an index (``priors.json``) and the calibration."""
    prior_cfg = job.cfg.prior
    methods = tuple(dict.fromkeys((prior_cfg.method, *METHODS)))
    found = job.passes.estimate(job.cfg, job.adapted_model_path(), methods=methods, with_oracle=prior_cfg.oracle,
                                checkpoint_hash=job.adapted_model_sha256())
    source = found.source
    outputs = {source_prior_name("pixel"): source.pixel, source_prior_name("image"): source.image,
               SOURCE_CALIBRATED: source.calibrated,
               **{estimate_name(method): prior for method, prior in found.estimates.items()}}
    outputs[TARGET] = (load_prior(prior_cfg.target_prior, job.class_set) if prior_cfg.target_prior
                       else found.estimates[prior_cfg.method])
    metrics = {"calibration_temperature": found.calibration.temperature}
    if found.oracle is not None:
        target = job.cfg.data.target
        oracle_meta = {"dataset": target.kind, "split": target.split or target.list_file,
                       "note": "oracle, evaluation only"}
        outputs[oracle_name("pixel")] = found.oracle.pixel_prior(**oracle_meta)
        outputs[oracle_name("image")] = found.oracle.image_prior(**oracle_meta)
        metrics.update(prior_errors(found.estimates, outputs[oracle_name("pixel")], outputs[oracle_name("image")],
                                    source))
    files = write_priors(stage.partial, outputs)
    write_json_atomic(stage.partial / CALIBRATION_FILE, found.calibration.to_dict())
    return [*files, CALIBRATION_FILE], metrics


EVALUATED_MODELS = {None: "adapted", "refine": "refined", "distill": "distilled"}  # eval.input_sizes keys


def _evaluate(job: JobContext, model_stage: str | None, stage: StageDir,
              transforms: dict[str, Callable | None], with_source: bool) -> StageResult:
    """Evaluate the model of ``model_stage`` (None: the adapted model) on target val (at the model input
    ``eval.input_sizes`` sets for it, else the target size) with each logit transform, and on source val."""
    model_path = job.adapted_model_path() if model_stage is None else job.model_path(model_stage)
    target_size = job.cfg.eval.input_sizes.get(EVALUATED_MODELS[model_stage])
    subsets = eval_subsets(job.cfg)
    metrics: dict = {}
    confusions: dict[str, list] = {}  # {evaluation key: (K, K) counts}, what the stage's heatmaps draw
    splits = {"target_val": transforms}
    if with_source and job.cfg.data.source_val is not None:
        splits["source_val"] = {NO_ADJUST: None}
    for split, split_transforms in splits.items():
        matrices = job.passes.evaluate(job.cfg, model_path, split, split_transforms,
                                       size=target_size if split == "target_val" else None)
        for name, matrix in matrices.items():
            metrics[evaluation_key(split, name)] = matrix.to_dict(job.class_set.names, subsets)
            confusions[evaluation_key(split, name)] = matrix.matrix.tolist()
    write_json_atomic(stage.partial / "metrics.json", metrics)
    write_json_atomic(stage.partial / CONFUSION_FILE, confusions)
    return ["metrics.json", CONFUSION_FILE], metrics


def evaluate_adapted(job: JobContext, stage: StageDir) -> StageResult:
    """Target val without adjustment, with IA towards every estimate, the target and the oracles; source val.
    With ``adjust.mode: local`` also IA with per-image priors shrunk toward the target prior (``ia_local_target``)."""
    priors, calibration = job.priors(), job.calibration()
    source = source_priors_from(priors)
    transforms: dict[str, Callable | None] = {NO_ADJUST: None}
    global_adjust = job.cfg.adjust.model_copy(update={"mode": "global"})
    for name, prior in priors.items():
        if name == TARGET or name.startswith((estimate_name(""), oracle_name(""))):
            transforms[ia_name(name)] = ia_transform(global_adjust, source, prior, calibration)
    if job.cfg.adjust.mode == "local":
        transforms[LOCAL_IA] = ia_transform(job.cfg.adjust, source, priors[TARGET], calibration)
    same_kind_oracle = ia_name(oracle_name(priors[TARGET].kind))
    if same_kind_oracle in transforms:  # the ceiling for the configured estimate: the oracle of the same kind
        transforms[ORACLE_IA] = transforms[same_kind_oracle]
    return _evaluate(job, None, stage, transforms, with_source=True)


def refine(job: JobContext, stage: StageDir) -> StageResult:
    """Classifier Refinement: head-only training with the logit-adjusted CE (source prior -> target prior)."""
    priors = job.priors()
    target = priors[TARGET]
    source = source_priors_from(priors).of_kind(target.kind)
    return [MODEL_FILE, CHECKPOINT_INFO], _train(job, stage, "refine", init_checkpoint=str(job.adapted_model_path()),
                                                 source_prior=source.to_dict(), target_prior=target.to_dict())


def evaluate_refined(job: JobContext, stage: StageDir) -> StageResult:
    return _evaluate(job, "refine", stage, {NO_ADJUST: None}, with_source=False)


def pseudo_inputs(cfg: ExperimentConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the pseudo stage reads: the CR model (``pseudo.teacher: refined``), or the adapted model with IA
    towards the target prior (``adapted_ia``: the estimate stage's priors and the IA settings)."""
    if cfg.pseudo.teacher == "adapted_ia":
        return ("pseudo", "eval.amp_bf16", "adjust"), ("estimate",)
    return ("pseudo", "eval.amp_bf16"), ("refine",)


def pseudo(job: JobContext, stage: StageDir) -> StageResult:
    """The teacher labels target train (hard labels, low-confidence pixels ignored): the CR-refined model, or
    the adapted model with IA towards the target prior (the reference offers both)."""
    priors_used = None
    if job.cfg.pseudo.teacher == "adapted_ia":
        priors = job.priors()
        source, target = source_priors_from(priors), priors[TARGET]
        teacher, transform = job.adapted_model_path(), ia_transform(job.cfg.adjust, source, target, job.calibration())
        priors_used = {"source": source.of_kind(target.kind).to_dict(), "target": target.to_dict(),
                       "mode": job.cfg.adjust.mode}
    else:
        teacher, transform = job.model_path("refine"), None
    settings = pseudo_settings(job.cfg, transform)
    dataset = build_split(job.cfg, "target", train=False, with_labels=False)
    counts = job.passes.label(job.cfg, teacher, dataset, stage.partial, settings)
    write_label_manifest(stage.partial, job.cfg, teacher, counts, settings, priors_used)
    if counts["failures"]:
        print(f"[pseudo] {counts['failures']} image(s) could not be read: see {stage.final}/{LABEL_MANIFEST}")
    return settings.output_dirs() + [LABEL_MANIFEST], {k: v for k, v in counts.items() if k != "failed"}


def distill(job: JobContext, stage: StageDir) -> StageResult:
    pseudo_dir = job.stages_root / "pseudo"
    soft = {"soft_label_dir": str(pseudo_dir / SOFT)} if job.cfg.train.distill.targets == "soft" else {}
    return [MODEL_FILE, CHECKPOINT_INFO], _train(job, stage, "distill", init_checkpoint=str(job.adapted_model_path()),
                                                 pseudo_label_dir=str(pseudo_dir / LABELS), **soft)


def evaluate_distilled(job: JobContext, stage: StageDir) -> StageResult:
    return _evaluate(job, "distill", stage, {NO_ADJUST: None}, with_source=False)


def export(job: JobContext, stage: StageDir) -> StageResult:
    """Model bundles for serving (``labelshift.bundle``): ``bundles/adapted`` (IA applies), ``bundles/refined``
    and ``bundles/distilled`` (already prior-corrected), each with the priors, calibration and config."""
    priors, calibration = job.priors(), job.calibration()
    models = {"adapted": (job.adapted_model_path(), False, "pretrain"),
              "refined": (job.model_path("refine"), True, "refine"),
              "distilled": (job.model_path("distill"), True, "distill")}
    files = []
    for name, (model_path, corrected, model_stage) in models.items():
        written = export_bundle(stage.partial / "bundles" / name, model_path=model_path, cfg=job.cfg, priors=priors,
                                calibration=calibration, prior_corrected=corrected, model_stage=model_stage)
        files += [f"bundles/{name}/{rel}" for rel in written]
    return files, {"bundles": len(models)}
