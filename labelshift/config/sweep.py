"""Sweep settings and their search spaces, keyed by config paths (``adjust.temperature``, ``prior.method``, ...).

A trial's setting is a mapping ``{config path: value}``; applied to the experiment config it gives the config of
that trial, and the best trial is exported as the same paths (:func:`overrides_of`), which ``ray_jobs/refine.py``
and the HTTP server read. Two spaces exist:

- ``ia``: Inference Adjustment over cached logits (no network runs in a trial): the ``adjust`` settings and
  ``prior.method`` (which of the estimate stage's priors IA uses; ``em`` and ``em_raw`` are EM with and without
  BCTS), and the per-image prior mode (``adjust.mode: local``) with its shrinkage ``adjust.local.kappa``, its
  estimator ``adjust.local.estimator`` and the other ``adjust.local`` numbers of :data:`IA_PATHS`.
- ``cr``: Classifier Refinement on Ray Train (``train.refine.*``: ``tau``, ``lr``, ...; and ``prior.method``).

The models here import only :mod:`labelshift.config.base` (the experiment config embeds :class:`SweepConfig`).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from labelshift.config.base import StrictModel

SPACES: tuple[str, ...] = ("ia", "cr")
IA_PATHS: tuple[str, ...] = ("adjust.space", "adjust.temperature", "adjust.tau_source", "adjust.tau_target",
                             "prior.method", "adjust.mode", "adjust.local.estimator", "adjust.local.kappa",
                             "adjust.local.effective_pixels", "adjust.local.floor",
                             "adjust.local.count_steps", "adjust.local.presence")
CR_PREFIX = "train.refine."
CR_PATHS: tuple[str, ...] = ("prior.method",)  # besides every train.refine.* key
LABEL_FREE_OBJECTIVES: tuple[str, ...] = ("expected_miou", "pseudo_miou", "em_loglik", "neg_entropy")
SELECT_METRIC = "select_miou"  # the labelled selection split's mIoU (percent): what sweeps maximise
# The paper's IA (T = τ = 1 with the reference estimator): the reference row of every IA sweep, and the default
# fallback of the guarded choice
PAPER_IA_SETTING: dict[str, Any] = {"adjust.space": "raw", "adjust.mode": "global", "adjust.temperature": 1.0,
                                    "adjust.tau_source": 1.0, "adjust.tau_target": 1.0, "prior.method": "reference"}


class ParameterSpec(StrictModel):
    """One searched config path: ``values`` (a grid in grid search, a choice otherwise), or a range ``low`` ..
    ``high`` (``log``: log-uniform) for random and Optuna search."""

    values: list[Any] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> "ParameterSpec":
        is_range = self.low is not None or self.high is not None
        if (self.values is None) == (not is_range):
            raise ValueError("give either values: [...] or a range low: / high:, not both")
        if is_range:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a range needs low < high, got low={self.low}, high={self.high}")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0, got {self.low}")
        elif self.log:
            raise ValueError("log: true applies to a range (low/high), not to values")
        return self

    def examples(self) -> list[Any]:
        """The values to validate against the experiment config: every value, or the range's ends."""
        return list(self.values) if self.values is not None else [self.low, self.high]


