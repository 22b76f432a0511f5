"""Checkpoint I/O: our safetensors format, plain ``torch.save`` state dicts, and reference/FADA checkpoints.

Our format is a safetensors file holding the model's state dict (CPU, contiguous tensors) with JSON metadata
in the safetensors header (every value a JSON string; :func:`read_checkpoint_metadata` decodes it).
Nothing here ever unpickles code: ``torch.load`` always runs with ``weights_only=True``.

The reference (FADA) format is ``{"feature_extractor": sd, "classifier": sd, ...}``, keys possibly prefixed
``module.`` (DDP), frozen-BN buffers without ``num_batches_tracked``. It maps onto a model with ``backbone`` and
``head`` submodules: ``feature_extractor`` keys (already ``backbone.<resnet key>``) -> ``backbone.*``,
``classifier`` keys -> ``head.*``. Loading is strict; mismatches raise :class:`CheckpointError` with the names.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from labelshift.atomic import atomic_path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_KEY = "__format__"
FORMAT_VALUE = "labelshift.checkpoint/1"
FADA_KEYS = ("feature_extractor", "classifier")
_DDP_PREFIX = "module."
_NUM_BATCHES = "num_batches_tracked"
_LIST_LIMIT = 10
_UNPICKLER_DETAIL = ("WeightsUnpickler error:", "Trying to load", "Unsupported")

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


def checkpoint_sha256(path: PathLike) -> str:
    """Hex SHA-256 of the file's bytes (streamed; for manifests and provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, path: PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.state_dict()`` as safetensors with JSON ``metadata``, atomically (temp file + rename).

    ``metadata`` values must be JSON-serialisable (model name, class names, config, priors ...);
    ``model_name`` and ``num_classes`` are added from the model's attributes when not given.
    Returns the written path.
    """
    path = Path(path)
    header = _encode_metadata(model, metadata or {})
    tensors = _tensors_for_saving(model.state_dict())
    with atomic_path(path) as temporary:
        save_file(tensors, os.fspath(temporary), metadata=header)
    return path


def read_checkpoint_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata dict stored by :func:`save_checkpoint` (values JSON-decoded). Not ours -> CheckpointError."""
    if not _looks_like_safetensors(path):
        raise CheckpointError(f"{os.fspath(path)}: not a labelshift (safetensors) checkpoint")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{os.fspath(path)}: not a valid checkpoint ({type(exc).__name__}: {exc})") from exc
    return _decode_metadata(header, path)


