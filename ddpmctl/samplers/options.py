"""Sampler options from the command line (``-O key=value``) and their description for ``ddpmctl samplers``."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import ValidationError

from ddpmctl.errors import SamplerError, validation_problem
from ddpmctl.samplers.contract import Sampler, SamplerOptions


_NONE_WORDS = ("none", "null")


def _accepts_none(annotation: Any) -> bool:
    return annotation is None or type(None) in typing.get_args(annotation)


def parse_options(cls: type[Sampler], items: Sequence[str]) -> SamplerOptions:
    """``["eta=0.5", "spacing=ddim"]`` -> ``cls.Options``; one-line SamplerError for anything wrong (-O)."""
    fields = cls.Options.model_fields
    known = ", ".join(fields) if fields else "none"
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SamplerError(f"option {item!r} must look like key=value (options of {cls.name}: {known})")
        if key not in fields:
            raise SamplerError(f"sampler {cls.name!r} has no option {key!r} (its options: {known})")
        if key in values:
            raise SamplerError(f"option {key!r} given twice")
        values[key] = value.strip()
    # "None" is how `ddpmctl samplers` shows an unset default: it means the same when typed, where None is allowed.
    parsed: dict[str, str | None] = {
        key: None if value.lower() in _NONE_WORDS and _accepts_none(fields[key].annotation) else value
        for key, value in values.items()}
    try:
        return cls.Options.model_validate(parsed)
    except ValidationError as err:
        def option(loc: tuple[str | int, ...]) -> str:
            if not loc:  # a check across options (e.g. a range's two ends): name them all
                return "options " + " ".join(f"{k}={v}" for k, v in values.items())
            key = str(loc[0])
            return f"option {key}={values.get(key, '')}"

        raise SamplerError(validation_problem(err, option)) from None


def describe_options(cls: type[Sampler]) -> list[dict[str, Any]]:
    """The options of a sampler as rows (name, type, default, description) for ``ddpmctl samplers``."""
    rows = []
    for key, info in cls.Options.model_fields.items():
        annotation = info.annotation
        if getattr(annotation, "__origin__", None) is Literal:
            type_name = "|".join(str(a) for a in annotation.__args__)
        else:
            type_name = getattr(annotation, "__name__", str(annotation))
        rows.append({"name": key, "type": type_name, "default": info.get_default(call_default_factory=True),
                     "description": info.description or ""})
    return rows
