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


# One wording for every range check, whoever makes it (pydantic, typer, ddpmctl): "--steps must be at least 1".
_RANGE_WORDS = {"greater than or equal to": "at least", "greater than": "greater than",
                "less than or equal to": "at most", "less than": "less than"}
_PYDANTIC_RANGE = re.compile(r"^Input should be (greater than or equal to|greater than|less than or equal to|"
                             r"less than) (\S+)$")


def range_wording(message: str) -> str | None:
    """pydantic's 'Input should be greater than or equal to 1' as ddpmctl words it, 'must be at least 1' (None for
    any other message)."""
    match = _PYDANTIC_RANGE.match(message.strip().rstrip("."))
    return None if match is None else f"must be {_RANGE_WORDS[match.group(1)]} {match.group(2)}"


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
    loc = tuple(first.get("loc") or ())
    place = where(loc) if where is not None else ".".join(str(part) for part in loc)
    ranged = range_wording(message)
    if ranged is not None:
        shown = f", not {value}" if show_input and isinstance(value, (int, float, str)) else ""
        return f"{place} {ranged}{shown}" if place else ranged + shown
    if show_input and value is not None and not isinstance(value, (dict, list, tuple)):
        message += f" (got {value!r})"
    return f"{place}: {message}" if place else message
