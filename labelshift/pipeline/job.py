"""The main job: world -> pretrain -> estimate -> evaluate -> refine -> evaluate -> pseudo -> distill -> evaluate.

One stage table (:data:`STAGES`: name, the config sections it reads, the upstream stages it consumes, its body)
is all the job iterates; adding a stage is one entry plus its body in ``steps``. Every stage writes
``<output_dir>/stages/<stage>/`` with a manifest; a re-run skips complete stages and resumes the first incomplete
one (training stages resume from their Ray Train / local checkpoints). Evaluation splits are only ever
evaluated: no checkpoint or setting is selected on them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

import torch

from labelshift.artifacts import flat_numbers, read_calibration, read_priors
from labelshift.atomic import write_json_atomic, write_text_atomic
from labelshift.build import build_model, class_set_of, ensure_world, eval_loader
from labelshift.calibrate import Calibration
from labelshift.config import ConfigError, ExperimentConfig, dump_config
from labelshift.models import checkpoint_sha256
from labelshift.models.checkpoint import CheckpointError
from labelshift.pipeline import steps
from labelshift.pipeline.manifest import StageDir, fingerprint
from labelshift.pipeline.report import format_summary, results_metrics, summary_rows
from labelshift.priors import ClassPrior
from labelshift.runners.data import InProcessPasses
from labelshift.runtime import apply_runtime, runtime_environment
from labelshift.tracking import Tracker


@dataclass(frozen=True)
class Stage:
    """One entry of the stage table."""

    name: str
    sections: tuple[str, ...]  # config paths whose values define the stage's work (its fingerprint)
    upstream: tuple[str, ...]  # stages whose outputs it consumes
    body: Callable[[steps.JobContext, StageDir], steps.StageResult]
    # when what it reads depends on the configuration: cfg -> (sections, upstream), replacing the two above
    inputs: Callable[[ExperimentConfig], tuple[tuple[str, ...], tuple[str, ...]]] | None = None
    # bumped when the stage's outputs change form, so that outputs of an older labelshift are recomputed (a stage
    # at version 1 leaves it out of its fingerprint)
    version: int = 1

    def inputs_for(self, cfg: ExperimentConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(config sections, upstream stages) the stage reads under ``cfg``."""
        return (self.sections, self.upstream) if self.inputs is None else self.inputs(cfg)


STAGES: tuple[Stage, ...] = (
    Stage("pretrain", ("data", "model", "train.source"), (), steps.pretrain),
    Stage("estimate", ("prior",), ("pretrain",), steps.estimate, version=2),  # 2: calibration.json's presence model
    Stage("evaluate_adapted", ("adjust", "eval"), ("estimate",), steps.evaluate_adapted),
    Stage("refine", ("train.refine",), ("estimate",), steps.refine),
    Stage("evaluate_refined", ("eval",), ("refine",), steps.evaluate_refined),
    Stage("pseudo", ("pseudo", "eval.amp_bf16"), ("refine",), steps.pseudo, inputs=steps.pseudo_inputs),
    Stage("distill", ("train.distill",), ("pseudo",), steps.distill),
    Stage("evaluate_distilled", ("eval",), ("distill",), steps.evaluate_distilled),
    Stage("export", ("adjust",), ("estimate", "refine", "distill"), steps.export),
)
STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in STAGES}
ALL_STAGES: tuple[str, ...] = tuple(STAGE_TABLE)  # equal to config.PIPELINE_STAGES (tests/test_architecture.py)


