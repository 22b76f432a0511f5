"""The main job: world -> pretrain -> estimate -> evaluate -> refine -> evaluate -> pseudo -> distill -> evaluate.

Every stage writes ``<output_dir>/stages/<stage>/`` with a manifest; a re-run skips complete stages and
resumes the first incomplete one (training stages resume from their Ray Train / local checkpoints).
Evaluation splits are only ever evaluated: no checkpoint or setting is selected on them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from labelshift.build import build_model, class_set_of, eval_loader
from labelshift.calibrate import Calibration
from labelshift.config import PIPELINE_STAGES, ConfigError, ExperimentConfig, dump_config
from labelshift.models import checkpoint_sha256
from labelshift.models.checkpoint import CheckpointError
from labelshift.pipeline.manifest import StageDir, fingerprint, write_json_atomic
from labelshift.pipeline.report import format_summary, summary_rows
from labelshift.priors import ClassPrior
from labelshift.tracking import Tracker

ALL_STAGES = PIPELINE_STAGES
MODEL_FILE = "model.safetensors"
CHECKPOINT_INFO = "checkpoint.json"  # a training stage's model reference: sha256 and the training run
# stage -> (config sections it reads, upstream stages it consumes)
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pretrain": (("data", "model", "train.source"), ()),
    "estimate": (("prior",), ("pretrain",)),
    "evaluate_adapted": (("adjust", "eval"), ("estimate",)),
    "refine": (("train.refine",), ("estimate",)),
    "evaluate_refined": (("eval",), ("refine",)),
    "pseudo": (("train.distill.confidence_threshold",), ("refine",)),
    "distill": (("train.distill",), ("pseudo",)),
    "evaluate_distilled": (("eval",), ("distill",)),
}


class Pipeline:
    """Runs the stages of one experiment with a training runner (local or Ray Train) and a tracker."""

    def __init__(self, cfg: ExperimentConfig, runner, tracker: Tracker, device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.runner = runner
        self.tracker = tracker
        self.device = torch.device(device)
        self.log = log
        self.output_dir = Path(cfg.output_dir).resolve()
        self.stages_root = self.output_dir / "stages"
        self.class_set = class_set_of(cfg)
        self.fingerprints: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self._adapted_sha256: str | None = None
        self._compute_fingerprints()

    # ------------------------------------------------------------------ plumbing
    def _compute_fingerprints(self) -> None:
        """Each stage's fingerprint: its config sections and its upstream stages' fingerprints."""
        for name in ALL_STAGES:
            sections, upstream = STAGE_INPUTS[name]
            self.fingerprints[name] = fingerprint({"stage": name, "sections": self._cfg(*sections),
                                                   "upstream": [self.fingerprints[u] for u in upstream]})

    def _upstream_inputs(self, name: str) -> dict:
        """The commit ids of the upstream outputs ``name`` consumes (the adapted model's sha256 when it is a
        given checkpoint rather than the pretrain stage's). Every upstream stage must itself be up to date, all
        the way up; one that is not is an error naming it."""
        inputs = {}
        for upstream in STAGE_INPUTS[name][1]:
            if upstream == "pretrain" and self.adapted_model_path() != self.model_path("pretrain"):
                inputs["adapted_model_sha256"] = self.adapted_model_sha256()
                continue
            stage = StageDir(self.stages_root, upstream, self.fingerprints[upstream], self._upstream_inputs(upstream))
            if not stage.is_complete():
                raise RuntimeError(f"stage {name!r} needs the outputs of stage {upstream!r}, and "
                                   f"{stage.final} is missing, incomplete, from another configuration or built "
                                   f"from outputs that have changed since: run {upstream!r} first "
                                   f"(e.g. --stages {upstream},{name})")
            inputs[upstream] = stage.manifest().get("commit")  # None: written before commit ids existed
        return inputs

    def adapted_model_sha256(self) -> str:
        """sha256 of the adapted model file (computed once per job)."""
        if self._adapted_sha256 is None:
            self._adapted_sha256 = checkpoint_sha256(self.adapted_model_path())
        return self._adapted_sha256

    def _run_stage(self, name: str, body: Callable[[StageDir, Path], tuple[list[str], dict]]) -> dict:
        stage = StageDir(self.stages_root, name, self.fingerprints[name], self._upstream_inputs(name))
        if stage.is_complete():
            self.log(f"[{name}] complete (manifest valid): skipped")
            manifest = stage.manifest()
        else:
            self.log(f"[{name}] running")
            began = time.perf_counter()
            with self.tracker.stage(name):
                outputs, metrics = body(stage, stage.begin())
                metrics = {**metrics, "seconds": round(time.perf_counter() - began, 2)}
                manifest = stage.commit(outputs, metrics, {"config": dump_config(self.cfg)})
                self.tracker.log_metrics(_flat_numbers(metrics))
                for rel in outputs:
                    if (stage.final / rel).is_file() and not rel.endswith(".safetensors"):
                        self.tracker.log_artifact(stage.final / rel, artifact_path=name)
                self.tracker.set_tags({"labelshift.stage_dir": str(stage.final)})
            self.log(f"[{name}] done in {metrics['seconds']:.1f}s")
        self.results[name] = manifest["metrics"]
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
        return self.stages_root / stage / MODEL_FILE

    # ------------------------------------------------------------------ entry point
    def run(self, stages: tuple[str, ...] | None = None) -> dict:
        """Run ``stages`` (default: the configured ones) in pipeline order; returns the summary."""
        wanted = tuple(stages or self.cfg.stages)
        unknown = [s for s in wanted if s not in ALL_STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {list(ALL_STAGES)}")
        from labelshift.pipeline import steps

        for name in ALL_STAGES:
            if name in wanted:
                getattr(steps, name)(self)
            elif name == "pretrain" and self.cfg.data.world is not None:
                getattr(steps, name)(self)
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

    def loader(self, which: str, *, with_labels: bool = True, max_images: int | None = None):
        return eval_loader(self.cfg, which, with_labels=with_labels, max_images=max_images)

    def priors(self) -> dict[str, ClassPrior]:
        directory = self.stages_root / "estimate"
        return {p.stem: ClassPrior.from_json(p) for p in sorted(directory.glob("*.json")) if p.stem != "manifest"
                and p.stem != "calibration"}

    def calibration(self) -> Calibration:
        return Calibration.from_dict(json.loads((self.stages_root / "estimate" / "calibration.json").read_text()))

    def write_summary(self) -> dict:
        rows = summary_rows(self.results)
        summary = {"name": self.cfg.name, "output_dir": str(self.output_dir), "rows": rows, "stages": self.results}
        path = self.output_dir / "summary.json"
        write_json_atomic(path, summary)
        table = format_summary(rows)
        (self.output_dir / "summary.md").write_text(table + "\n")
        self.tracker.log_artifact(path)
        self.tracker.log_artifact(self.output_dir / "summary.md")
        self.log(table)
        self.log(f"summary written to {path}")
        return summary


def _flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name.replace(" ", "_")] = value
    return flat
