"""Loading experiment configurations: YAML files (``extends:`` a base file), ``section.key=value`` overrides,
moved-key errors and error messages that name the key, the file, the expectation and the override.

``load_config(path, overrides=["train.source.iterations=100"])`` returns an :class:`ExperimentConfig`.
"""
from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from labelshift.config.base import ConfigError
from labelshift.config.sections import ExperimentConfig


# Keys that moved or went away: old dotted key -> (new dotted key or None, what to do). A config that still
# uses one gets an error naming the new place, so users' configs keep working after one edit.
MOVED_KEYS: dict[str, tuple[str | None, str]] = {
    "prior.kind": (None, "removed: the prior's kind (pixel or image) follows from prior.method"),
    "train.distill.confidence_threshold": ("pseudo.confidence_threshold", "moved to the pseudo: section"),
}
EXTENDS_KEY = "extends"  # a config file may name a base file (relative to itself) whose keys it overrides


_MISSING = object()


def _moved_key_errors(raw: dict) -> list[str]:
    errors = []
    for dotted, (new, what) in MOVED_KEYS.items():
        node: Any = raw
        for key in dotted.split("."):
            node = node.get(key, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            hint = f"; write it as {new}: {node!r}" if new else ""
            errors.append(f"  {dotted}: {what}{hint}")
    return errors


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} (for {source}): expected 'section.key=value'")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} (for {source}): {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = _parse_value(value)
    return raw


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The config model at ``loc`` (a pydantic error location) below :class:`ExperimentConfig`, if any."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation]
        if isinstance(field.annotation, types.UnionType) or typing.get_origin(field.annotation) is typing.Union:
            candidates = list(get_args(field.annotation))
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    return model


def _unknown_key_message(loc: tuple) -> str:
    section = _section_model(loc[:-1])
    if section is None:
        return "unknown key"
    fields = sorted(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key; expected one of {fields}{hint}"


def _format_errors(err: ValidationError, source: str, overrides: dict[str, str]) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = _unknown_key_message(e["loc"])
        elif not isinstance(e.get("input"), dict):  # a section's whole input says nothing
            message += f" (got {e.get('input')!r})"
        line = f"  {key}: {message}" if key else f"  {message}"
        origins = [item for dotted, item in overrides.items()
                   if not key or key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")]
        lines.append(line + (f" [from the override{'s' if len(origins) > 1 else ''} "
                             f"{', '.join(repr(o) for o in origins)}]" if origins else ""))
    return "\n".join(lines)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Validate a nested dict; ``overrides`` (already applied) are named in errors about the keys they set."""
    moved = _moved_key_errors(raw)
    if moved:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *moved]))
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        by_key = {item.split("=", 1)[0].strip(): item for item in overrides}
        raise ConfigError(_format_errors(err, source, by_key)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a key repeated in one mapping (``safe_load`` silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _merged(base: dict, override: dict) -> dict:
    """``override``'s keys over ``base``'s, section by section."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merged(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a YAML config file, with its ``extends:`` base file (relative to it) merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (extended by {_chain[-1]})" if _chain else ""))
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop(EXTENDS_KEY, None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in _chain or base_path == path.resolve():
        raise ConfigError(f"config file {path}: 'extends: {base}' makes a cycle")
    return _merged(read_config_file(base_path, (*_chain, path.resolve())), raw)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (and the base it ``extends``), apply ``section.key=value`` overrides and
    validate it."""
    path = Path(path)
    raw = read_config_file(path)
    apply_overrides(raw, overrides, str(path))
    return absolute_paths(config_from_dict(raw, str(path), overrides))


def absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """Relative filesystem paths resolved against ``base`` (default: the working directory), so that Ray
    workers, whose working directory differs, read and write the same files. List files stay relative to
    their dataset root; preset names and "imagenet" are not paths."""
    base = Path.cwd() if base is None else base
    def absolute(value: str | None) -> str | None:  # URIs (s3://, gs://, ...) are left as they are
        return None if value is None or "://" in value else str((base / value).resolve())

    cfg.output_dir = absolute(cfg.output_dir)
    for split in ("source", "source_val", "target", "target_val", "target_select"):
        dataset = getattr(cfg.data, split)
        if dataset is not None:
            dataset.root = absolute(dataset.root)
    cfg.model.checkpoint = absolute(cfg.model.checkpoint)
    if cfg.model.pretrained not in (None, "imagenet"):
        cfg.model.pretrained = absolute(cfg.model.pretrained)
    if cfg.train.distill.student_pretrained not in (None, "imagenet"):
        cfg.train.distill.student_pretrained = absolute(cfg.train.distill.student_pretrained)
    cfg.ray.storage_path = absolute(cfg.ray.storage_path)
    return cfg


def dump_config(cfg: ExperimentConfig) -> dict:
    """The resolved configuration as plain JSON-able data."""
    return cfg.model_dump(mode="json")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (for MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