class Pipeline:
    """Runs the stages of one experiment with a training runner (local or Ray Train) and a tracker."""

    def __init__(self, cfg: ExperimentConfig, runner, tracker: Tracker, device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print, progress: bool = False,
                 progress_stream: TextIO | None = None, passes=None) -> None:
        """``log`` receives one line per stage event; ``progress`` draws a progress bar (on ``progress_stream``,
        default stderr) over the batches of the evaluation, estimate and pseudo-label passes. ``passes``: the
        engine of the estimate, evaluation and pseudo-label passes (``labelshift.runners.data``; default: in
        this process on ``device``; the Ray job gives ``RayDataPasses``)."""
        self.cfg = cfg
        self.progress = progress
        self.progress_stream = progress_stream
        self._stage_name = ""
        self.runner = runner
        self.tracker = tracker
        self.device = torch.device(device)
        self.log = log
        self.passes = passes or InProcessPasses(self.device, self.loader)
        self.output_dir = Path(cfg.output_dir).resolve()
        self.stages_root = self.output_dir / "stages"
        self.class_set = class_set_of(cfg)
        self.results: dict[str, dict] = {}
        self._adapted_sha256: str | None = None
        self.fingerprints: dict[str, str] = {}
        for stage in STAGES:  # each stage's fingerprint: its config sections and its upstream fingerprints
            sections, upstream = stage.inputs_for(cfg)
            self.fingerprints[stage.name] = fingerprint({
                "stage": stage.name, "sections": self._cfg(*sections),
                "upstream": [self.fingerprints[u] for u in upstream],
                **({"version": stage.version} if stage.version != 1 else {})})

    # ------------------------------------------------------------------ plumbing
    def _upstream_inputs(self, name: str) -> dict:
        """The commit ids of the upstream outputs ``name`` consumes (the adapted model's sha256 when it is a
        given checkpoint rather than the pretrain stage's). Every upstream stage must itself be up to date, all
        the way up; one that is not is an error naming it."""
        inputs = {}
        for upstream in STAGE_TABLE[name].inputs_for(self.cfg)[1]:
            if upstream == "pretrain" and self.adapted_model_path() != self.model_path("pretrain"):
                inputs["adapted_model_sha256"] = self.adapted_model_sha256()
                continue
            stage = self._stage_dir(upstream)
            if not stage.is_complete():
                raise RuntimeError(f"stage {name!r} needs the outputs of stage {upstream!r}, and "
                                   f"{stage.final} is missing, incomplete, from another configuration or built "
                                   f"from outputs that have changed since: run {upstream!r} first "
                                   f"(e.g. --stages {upstream},{name})")
            inputs[upstream] = stage.manifest().get("commit")  # None: written before commit ids existed
        return inputs

    def _stage_dir(self, name: str) -> StageDir:
        return StageDir(self.stages_root, name, self.fingerprints[name], self._upstream_inputs(name))

    def adapted_model_sha256(self) -> str:
        """sha256 of the adapted model file (computed once per job)."""
        if self._adapted_sha256 is None:
            self._adapted_sha256 = checkpoint_sha256(self.adapted_model_path())
        return self._adapted_sha256

    def run_stage(self, stage: Stage) -> dict:
        """Skip ``stage`` when its manifest is complete and valid, else run its body; returns the manifest."""
        directory = self._stage_dir(stage.name)
        if directory.is_complete():
            self.log(f"[{stage.name}] complete (manifest valid): skipped")
            manifest = directory.manifest()
        else:
            self.log(f"[{stage.name}] running")
            self._stage_name = stage.name
            began = time.perf_counter()
            with self.tracker.stage(stage.name):
                directory.begin()
                outputs, metrics = stage.body(self, directory)
                metrics = {**metrics, "seconds": round(time.perf_counter() - began, 2)}
                manifest = directory.commit(outputs, metrics, {"config": dump_config(self.cfg),
                                                               "mlflow_run_id": self.tracker.active_run_id(),
                                                               "environment": runtime_environment()})
                self.tracker.log_metrics(flat_numbers(metrics))
                for rel in outputs:
                    if (directory.final / rel).is_file() and not rel.endswith(".safetensors"):
                        self.tracker.log_artifact(directory.final / rel, artifact_path=stage.name)
                self.tracker.log_stage_plots(directory.final, metrics, artifact_path="plots")
                self.tracker.set_tags({"labelshift.stage_dir": str(directory.final)})
            self.log(f"[{stage.name}] done in {metrics['seconds']:.1f}s")
        self.results[stage.name] = manifest["metrics"]
        return manifest

    def _cfg(self, *paths: str) -> dict:
        data = dump_config(self.cfg)
        out = {}
        for path in paths:
            node = data
            for key in path.split("."):
                node = node[key]
            out[path] = node
        return out

    def model_path(self, stage: str) -> Path:
        return self.stages_root / stage / steps.MODEL_FILE

    # ------------------------------------------------------------------ entry point
    def run(self, stages: tuple[str, ...] | None = None) -> dict:
        """Run ``stages`` (default: the configured ones) in pipeline order; returns the summary. On the embedded
        world the world is generated and ``pretrain`` (the adapted model every stage starts from) always runs."""
        wanted = tuple(stages or self.cfg.stages)
        unknown = [s for s in wanted if s not in STAGE_TABLE]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {list(ALL_STAGES)}")
        apply_runtime(self.cfg.runtime.torch_threads, self.cfg.runtime.deterministic)
        ensure_world(self.cfg, self.log)
        for stage in STAGES:
            if stage.name in wanted or (stage.name == "pretrain" and self.cfg.data.world is not None):
                self.run_stage(stage)
        return self.write_summary()

    def adapted_model_path(self) -> Path:
        if self.cfg.data.world is not None or "pretrain" in self.cfg.stages:
            return self.model_path("pretrain")
        if not self.cfg.model.checkpoint:
            raise ConfigError("no adapted model: set model.checkpoint (e.g. a FADA checkpoint) or run 'pretrain'")
        path = Path(self.cfg.model.checkpoint)
        if not path.is_file():
            raise CheckpointError(f"model.checkpoint {path} does not exist (the adapted model every stage starts from)")
        return path

    def load(self, stage: str | None = None) -> torch.nn.Module:
        path = self.adapted_model_path() if stage is None else self.model_path(stage)
        return build_model(self.cfg, path).to(self.device).eval()

    def loader(self, which: str, *, with_labels: bool = True, max_images: int | None = None,
               size: tuple[int, int] | None = None):
        """The evaluation loader of split ``which`` (model input ``size``, default the domain's); with
        ``progress``, wrapped in a progress bar."""
        loader = eval_loader(self.cfg, which, with_labels=with_labels, max_images=max_images, size=size)
        if not self.progress:
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=f"  {self._stage_name} · {which}", unit="batch", leave=False, dynamic_ncols=True,
                    file=self.progress_stream)

    def priors(self) -> dict[str, ClassPrior]:
        """Every prior the estimate stage wrote, by name (its index, ``priors.json``)."""
        return read_priors(self.stages_root / "estimate")

    def calibration(self) -> Calibration:
        return read_calibration(self.stages_root / "estimate")

    def write_summary(self) -> dict:
        rows = summary_rows(self.results)
        summary = {"name": self.cfg.name, "output_dir": str(self.output_dir), "rows": rows, "stages": self.results,
                   "environment": runtime_environment()}
        path = self.output_dir / "summary.json"
        write_json_atomic(path, summary)
        table = format_summary(rows)
        write_text_atomic(self.output_dir / "summary.md", table + "\n")
        self.tracker.log_artifact(path)
        self.tracker.log_artifact(self.output_dir / "summary.md")
        self.tracker.log_metrics(results_metrics(rows))  # the parent run: jobs compare at the UI's top level
        self.log(table)
        self.log(f"summary written to {path}")
        return summary
