"""The knobs of the embedded world and their ranges, in one place that the config (validation when a config
is loaded) and the generator (``labelshift.data.world``) both read. Standard library only."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


SOURCE_LAYOUTS: tuple[str, ...] = ("gta5", "synthia")


@dataclass(frozen=True)
class WorldKnobs:
    """Every argument of :func:`generate_world` that shapes the world (recorded in ``world.json``)."""

    size: tuple[int, int] = (256, 128)
    seed: int = 0
    source_layout: str = "gta5"  # "gta5" (19 classes) or "synthia" (RAND_CITYSCAPES, the 16 SYNTHIA classes)
    num_source: int = 1000
    num_target_train: int = 300
    num_target_val: int = 100
    source_val_fraction: float = 0.15
    target_select_fraction: float = 0.2  # of target train: the labelled selection split (sweeps)
    presence_floor: float = 0.04
    label_shift: float = 1.0
    class_separation: float = 28.0
    instance_color_std: float = 10.0
    pixel_noise_std: float = 5.0
    target_instance_color_std: float = 12.0
    target_color_cast: float = 0.25
    target_blur_sigma: float = 0.5
    target_extra_noise_std: float = 3.0

    def validate(self) -> None:
        width, height = self.size
        if self.source_layout not in SOURCE_LAYOUTS:
            raise ValueError(f"source_layout must be one of {list(SOURCE_LAYOUTS)}, got {self.source_layout!r}")
        if width < 16 or height < 16:
            raise ValueError(f"world size must be at least 16x16 (width x height), got {width}x{height}")
        for name in ("num_source", "num_target_train", "num_target_val"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.source_val_fraction < 1.0:
            raise ValueError(f"source_val_fraction must be in [0, 1), got {self.source_val_fraction}")
        if not 0.0 <= self.target_select_fraction < 1.0:
            raise ValueError(f"target_select_fraction must be in [0, 1), got {self.target_select_fraction}")
        if not 0.0 <= self.presence_floor <= 1.0 or not 0.0 <= self.label_shift <= 1.0:
            raise ValueError("presence_floor and label_shift must be in [0, 1]")
        appearance = ("class_separation", "instance_color_std", "pixel_noise_std", "target_instance_color_std",
                      "target_color_cast", "target_blur_sigma", "target_extra_noise_std")
        negative = [name for name in appearance if getattr(self, name) < 0]
        if negative:
            raise ValueError(f"{', '.join(negative)} must be >= 0")


def make_knobs(**values: Any) -> WorldKnobs:
    """Validated :class:`WorldKnobs` from keyword values (numbers coerced to each field's type)."""
    defaults = WorldKnobs()
    unknown = sorted(set(values) - set(asdict(defaults)))
    if unknown:
        raise TypeError(f"unknown world knob(s) {unknown}; known: {sorted(asdict(defaults))}")
    coerced = {name: tuple(int(v) for v in value) if name == "size" else type(getattr(defaults, name))(value)
               for name, value in values.items()}
    knobs = replace(defaults, **coerced)
    knobs.validate()
    return knobs