def load_checkpoint(model: nn.Module, path: PathLike, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Load a checkpoint (ours, a plain state dict, or reference/FADA) into ``model``, strictly.

    ``class_names``: the configured class set; a checkpoint that records its classes (ours: ``classes`` in the
    metadata) must record exactly these, in this order, else :class:`CheckpointError` names both lists (a
    same-size mismatch, e.g. a 19-class model of another class order, would otherwise load silently).
    Returns the checkpoint's metadata: ours as saved; ``{"format": "state_dict"}`` or
    ``{"format": "fada", "extra_keys": [...]}`` (plus ``iteration`` when present) for the others.
    Raises :class:`CheckpointError` for unreadable files and for missing, unexpected or mis-shaped keys.
    """
    state, metadata, _ = read_state_dict(path)
    recorded = metadata.get("classes")
    if class_names is not None and recorded is not None and list(recorded) != list(class_names):
        raise CheckpointError(f"{os.fspath(path)}: the checkpoint was trained on the classes {list(recorded)}, "
                              f"but the configured class set is {list(class_names)}")
    load_state_dict_checked(model, state, source=os.fspath(path))
    return metadata


def read_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Read any supported checkpoint into ``(state_dict, metadata, format)`` with our key names.

    ``format`` is ``"labelshift"``, ``"state_dict"`` or ``"fada"``. ``module.`` prefixes are stripped.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise CheckpointError(f"{source}: no such checkpoint file")
    if _looks_like_safetensors(path):
        try:
            state = load_file(source, device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{source}: not a valid checkpoint ({type(exc).__name__}: {exc})") from exc
        return state, read_checkpoint_metadata(path), "labelshift"
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{source}: not a valid checkpoint ({_load_failure_reason(exc)})") from exc
    return _interpret_loaded(obj, source)


def _load_failure_reason(exc: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` failed, without torch's advice to disable it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, pickle.UnpicklingError):
        detail = next((line for line in lines if line.startswith(_UNPICKLER_DETAIL)), "")
        detail = detail.split("WeightsUnpickler error:", 1)[-1].split(". Please use", 1)[0].strip()
        return (f"rejected by the safe loader torch.load(weights_only=True): {detail or 'unsupported content'}; "
                "it holds objects other than tensors and plain containers, or is not a PyTorch file")
    return f"{type(exc).__name__}: {lines[0] if lines else 'unreadable'}"


def load_state_dict_checked(module: nn.Module, state: Mapping[str, Any], source: str = "state dict") -> None:
    """``module.load_state_dict(state, strict=True)`` with readable errors.

    ``num_batches_tracked`` buffers are lenient: missing ones keep the module's value, surplus ones are dropped
    (frozen BN has none). Any other missing/unexpected key or shape mismatch raises :class:`CheckpointError`.
    """
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not _is_num_batches(k)}
    for key, value in expected.items():
        if _is_num_batches(key) and key not in state:
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not match the model ({type(module).__name__}): "
            f"{_name_list(missing, 'missing')}; {_name_list(unexpected, 'unexpected')}"
        )
    _check_values(state, expected, source)
    module.load_state_dict(state, strict=True)


def _check_values(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], source: str) -> None:
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: values that are not tensors: {_name_list(not_tensors, 'key')}")
    mismatched = [
        f"{k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        shown = "; ".join(mismatched[:_LIST_LIMIT]) + ("; ..." if len(mismatched) > _LIST_LIMIT else "")
        raise CheckpointError(f"{source}: shape mismatch in {len(mismatched)} tensor(s): {shown}")


def _interpret_loaded(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Classify what ``torch.load`` returned: a FADA dict or a flat state dict of tensors."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: not a valid checkpoint (holds a {type(obj).__name__}, not a dict)")
    if all(key in obj for key in FADA_KEYS):
        return _from_fada(obj, source)
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return _strip_ddp(obj), {"format": "state_dict"}, "state_dict"
    keys = sorted(map(str, obj))[:_LIST_LIMIT]
    raise CheckpointError(
        f"{source}: not a valid checkpoint (neither a state dict of tensors nor a reference checkpoint with "
        f"'feature_extractor' and 'classifier'; top-level keys: {keys})"
    )


def _from_fada(obj: Mapping[str, Any], source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Map ``feature_extractor`` -> ``backbone.*`` and ``classifier`` -> ``head.*``."""
    state: dict[str, torch.Tensor] = {}
    for part, prefix in (("feature_extractor", "backbone."), ("classifier", "head.")):
        sub = obj[part]
        if not isinstance(sub, Mapping) or not all(isinstance(v, torch.Tensor) for v in sub.values()):
            raise CheckpointError(f"{source}: reference checkpoint entry {part!r} is not a state dict of tensors")
        for key, value in _strip_ddp(sub).items():  # classifier keys are never prefixed (the modified ASPP
            already = part == "feature_extractor" and key.startswith(prefix)  # has a submodule named "head")
            state[key if already else prefix + key] = value
    metadata: dict[str, Any] = {"format": "fada", "extra_keys": sorted(str(k) for k in obj if k not in FADA_KEYS)}
    if isinstance(obj.get("iteration"), int):
        metadata["iteration"] = obj["iteration"]
    return state, metadata, "fada"


def _strip_ddp(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k: v for k, v in state.items()}


def _is_num_batches(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _NUM_BATCHES


def _name_list(names: list[str], what: str) -> str:
    shown = ", ".join(names[:_LIST_LIMIT]) + (", ..." if len(names) > _LIST_LIMIT else "")
    return f"{len(names)} {what} key(s)" + (f" [{shown}]" if names else "")


def _looks_like_safetensors(path: PathLike) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then a JSON object."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise CheckpointError(f"{os.fspath(path)}: cannot read checkpoint ({exc})") from exc
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= header_len <= size - 8


def _encode_metadata(model: nn.Module, metadata: Mapping[str, Any]) -> dict[str, str]:
    merged: dict[str, Any] = {}
    for attr in ("model_name", "num_classes"):
        if getattr(model, attr, None) is not None:
            merged[attr] = getattr(model, attr)
    merged.update(metadata)
    header = {FORMAT_KEY: FORMAT_VALUE}
    for key, value in merged.items():
        if not isinstance(key, str) or key.startswith("__"):
            raise ValueError(f"metadata keys must be strings not starting with '__', got {key!r}")
        try:
            header[key] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata[{key!r}] is not JSON-serialisable: {exc}") from exc
    return header


def _decode_metadata(header: Mapping[str, str], path: PathLike) -> dict[str, Any]:
    if header.get(FORMAT_KEY) != FORMAT_VALUE:
        return {"format": "safetensors", **header}
    try:
        return {k: json.loads(v) for k, v in header.items() if k != FORMAT_KEY}
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{os.fspath(path)}: corrupt checkpoint metadata ({exc})") from exc


def _tensors_for_saving(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; tensors that share storage are cloned (safetensors refuses aliasing)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors
