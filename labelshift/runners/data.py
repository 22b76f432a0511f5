"""Ray Data passes over a split: evaluation, the estimate pass, pixel samples, pseudo/soft labels, predictions.

Each pass is one pipeline over the split's chunks (:mod:`labelshift.data.chunks`, ``eval.batch_size`` images
each, so the model sees the batches the in-process library functions see and computes the same logits)::

    from_items(chunks) -> map(decode: CPU tasks, the project's decoders)
                       -> map_batches(ModelActor, compute=ActorPoolStrategy(size=ray.data_actors),
                                      num_gpus=1 if ray.use_gpu, batch_size=1 chunk)
                       [-> map(write: CPU tasks, atomic files, deterministic names)]   labelling passes only

The actor runs one *work* per chunk (an object below) and returns a small result (confusion matrices, an
estimator shard, a pixel sample, a chunk's teacher outputs); the driver merges results in chunk order, so the
outcome does not depend on which actor ran what. The in-process equivalents: ``inference.evaluate``,
``estimate.from_config.estimate_target_priors``, ``inference.sample_pixels``, ``pseudo.label_split``.
Ray is imported inside the functions that run pipelines only.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from labelshift.build import amp_dtype_of, build_model, build_split, class_set_of
from labelshift.calibrate import Calibration
from labelshift.config import ExperimentConfig, config_from_dict
from labelshift.data.chunks import as_eval_batch, decode_chunk, plan_chunks
from labelshift.estimate.base import EstimatorInputs
from labelshift.estimate.from_config import (CALIBRATION_PIXELS_PER_IMAGE, PriorEstimation, estimation_provenance,
                                             prepare_estimators, shard_estimators)
from labelshift.estimate.passes import expect_pixels, merge_estimators, update_estimators
from labelshift.inference import LabelledSample, LogitTransform, evaluate, iterate_predictions, sample_pixels
from labelshift.metrics import ConfusionMatrix
from labelshift.priors import LabelStatistics
from labelshift.pseudo import (TeacherSettings, label_split, missing_chunks, remove_stale_temporaries, summarise,
                               teacher_outputs, write_outputs)
from labelshift.runtime import apply_runtime


# ------------------------------------------------------------------------------------------ works (per chunk)
@dataclass(frozen=True)
class EvaluateWork:
    """Confusion matrices of one chunk, one per named logit transform (None: raw logits)."""

    num_classes: int
    transforms: dict[str, LogitTransform | None]
    flip: bool
    scales: tuple[float, ...]

    def __call__(self, model, chunk: dict, device: torch.device, amp_dtype) -> dict[str, np.ndarray]:
        matrices = evaluate(model, [as_eval_batch(chunk)], self.num_classes, device=device,
                            logit_transforms=self.transforms, flip=self.flip, scales=self.scales, amp_dtype=amp_dtype)
        return {name: matrix.matrix for name, matrix in matrices.items()}


@dataclass(frozen=True)
class SampleWork:
    """A labelled sample of one chunk (``inference.sample_pixels``)."""

    pixels_per_image: int
    seed: int

    def __call__(self, model, chunk: dict, device: torch.device, amp_dtype) -> LabelledSample:
        return sample_pixels(model, [as_eval_batch(chunk)], device=device, pixels_per_image=self.pixels_per_image,
                             seed=self.seed, amp_dtype=amp_dtype)


@dataclass(frozen=True)
class EstimateWork:
    """One chunk's estimator shard (images named, so its draws are the ones of an in-process pass) and, when
    the chunk has labels, its label statistics (the oracle)."""

    config: dict
    methods: tuple[str, ...]
    inputs: EstimatorInputs
    calibration: Calibration
    total_pixels: int

    def __call__(self, model, chunk: dict, device: torch.device, amp_dtype) -> tuple[dict, LabelStatistics | None]:
        cfg = config_from_dict(self.config)
        estimators = shard_estimators(cfg, self.methods, self.inputs)
        expect_pixels(estimators, self.total_pixels)
        oracle = None
        for logits, labels, names in iterate_predictions(model, [as_eval_batch(chunk)], device=device,
                                                         at_label_size=False, amp_dtype=amp_dtype):
            update_estimators(estimators, logits, self.calibration, names)
            if labels is not None:
                oracle = LabelStatistics(class_set_of(cfg).names)
                oracle.update(labels)
        return estimators, oracle


@dataclass(frozen=True)
class TeacherWork:
    """One chunk's teacher outputs (hard labels, confidences, soft labels), written by a later CPU task."""

    settings: TeacherSettings

    def __call__(self, model, chunk: dict, device: torch.device, amp_dtype) -> dict:
        return teacher_outputs(model, chunk, self.settings, device, amp_dtype)


