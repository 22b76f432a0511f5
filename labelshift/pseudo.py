"""Pseudo labels, soft labels and predictions of a teacher over a split: the codec, the per-chunk computation and
the writers. One code path: :func:`label_split` runs its three steps (decode, :func:`teacher_outputs`,
:func:`write_outputs`) in one process (sequentially, or with decode and write on thread pools), and
``labelshift.runners.data`` runs them as Ray Data stages.

Outputs per image, keyed by its stem (the Cityscapes ``<city>_<seq>_<frame>``), under a pass's directory:

* ``labels/<stem>.png``: hard pseudo label, single-channel uint8 trainIds at the label (image file)
  resolution, 255 where the teacher's confidence is below the threshold (or ``labelIds`` / colour PNGs for
  batch prediction, :data:`LABEL_FORMATS`);
* ``confidence/<stem>.png``: the teacher's confidence (max softmax probability) as uint8, ``round(255·p)``, at
  the same resolution;
* ``soft/<stem>.parquet``: the soft label at the soft grid, schema :data:`SOFT_LABEL_VERSION` below.

A standalone pass (``runners.data.run_labelling``: ``labelshift predict``, ``ray_jobs/predict.py``,
``ray_jobs/soft_labels.py``) first writes ``labelling.json`` (:func:`labelling_record`: teacher sha256, settings, IA,
model/input settings, images) into its directory: a re-run resumes only under the same record and otherwise stops
naming the differences (:func:`claim_output_dir`; ``--overwrite`` deletes the other pass's files first).

Soft-label Parquet schema, version 1 (one row per file; zstd; read with :func:`read_soft_labels`):

========== ========= ==================================================================================
column     type      meaning
========== ========= ==================================================================================
name       string    the image's stem
height     int32     rows h of the soft grid
width      int32     columns w of the soft grid
k          int32     classes kept per pixel
class_ids  binary    uint8 (k, h, w) C order: the top-k trainIds of each pixel in rank order (rank 0 =
                     top-1 = the argmax of the teacher's logits at that grid)
probs      binary    uint8 (k, h, w): their softmax probabilities quantised as ``q = round(255·p)``
                     (``p ≈ q / 255``, error <= 1/510)
kept_mass  float32   mean over pixels of the probability mass the top-k keep (before quantisation)
========== ========= ==================================================================================

Schema metadata: ``labelshift.soft_labels.version`` ("1"), ``labelshift.soft_labels.classes`` (JSON list of
the class names, index = trainId). A student trains on the distribution renormalised over the top-k
(:func:`soft_target`).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import cv2
import numpy as np
import torch

from labelshift.adjust import LocalIA
from labelshift.atomic import atomic_path, write_json_atomic
from labelshift.classes import IGNORE_INDEX, ClassSet
from labelshift.data.chunks import decode_chunk, plan_chunks
from labelshift.data.io import write_png_atomic
from labelshift.inference import predict
from labelshift.models import align_corners_of, upsample_logits

SOFT_LABEL_VERSION = 1
VERSION_KEY, CLASSES_KEY = b"labelshift.soft_labels.version", b"labelshift.soft_labels.classes"
LABEL_FORMATS = ("trainids", "labelids", "color")
LABELS, CONFIDENCE, SOFT = "labels", "confidence", "soft"
IMAGE_PRIORS = "priors"  # adjust.mode local: <stem>.json, the per-image prior the teacher's IA used
LABEL_MANIFEST = "pseudo.json"  # a labelling pass's manifest, beside its directories
LABEL_RECORD = "labelling.json"  # a standalone pass's record of what determines its files, written when it starts


class OutputConflict(ValueError):
    """An output directory holds the files of another labelling pass (another checkpoint, settings or images)."""


@dataclass(frozen=True)
class SoftLabels:
    """One image's soft label: ``class_ids`` and ``probs`` uint8 (k, h, w) (rank order, ``probs`` = round(255·p)),
    ``kept_mass``: the mean top-k probability mass before quantisation."""

    name: str
    class_ids: np.ndarray
    probs: np.ndarray
    kept_mass: float


def encode_soft_labels(name: str, probabilities: torch.Tensor, k: int) -> SoftLabels:
    """probabilities: (K, h, w) softmax -> the top-``k`` ids and quantised probabilities."""
    top_probs, top_ids = probabilities.float().topk(min(k, probabilities.shape[0]), dim=0)
    quantised = torch.round(top_probs * 255.0).clamp_(0, 255).to(torch.uint8)
    return SoftLabels(name, top_ids.to(torch.uint8).cpu().numpy(), quantised.cpu().numpy(),
                      float(top_probs.sum(0).mean()))


def write_soft_labels(path: str | Path, soft: SoftLabels, class_names: tuple[str, ...]) -> None:
    """Write one image's soft label as a Parquet file (schema version 1, above), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    k, height, width = soft.class_ids.shape
    schema = pa.schema([("name", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("k", pa.int32()),
                        ("class_ids", pa.binary()), ("probs", pa.binary()), ("kept_mass", pa.float32())],
                       metadata={VERSION_KEY: str(SOFT_LABEL_VERSION).encode(),
                                 CLASSES_KEY: json.dumps(list(class_names)).encode()})
    table = pa.Table.from_pydict({
        "name": [soft.name], "height": [height], "width": [width], "k": [k],
        "class_ids": [np.ascontiguousarray(soft.class_ids).tobytes()],
        "probs": [np.ascontiguousarray(soft.probs).tobytes()], "kept_mass": [soft.kept_mass]}, schema=schema)
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd", use_dictionary=False, write_statistics=False)


def read_soft_labels(path: str | Path) -> tuple[SoftLabels, tuple[str, ...]]:
    """One soft-label file -> (its :class:`SoftLabels`, the class names); another schema version raises."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    metadata = table.schema.metadata or {}
    version = metadata.get(VERSION_KEY, b"?").decode()
    if version != str(SOFT_LABEL_VERSION):
        raise ValueError(f"{path}: soft-label schema version {version}, this reader knows {SOFT_LABEL_VERSION}")
    row = table.to_pylist()[0]
    shape = (row["k"], row["height"], row["width"])
    soft = SoftLabels(row["name"], np.frombuffer(row["class_ids"], np.uint8).reshape(shape),
                      np.frombuffer(row["probs"], np.uint8).reshape(shape), float(row["kept_mass"]))
    return soft, tuple(json.loads(metadata[CLASSES_KEY]))


def soft_target(soft: SoftLabels, num_classes: int) -> np.ndarray:
    """(K, h, w) float32 target distribution: the dequantised top-k probabilities renormalised to sum to 1."""
    probs = soft.probs.astype(np.float32)
    total = probs.sum(0, keepdims=True)
    weights = np.where(total > 0, probs / np.maximum(total, 1.0), 0.0).astype(np.float32)
    target = np.zeros((num_classes, *soft.class_ids.shape[1:]), dtype=np.float32)
    rows, cols = np.indices(soft.class_ids.shape[1:])
    for rank in range(soft.class_ids.shape[0]):
        np.add.at(target, (soft.class_ids[rank].astype(np.int64), rows, cols), weights[rank])
    return target


@dataclass(frozen=True)
class TeacherSettings:
    """What a labelling pass computes and writes. ``label_format``: ``trainids`` | ``labelids`` (Cityscapes
    ids, 0 where ignored) | ``color``; a directory of None is not written (``label_dir="."``: the pass's root)."""

    class_set: ClassSet
    confidence_threshold: float = 0.0
    top_k: int = 3
    soft_grid: Literal["output", "input"] = "output"
    decide_at: Literal["input", "label"] = "input"
    label_format: str = "trainids"
    label_dir: str | None = LABELS
    confidence_dir: str | None = CONFIDENCE
    soft_dir: str | None = SOFT
    logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)
    prior_dir: str | None = None  # per-image IA (LocalIA): where each image's prior is recorded

    def output_dirs(self) -> list[str]:
        """The directories this pass writes (relative to its root)."""
        return [d for d in (self.label_dir, self.confidence_dir, self.soft_dir, self.prior_dir) if d]

    def files_of(self, name: str) -> list[str]:
        """The files (relative to the pass's directory) one image gets."""
        files = [f"{self.label_dir}/{name}.png"] if self.label_dir else []
        files += [f"{self.confidence_dir}/{name}.png"] if self.confidence_dir else []
        files += [f"{self.prior_dir}/{name}.json"] if self.prior_dir else []
        return files + ([f"{self.soft_dir}/{name}.parquet"] if self.soft_dir else [])


def _decide(logits: torch.Tensor, settings: TeacherSettings,
            image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """logits (1, K, h, w) adjusted -> (label uint8 (H, W) with 255 below the threshold, confidence uint8 (H, W))
    at ``image_size``; decided at the logits' size, resized to ``image_size`` with nearest neighbours."""
    top, labels = logits[0].max(0)
    confidence = (logits[0] - top).exp_().sum(0).reciprocal_()  # max softmax, without the (K, h, w) softmax
    labels[confidence < settings.confidence_threshold] = IGNORE_INDEX
    label = labels.to(torch.uint8).cpu().numpy()
    confidence_u8 = torch.round(confidence * 255.0).to(torch.uint8).cpu().numpy()
    if label.shape != tuple(image_size):
        size = (int(image_size[1]), int(image_size[0]))
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST_EXACT)
        confidence_u8 = cv2.resize(confidence_u8, size, interpolation=cv2.INTER_NEAREST_EXACT)
    return label, confidence_u8


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, chunk: dict, settings: TeacherSettings, device: torch.device,
                    amp_dtype: torch.dtype | None = None) -> dict:
    """The teacher's outputs for a decoded chunk (:func:`labelshift.data.chunks.decode_chunk`).

    Returns ``{"name": [B], "label": [uint8 (H, W)], "confidence": [uint8 (H, W)], "soft": [SoftLabels],
    "failed": chunk's failures}``: label and confidence at each image file's resolution, soft labels at the soft
    grid, all after the logit transform (IA) when one is set.
    """
    out = {"name": list(chunk["name"]), "label": [], "confidence": [], "soft": [], "prior": [],
           "failed": chunk["failed"]}
    if not out["name"]:
        return out
    images = torch.from_numpy(chunk["image"])
    grid = predict(model, images, None, device=device, amp_dtype=amp_dtype)  # (B, K, h, w) at the model's grid
    align, input_size = align_corners_of(model), tuple(images.shape[-2:])
    transform = settings.logit_transform or (lambda logits: logits)
    for row, name in enumerate(out["name"]):
        if isinstance(settings.logit_transform, LocalIA):  # one prior per image, estimated once at the model grid
            image_prior = settings.logit_transform.image_priors(grid[row: row + 1])
            out["prior"].append(image_prior.record(0))
            transform = functools.partial(settings.logit_transform.apply, priors=image_prior)
        image_size = tuple(int(v) for v in chunk["image_size"][row])
        decide_size = input_size if settings.decide_at == "input" else image_size
        decided = transform(upsample_logits(grid[row: row + 1], decide_size, align_corners=align))
        label, confidence = _decide(decided, settings, image_size)
        out["label"].append(label)
        out["confidence"].append(confidence)
        if settings.soft_dir:
            soft_logits = grid[row: row + 1] if settings.soft_grid == "output" else \
                upsample_logits(grid[row: row + 1], input_size, align_corners=align)
            out["soft"].append(encode_soft_labels(name, transform(soft_logits)[0].softmax(0), settings.top_k))
    return out


