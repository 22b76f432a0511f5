"""The base of every settings model of the project: unknown keys rejected, values validated on assignment."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class StrictModel(BaseModel):
    """A settings section: unknown keys are an error, assignments are validated."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key, the file and the expectation."""