# ------------------------------------------------------------------------------------------ pipeline stages
class ModelActor:
    """The model in a Ray Data actor: built once per actor from the config and checkpoint, on the GPU Ray
    assigned (else the CPU, with ``runtime.torch_threads`` or the actor's CPUs as torch threads)."""

    def __init__(self, config: dict, checkpoint: str, work: Callable, threads: int) -> None:
        cfg = config_from_dict(config)
        apply_runtime(cfg.runtime.torch_threads or threads, cfg.runtime.deterministic)
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.ray.use_gpu else "cpu")
        self.model = build_model(cfg, checkpoint).to(self.device).eval()
        self.amp_dtype = amp_dtype_of(cfg, self.device)
        self.work = work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [pickle.dumps(self.work(self.model, pickle.loads(payload), self.device, self.amp_dtype))
                   for payload in batch["payload"]]
        return {"chunk": batch["chunk"], "payload": np.array(results, dtype=object)}


def _decoder(dataset) -> Callable[[dict], dict]:
    def decode(row: dict) -> dict:
        chunk = decode_chunk(dataset, [int(index) for index in row["indices"]])
        return {"chunk": int(row["chunk"]), "payload": pickle.dumps(chunk)}
    return decode


def _writer(out_dir: Path, settings: TeacherSettings) -> Callable[[dict], dict]:
    def write(row: dict) -> dict:
        counts = write_outputs(out_dir, pickle.loads(row["payload"]), settings)
        return {"chunk": int(row["chunk"]), "payload": pickle.dumps(counts)}
    return write


def run_chunks(cfg: ExperimentConfig, checkpoint: str | Path, dataset, chunks: dict[int, list[int]], work: Callable,
               after: Callable[[dict], dict] | None = None) -> list[Any]:
    """Run ``work`` over ``chunks`` ({number: dataset indices}) of ``dataset`` on Ray Data; returns the
    results in chunk order (``after`` maps each actor result in a CPU task first, e.g. writes files)."""
    import ray

    if not chunks:
        return []
    items = [{"chunk": number, "indices": indices} for number, indices in sorted(chunks.items())]
    pipeline = ray.data.from_items(items, override_num_blocks=len(items)).map(_decoder(dataset), num_cpus=1)
    cpus = cfg.ray.data_cpus_per_actor
    pipeline = pipeline.map_batches(
        ModelActor, fn_constructor_kwargs={"config": cfg.model_dump(mode="json"), "checkpoint": str(checkpoint),
                                           "work": work, "threads": max(1, int(cpus))},
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.data_actors), batch_size=1, num_cpus=cpus,
        num_gpus=1 if cfg.ray.use_gpu else 0)
    if after is not None:
        pipeline = pipeline.map(after, num_cpus=1)
    rows = sorted(pipeline.take_all(), key=lambda row: int(row["chunk"]))
    return [pickle.loads(row["payload"]) for row in rows]


def _split_chunks(cfg: ExperimentConfig, which: str, *, with_labels: bool, max_images: int | None = None,
                  size: tuple[int, int] | None = None):
    dataset = build_split(cfg, which, train=False, with_labels=with_labels, size=size)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    return dataset, dict(enumerate(plan_chunks(count, cfg.eval.batch_size)))


# ------------------------------------------------------------------------------------------ the passes
def evaluate_pass(cfg: ExperimentConfig, checkpoint: str | Path, which: str,
                  transforms: dict[str, LogitTransform | None],
                  size: tuple[int, int] | None = None) -> dict[str, ConfusionMatrix]:
    """Confusion matrices of ``which`` (a labelled split, at model input ``size``), one per transform; the
    matrices of ``inference.evaluate`` over ``eval_loader(cfg, which, size=size)``."""
    dataset, chunks = _split_chunks(cfg, which, with_labels=True, size=size)
    num_classes = class_set_of(cfg).num_classes
    work = EvaluateWork(num_classes, dict(transforms), cfg.eval.flip, tuple(cfg.eval.scales))
    totals = {name: ConfusionMatrix(num_classes) for name in transforms}
    for matrices in run_chunks(cfg, checkpoint, dataset, chunks, work):
        for name, matrix in matrices.items():
            totals[name].matrix += matrix
    return totals