def _label_image(label: np.ndarray, settings: TeacherSettings) -> np.ndarray:
    if settings.label_format == "trainids":
        return label
    if settings.label_format == "labelids":
        lut = np.zeros(256, dtype=np.uint8)  # ignored pixels: Cityscapes id 0 (unlabeled)
        lut[: settings.class_set.num_classes] = settings.class_set.label_ids
        return lut[label]
    if settings.label_format == "color":
        return settings.class_set.colorize(label)
    raise ValueError(f"unknown label format {settings.label_format!r}; known: {list(LABEL_FORMATS)}")


def write_outputs(out_dir: str | Path, outputs: dict, settings: TeacherSettings) -> dict:
    """Write one chunk's outputs (atomic files, deterministic names); returns its counts."""
    out_dir = Path(out_dir)
    kept = total = 0
    for row, name in enumerate(outputs["name"]):
        label = outputs["label"][row]
        if settings.soft_dir:
            write_soft_labels(out_dir / settings.soft_dir / f"{name}.parquet", outputs["soft"][row],
                              settings.class_set.names)
        if settings.confidence_dir:
            write_png_atomic(out_dir / settings.confidence_dir / f"{name}.png", outputs["confidence"][row])
        if settings.label_dir:
            write_png_atomic(out_dir / settings.label_dir / f"{name}.png", _label_image(label, settings))
        if settings.prior_dir:
            write_json_atomic(out_dir / settings.prior_dir / f"{name}.json", outputs["prior"][row])
        kept += int(np.count_nonzero(label != IGNORE_INDEX))
        total += label.size
    priors = outputs.get("prior") or []
    return {"images": len(outputs["name"]), "kept_pixels": kept, "pixels": total,
            "kept_mass_sum": float(sum(soft.kept_mass for soft in outputs["soft"])), "failed": outputs["failed"],
            "prior_fallbacks": sum(record["fallback"] for record in priors),
            "prior_floored_images": sum(record["floored_classes"] > 0 for record in priors)}


def pseudo_settings(cfg, logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TeacherSettings:
    """The pseudo-label settings of an experiment (its ``pseudo:`` section), with IA when ``logit_transform``."""
    from labelshift.build import class_set_of

    pseudo = cfg.pseudo
    return TeacherSettings(class_set_of(cfg), confidence_threshold=pseudo.confidence_threshold, top_k=pseudo.top_k,
                           soft_grid=pseudo.soft_grid, decide_at=pseudo.decide_at,
                           soft_dir=SOFT if pseudo.soft else None, logit_transform=logit_transform,
                           prior_dir=IMAGE_PRIORS if isinstance(logit_transform, LocalIA) else None)


def prediction_settings(class_set: ClassSet, label_format: str,
                        logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TeacherSettings:
    """Batch prediction: one ``<stem>.png`` per image in ``label_format`` at the pass's root, nothing else."""
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"unknown label format {label_format!r}; known: {list(LABEL_FORMATS)}")
    return TeacherSettings(class_set, label_format=label_format, label_dir=".", confidence_dir=None, soft_dir=None,
                           logit_transform=logit_transform)


def remove_stale_temporaries(out_dir: str | Path) -> int:
    """Delete the temporary files a killed writer left (``.<name>.*.tmp``, never a finished output); returns
    how many."""
    stale = list(Path(out_dir).rglob(".*.tmp")) if Path(out_dir).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def missing_chunks(out_dir: str | Path, dataset, chunks: list[list[int]], settings: TeacherSettings) -> list[int]:
    """Indices of the chunks some image of which lacks an output file (a whole chunk is redone, so its batch,
    and every byte written, is the one of an uninterrupted run)."""
    out_dir = Path(out_dir)
    return [number for number, indices in enumerate(chunks)
            if any(not (out_dir / rel).is_file()
                   for index in indices for rel in settings.files_of(dataset.names[index]))]


def summarise(counts: list[dict]) -> dict:
    """The pass's counts from its chunks' counts: images, failures (by name), kept pixel fraction, mean kept
    soft-label mass."""
    images = sum(c["images"] for c in counts)
    failed = sorted((f for c in counts for f in c["failed"]), key=lambda f: f["name"])
    return {"images": images, "failures": len(failed), "failed": failed,
            "kept_pixel_fraction": sum(c["kept_pixels"] for c in counts) / max(sum(c["pixels"] for c in counts), 1),
            "soft_label_mean_kept_mass": sum(c["kept_mass_sum"] for c in counts) / max(images, 1),
            **{key: sum(c.get(key, 0) for c in counts) for key in ("prior_fallbacks", "prior_floored_images")}}


def label_split(model: torch.nn.Module, dataset, out_dir: str | Path, settings: TeacherSettings, *,
                device: torch.device, batch_size: int, amp_dtype: torch.dtype | None = None,
                threads: tuple[int, int] | None = None) -> dict:
    """The in-process labelling pass: every chunk of ``dataset`` that lacks an output is decoded, labelled and
    written under ``out_dir``; returns the counts of the chunks it ran (:func:`summarise`), ``chunks_run`` and
    ``chunks_total``. ``threads`` (decode, write): the Ray Data pass's stages on thread pools instead of Ray
    (decoding ahead of the model, which runs in this thread, writing behind it); the same files, byte for byte."""
    chunks = plan_chunks(len(dataset), batch_size)
    remove_stale_temporaries(out_dir)
    todo = missing_chunks(out_dir, dataset, chunks, settings)
    def decode(number: int) -> dict:
        return decode_chunk(dataset, chunks[number])

    def label(chunk: dict) -> dict:
        return teacher_outputs(model, chunk, settings, device, amp_dtype)

    def write(outputs: dict) -> dict:
        return write_outputs(out_dir, outputs, settings)

    counts = ([write(label(decode(number))) for number in todo] if threads is None
              else _pooled(decode, label, write, todo, *threads))
    return {**summarise(counts), "chunks_run": len(todo), "chunks_total": len(chunks)}


def _pooled(decode: Callable, label: Callable, write: Callable, todo: list, decode_threads: int,
            write_threads: int) -> list:
    """``write(label(decode(n)))`` for every ``n`` of ``todo``, in order: ``decode`` on a pool of
    ``decode_threads``, ``label`` here, ``write`` on a pool of ``write_threads``; at most twice a pool's threads
    wait at each hand-over."""
    from concurrent.futures import ThreadPoolExecutor

    counts, writes = [], collections.deque()
    with ThreadPoolExecutor(decode_threads) as decoders, ThreadPoolExecutor(write_threads) as writers:
        for chunk in _ahead(decoders, decode, todo, 2 * decode_threads):
            writes.append(writers.submit(write, label(chunk)))
            while len(writes) > 2 * write_threads:
                counts.append(writes.popleft().result())
        counts += [write.result() for write in writes]
    return counts


def _ahead(pool, function: Callable, items: list, depth: int):
    """``function`` over ``items`` on ``pool``, results in order, at most ``depth`` submitted ahead."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_label_manifest(out_dir: str | Path, cfg, checkpoint: str | Path, counts: dict, settings: TeacherSettings,
                         priors: dict | None = None, checkpoint_hash: str | None = None) -> Path:
    """``<out_dir>/pseudo.json``: the configuration, the teacher checkpoint and its sha256, the priors of its IA
    (None: raw logits), the settings, the soft-label schema version and the pass's counts and failures. With
    per-image IA (``adjust.mode: local``) each image's prior is in ``priors/<stem>.json`` (over the class set's
    classes, in order) and the counts hold ``prior_fallbacks`` and ``prior_floored_images``. ``checkpoint_hash``:
    the checkpoint's sha256 when the caller has it (else computed)."""
    from labelshift.config import dump_config
    from labelshift.models import checkpoint_sha256

    return write_json_atomic(Path(out_dir) / LABEL_MANIFEST, {
        "soft_label_schema_version": SOFT_LABEL_VERSION if settings.soft_dir else None,
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_hash or checkpoint_sha256(checkpoint), "priors": priors,
        "settings": _settings_record(settings), "counts": counts, "config": dump_config(cfg)})


