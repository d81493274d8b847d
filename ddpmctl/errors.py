"""Errors a user can act on. The CLI prints ``str(err)`` as one line and exits 1 (2 for an :class:`OptionError`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import ValidationError


class DdpmctlError(Exception):
    """Base class: a problem with the user's input, files or environment (not a bug)."""


class ConfigError(DdpmctlError):
    """An option or configuration value is invalid or inconsistent."""


class OptionError(ConfigError):
    """An option's value does not fit what it is used with (e.g. more steps than the checkpoint's chain has).

    The command line is what is wrong, so the CLI exits 2, like for a value of the wrong type.
    """


class DataError(DdpmctlError):
    """A dataset folder or image cannot be used."""


class CheckpointError(DdpmctlError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


class SamplerError(DdpmctlError):
    """A sampler cannot run with the given checkpoint, steps or options."""


class UnknownSamplerError(SamplerError):
    """No installed sampler plugin has the requested name."""


class FeaturesError(DdpmctlError):
    """A feature network for sample quality (its weights file, or images it cannot take) cannot be used."""


class TrainingError(DdpmctlError):
    """Training cannot continue (e.g. a non-finite loss)."""


def validation_problem(err: ValidationError, where: Callable[[tuple[str | int, ...]], str] | None = None, *,
                       show_input: bool = False) -> str:
    """The first problem pydantic found, as one line "where: what".

    ``where`` names the place from pydantic's location tuple (default: the dotted path; an empty name leaves only
    the message). The message loses pydantic's "Value error, " prefix and any line breaks; ``show_input`` appends
    the offending value when it is a plain one.
    """
    first = err.errors()[0]
    message = re.sub(r"^(Value|Assertion) error, ", "", " ".join(str(first.get("msg", "invalid value")).split()))
    value = first.get("input")
    if show_input and value is not None and not isinstance(value, (dict, list, tuple)):
        message += f" (got {value!r})"
    loc = tuple(first.get("loc") or ())
    place = where(loc) if where is not None else ".".join(str(part) for part in loc)
    return f"{place}: {message}" if place else message