def sample_pass(cfg: ExperimentConfig, checkpoint: str | Path, which: str, pixels_per_image: int,
                seed: int) -> LabelledSample:
    """The labelled sample ``inference.sample_pixels`` draws from ``which``, its chunks in order."""
    dataset, chunks = _split_chunks(cfg, which, with_labels=True)
    return LabelledSample.concat(run_chunks(cfg, checkpoint, dataset, chunks, SampleWork(pixels_per_image, seed)))


def estimate_pass(cfg: ExperimentConfig, checkpoint: str | Path, *, methods: tuple[str, ...], with_oracle: bool,
                  checkpoint_hash: str | None = None) -> PriorEstimation:
    """``estimate_target_priors`` on Ray Data: the calibration sample of source val and the target pass run in
    actors; the shards merge in chunk order into estimators equal to the in-process pass's."""
    prior_cfg = cfg.prior
    setup = prepare_estimators(cfg, methods, lambda: sample_pass(
        cfg, checkpoint, "source_val", CALIBRATION_PIXELS_PER_IMAGE, prior_cfg.seed))
    dataset, chunks = _split_chunks(cfg, "target", with_labels=with_oracle, max_images=prior_cfg.max_images)
    width, height = cfg.data.target_transform.size
    total_pixels = sum(len(indices) for indices in chunks.values()) * width * height
    work = EstimateWork(cfg.model_dump(mode="json"), tuple(setup.estimators), setup.inputs, setup.calibration,
                        total_pixels)
    oracle = LabelStatistics(class_set_of(cfg).names) if with_oracle else None
    for shard, shard_oracle in run_chunks(cfg, checkpoint, dataset, chunks, work):
        merge_estimators(setup.estimators, shard)
        if oracle is not None and shard_oracle is not None:
            oracle.merge(shard_oracle)
    provenance = estimation_provenance(cfg, checkpoint, checkpoint_hash, setup.calibration)
    return PriorEstimation(setup.source, setup.calibration, setup.results(provenance),
                           oracle if with_oracle and dataset.with_labels else None)


def label_pass(cfg: ExperimentConfig, checkpoint: str | Path, dataset, out_dir: str | Path,
               settings: TeacherSettings) -> dict:
    """``pseudo.label_split`` on Ray Data: every chunk some image of which lacks an output file is decoded,
    labelled in the actors and written by CPU tasks (atomic files under ``out_dir``); returns the counts of the
    chunks it ran (``pseudo.summarise``) and ``chunks_run`` / ``chunks_total``."""
    out_dir = Path(out_dir)
    chunks = plan_chunks(len(dataset), cfg.eval.batch_size)
    remove_stale_temporaries(out_dir)
    todo = {number: chunks[number] for number in missing_chunks(out_dir, dataset, chunks, settings)}
    counts = run_chunks(cfg, checkpoint, dataset, todo, TeacherWork(settings), after=_writer(out_dir, settings))
    return {**summarise(counts), "chunks_run": len(todo), "chunks_total": len(chunks)}