def _settings_record(settings: TeacherSettings) -> dict:
    return {"confidence_threshold": settings.confidence_threshold, "top_k": settings.top_k,
            "soft_grid": settings.soft_grid, "decide_at": settings.decide_at, "label_format": settings.label_format,
            "directories": settings.output_dirs()}


def labelling_record(cfg, checkpoint: str | Path, image_names: list[str], settings: TeacherSettings,
                     priors: dict | None = None) -> dict:
    """What determines the files of a labelling pass (:data:`LABEL_RECORD`): the teacher's sha256, the settings,
    the IA (priors and ``adjust:`` settings; None without IA), the model and input settings, the batch size and
    precision of the forward pass, and the images (count and sha256 of their names in order)."""
    from labelshift.models import checkpoint_sha256

    with_ia = settings.logit_transform is not None
    record = {"checkpoint_sha256": checkpoint_sha256(checkpoint), "settings": _settings_record(settings),
              "priors": priors, "adjust": cfg.adjust.model_dump(mode="json") if with_ia else None,
              "model": cfg.model.model_dump(mode="json", exclude={"checkpoint"}),
              "input": {"class_set": cfg.data.class_set, "interpolation": cfg.data.interpolation,
                        "target_transform": cfg.data.target_transform and cfg.data.target_transform.model_dump(
                            mode="json")},
              "forward": {"batch_size": cfg.eval.batch_size, "amp_bf16": cfg.eval.amp_bf16},
              "images": {"count": len(image_names),
                         "names_sha256": hashlib.sha256("\n".join(image_names).encode()).hexdigest()}}
    return json.loads(json.dumps(record))  # as it reads back from the file (lists, not tuples)


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_differences(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every (dotted) key whose value differs between two labelling records."""
    old, new = _flatten(recorded), _flatten(current)
    return [f"{key}: {_shortened(old.get(key))} -> {_shortened(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _shortened(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 70 else text[:67] + "..."


def _pass_files(out_dir: Path, directories: list[str]) -> list[Path]:
    """The files a labelling pass writing ``directories`` (``"."``: PNGs at the root) may have left in
    ``out_dir``, its manifest included."""
    files = [path for path in (out_dir / LABEL_MANIFEST, out_dir / LABEL_RECORD) if path.is_file()]
    for directory in directories:
        found = out_dir.glob("*.png") if directory == "." else (out_dir / directory).rglob("*")
        files += [path for path in found if path.is_file()]
    return files


def claim_output_dir(out_dir: str | Path, record: dict, *, overwrite: bool = False) -> str:
    """Make ``out_dir`` the directory of the pass ``record`` describes (:func:`labelling_record`), writing the
    record before any output. Returns ``"new"`` (nothing there), ``"resume"`` (the same record: the pass redoes
    only the missing files) or ``"overwrite"`` (another pass's files deleted first, ``overwrite=True`` only).

    Raises :class:`OutputConflict` naming every difference when the directory holds another pass's files (a
    resume would mix them), or pass files without a record (written by no recorded pass: never deleted here).
    """
    out_dir = Path(out_dir)
    record_path = out_dir / LABEL_RECORD
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
    if recorded == record:
        return "resume"
    directories = sorted(set(record["settings"]["directories"]) | set((recorded or record)["settings"]["directories"]))
    existing = _pass_files(out_dir, directories)
    if recorded is None and existing:
        raise OutputConflict(f"{out_dir} already holds {len(existing)} labelling output file(s) (e.g. "
                             f"{existing[0].name}) but no {LABEL_RECORD} telling which teacher and settings wrote "
                             f"them; delete them or choose another output directory")
    if recorded is not None and not overwrite:
        raise OutputConflict(f"{out_dir} holds the outputs of another labelling pass; resuming would mix them. "
                             f"Recorded -> now: {'; '.join(record_differences(recorded, record))}. Re-run with "
                             f"--overwrite to delete them and start over, or choose another output directory")
    for path in existing:  # the manifest, the record and root PNGs; the directories go whole
        if path.parent == out_dir:
            path.unlink()
    for directory in directories:
        if directory != "." and (out_dir / directory).is_dir():
            shutil.rmtree(out_dir / directory)
    write_json_atomic(record_path, record)
    return "new" if recorded is None else "overwrite"