class SpaceConfig(StrictModel):
    """One search space: the parameters, the search algorithm and the trial budget.

    ``grid``: every combination of the parameters' ``values``, ``num_samples`` times. ``random`` and ``optuna``
    (the Optuna TPE sampler through Tune; needs ``pip install labelshift-seg[tune]``): ``num_samples`` trials.
    ``max_concurrent_trials``: unset (null), as many trials as the Ray cluster's CPUs hold (its CPUs divided by
    a trial's); keep it at 1 on a 2-CPU machine (concurrent trials with ASHA and MLflow were seen to hang there). CR trials evaluate the selection split every ``report_every`` steps; ASHA stops the
    weak ones after ``grace_period`` reports, keeping 1/``reduction_factor`` at each rung.
    """

    parameters: dict[str, ParameterSpec] = Field(min_length=1)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    report_every: int = Field(50, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _grid_has_values(self) -> "SpaceConfig":
        if self.search == "grid":
            ranged = [path for path, spec in self.parameters.items() if spec.values is None]
            if ranged:
                raise ValueError(f"grid search needs values: [...] for every parameter; {ranged} are ranges "
                                 "(use search: random or optuna for ranges)")
        return self

    def grid_size(self) -> int:
        """Trials of a grid search (every combination, ``num_samples`` times); for others ``num_samples``."""
        if self.search != "grid":
            return self.num_samples
        return self.num_samples * math.prod(len(spec.values or ()) for spec in self.parameters.values())


class SelectionRule(StrictModel):
    """How an IA sweep turns its trials into the chosen setting (README "Sweeps": every rule measured).

    ``objective``: ``labelled`` ranks trials by the selection-split mIoU; ``combined`` by its mean with the
    label-free objective (``sweep.label_free_objective``, an mIoU in percent) on the same images. ``guard_level``:
    the top trial replaces ``fallback`` only when it has the higher selection mIoU on at least this share of
    ``bootstrap`` paired resamples of the selection images (0: no guard, the top trial always wins). A selection
    split of a few dozen images has a standard error of ~2 mIoU points, more than the spread of the best settings:
    without the guard the choice is mostly noise. ``fallback``: config paths -> values (default: the paper's IA).
    """

    objective: Literal["labelled", "combined"] = "labelled"
    guard_level: float = Field(0.9, ge=0.0, lt=1.0)
    bootstrap: int = Field(1000, ge=10)
    fallback: dict[str, Any] = Field(default_factory=lambda: dict(PAPER_IA_SETTING))

    @model_validator(mode="after")
    def _fallback_paths(self) -> "SelectionRule":
        unknown = [path for path in self.fallback if path not in IA_PATHS]
        if unknown:
            raise ValueError(f"selection.fallback: {unknown} are not IA settings; allowed: {list(IA_PATHS)}")
        return self


class SweepConfig(StrictModel):
    """Sweeps of this experiment (``ray_jobs/sweep.py --space ia|cr``): one search space per kind, the label-free
    objective reported beside the labelled one, how the IA choice is made (``selection``), the searchers' seed, and
    where Tune keeps its trials (default ``<output_dir>/sweeps/ray``)."""

    ia: SpaceConfig | None = None
    cr: SpaceConfig | None = None
    label_free_objective: Literal["expected_miou", "pseudo_miou", "em_loglik", "neg_entropy"] = "expected_miou"
    selection: SelectionRule = SelectionRule()
    seed: int = 0
    storage_path: str | None = None

    @model_validator(mode="after")
    def _paths_of_each_space(self) -> "SweepConfig":
        if self.ia is not None:
            unknown = [path for path in self.ia.parameters if path not in IA_PATHS]
            if unknown:
                raise ValueError(f"ia: {unknown} cannot be swept over cached logits; searchable: {list(IA_PATHS)}")
        if self.cr is not None:
            unknown = [path for path in self.cr.parameters
                       if not (path.startswith(CR_PREFIX) or path in CR_PATHS)]
            if unknown:
                raise ValueError(f"cr: {unknown} are not Classifier Refinement settings; searchable: "
                                 f"{CR_PREFIX}* and {list(CR_PATHS)}")
        return self

    def space(self, name: str) -> SpaceConfig:
        """The search space ``name`` (``ia`` | ``cr``); a missing one raises ``ValueError``."""
        if name not in SPACES:
            raise ValueError(f"unknown sweep space {name!r}; expected one of {list(SPACES)}")
        found = getattr(self, name)
        if found is None:
            raise ValueError(f"the configuration has no sweep.{name} section (see configs/sweep_{name}.yaml)")
        return found


# ------------------------------------------------------------------------------------------ settings as config
def set_path(raw: dict, path: str, value: Any) -> dict:
    """Set ``a.b.c`` in a nested dict, in place (creating sections); returns ``raw``."""
    *sections, key = path.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    return raw


def with_setting(config_json: dict, setting: dict[str, Any]) -> dict:
    """A deep copy of a dumped experiment config with each ``path: value`` of ``setting`` set."""
    raw = copy.deepcopy(config_json)
    for path, value in setting.items():
        set_path(raw, path, value)
    return raw


def overrides_of(setting: dict[str, Any]) -> list[str]:
    """``["path=value", ...]`` in the order of ``setting`` (values written as YAML scalars)."""
    import yaml

    return [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for path, value in setting.items()]


def space_errors(config_json: dict, validate: Any) -> list[str]:
    """Errors of each swept value against the experiment config: ``validate(raw)`` (the config's own validation,
    raising ``ValidationError``/``ValueError``) runs on ``config_json`` with one value set at a time."""
    sweep = config_json.get("sweep") or {}
    base = {key: value for key, value in config_json.items() if key != "sweep"}
    errors = []
    for name in SPACES:
        space = sweep.get(name)
        if not space:
            continue
        for path, spec in space["parameters"].items():
            for value in ParameterSpec.model_validate(spec).examples():
                try:
                    validate(with_setting(base, {path: value}))
                except (ValidationError, ValueError) as err:
                    reason = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
                    errors.append(f"sweep.{name}.parameters.{path}: {value!r} is not a valid {path} ({reason})")
    return errors