# ------------------------------------------------------------------------------------------ engines
class InProcessPasses:
    """The passes as library functions in this process, on ``device``; ``loader(which, with_labels=,
    max_images=, size=)`` builds a split's batches (the job's draws a progress bar)."""

    def __init__(self, device: torch.device, loader: Callable[..., Any],
                 threads: tuple[int, int] | None = None) -> None:
        self.device, self.loader, self.threads = torch.device(device), loader, threads  # threads: label_split's

    def _model(self, cfg: ExperimentConfig, checkpoint: str | Path) -> torch.nn.Module:
        return build_model(cfg, checkpoint).to(self.device).eval()

    def evaluate(self, cfg: ExperimentConfig, checkpoint: str | Path, which: str,
                 transforms: dict[str, LogitTransform | None], size: tuple[int, int] | None = None
                 ) -> dict[str, ConfusionMatrix]:
        return evaluate(self._model(cfg, checkpoint), self.loader(which, size=size), class_set_of(cfg).num_classes,
                        device=self.device, logit_transforms=transforms, flip=cfg.eval.flip, scales=cfg.eval.scales,
                        amp_dtype=amp_dtype_of(cfg, self.device))

    def estimate(self, cfg: ExperimentConfig, checkpoint: str | Path, *, methods: tuple[str, ...],
                 with_oracle: bool, checkpoint_hash: str | None = None) -> PriorEstimation:
        from labelshift.estimate.from_config import estimate_target_priors

        return estimate_target_priors(cfg, self._model(cfg, checkpoint), checkpoint, device=self.device,
                                      methods=methods, with_oracle=with_oracle, checkpoint_hash=checkpoint_hash,
                                      loader=self.loader)

    def label(self, cfg: ExperimentConfig, checkpoint: str | Path, dataset, out_dir: str | Path,
              settings: TeacherSettings) -> dict:
        return label_split(self._model(cfg, checkpoint), dataset, out_dir, settings, device=self.device,
                           batch_size=cfg.eval.batch_size, amp_dtype=amp_dtype_of(cfg, self.device),
                           threads=self.threads)


class RayDataPasses:
    """The same passes on Ray Data (``ray.data_actors`` model actors, a GPU each with ``ray.use_gpu``); the
    caller's process (the job's driver) needs no GPU."""

    evaluate = staticmethod(evaluate_pass)
    estimate = staticmethod(estimate_pass)
    label = staticmethod(label_pass)


# ------------------------------------------------------------------------------------------ entry points
def estimate_stage_ia(cfg: ExperimentConfig, estimate_dir: str | Path) -> tuple[LogitTransform, dict]:
    """IA towards the ``target`` prior an estimate stage wrote (``priors.json``, ``calibration.json``), with the
    config's ``adjust:`` settings; returns the transform and the priors it uses (as dicts, for a manifest)."""

    from labelshift.adjust import ia_transform
    from labelshift.artifacts import TARGET, read_calibration, read_priors, source_priors_from

    priors = read_priors(estimate_dir)
    source = source_priors_from(priors)
    calibration = read_calibration(estimate_dir)
    target = priors[TARGET]
    transform = ia_transform(cfg.adjust, source, target, calibration)
    return transform, {"source": source.of_kind(target.kind).to_dict(), "target": target.to_dict()}


CLAIM_NOTES = {"new": "a new output directory", "resume": "resumed: the others were complete",
               "overwrite": "the previous pass's outputs were deleted first"}


def run_labelling(passes, cfg: ExperimentConfig, checkpoint: str | Path, dataset, out_dir: str | Path,
                  settings: TeacherSettings, priors_used: dict | None = None, *, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """A standalone labelling pass with its record and manifest; what ``ray_jobs/soft_labels.py``,
    ``ray_jobs/predict.py`` and ``labelshift predict`` run. ``out_dir`` first gets the record of what determines
    its files (``pseudo.labelling_record``): a directory with the same record resumes (only missing files are
    computed), one with another record raises ``pseudo.OutputConflict`` naming the differences unless
    ``overwrite`` (its files are deleted first). Writes ``pseudo.json`` and logs a line with the failure count."""
    from labelshift.pseudo import LABEL_MANIFEST, claim_output_dir, labelling_record, write_label_manifest

    record = labelling_record(cfg, checkpoint, list(dataset.names), settings, priors_used)
    claimed = claim_output_dir(out_dir, record, overwrite=overwrite)
    counts = passes.label(cfg, checkpoint, dataset, out_dir, settings)
    manifest = write_label_manifest(out_dir, cfg, checkpoint, counts, settings, priors_used,
                                    checkpoint_hash=record["checkpoint_sha256"])
    log(f"{counts['images']} images labelled in {counts['chunks_run']} of {counts['chunks_total']} chunks "
        f"({CLAIM_NOTES[claimed]}); {counts['failures']} failure(s)"
        + (f": {', '.join(f['name'] for f in counts['failed'])}" if counts["failures"] else "")
        + f"; manifest {manifest.parent / LABEL_MANIFEST}")
    return counts
