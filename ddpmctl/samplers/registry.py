"""The registry of installed sampler plugins: entry points of the group ``ddpmctl.samplers`` (one entry point = one
class, its name = the CLI name), discovered once and cached; a plugin that fails to load or was written for another
version of the contract is recorded with its reason instead of breaking the others (xarray's
``backends/plugins.py``)."""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from ddpmctl.errors import SamplerError, UnknownSamplerError, validation_problem
from ddpmctl.samplers.contract import API_VERSION, Sampler

ENTRY_POINT_GROUP = "ddpmctl.samplers"


@dataclass(frozen=True)
class SamplerEntry:
    """One entry point of the ``ddpmctl.samplers`` group: the loaded class, or why it could not be used."""

    name: str
    value: str  # "module:Class" as registered
    package: str | None  # the distribution providing it (None for hand-made entry points)
    cls: type[Sampler] | None = None
    error: str | None = None
    incompatible: bool = False  # loads, but written for another version of the sampler API

    @property
    def ok(self) -> bool:
        return self.cls is not None


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the sampler group (tests replace this to fake plugins)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _package_of(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    try:
        return f"{dist.name} {dist.version}"
    except Exception:  # a half-broken distribution must not break discovery
        return None


def _load(ep: importlib.metadata.EntryPoint) -> SamplerEntry:
    """Import one entry point and check it is a proper Sampler; never raises."""
    base = {"name": ep.name, "value": ep.value, "package": _package_of(ep)}
    try:
        obj = ep.load()
    except Exception as err:  # any import-time failure of a third-party module is that plugin's problem only
        return SamplerEntry(**base, error=f"cannot import {ep.value}: {type(err).__name__}: {err}")
    if not (isinstance(obj, type) and issubclass(obj, Sampler)):
        return SamplerEntry(**base, error=f"{ep.value} is not a ddpmctl.Sampler subclass")
    if obj.api_version != API_VERSION:
        written = f"v{obj.api_version}" if obj.api_version is not None else "v1 (it sets no api_version)"
        return SamplerEntry(**base, incompatible=True,
                            error=f"{ep.value} is written for sampler API {written}; this ddpmctl needs "
                                  f"v{API_VERSION} (a sample(denoiser, x_T, timesteps, ...) loop): update the plugin")
    if obj.name != ep.name:
        return SamplerEntry(**base, error=f"{ep.value} calls itself {obj.name!r} but is registered as {ep.name!r}")
    if not (isinstance(obj.Options, type) and issubclass(obj.Options, BaseModel)):
        return SamplerEntry(**base, error=f"{ep.value}.Options is not a pydantic model")
    try:
        obj.Options()
    except ValidationError as err:
        return SamplerEntry(**base, error=f"{ep.value}.Options has options without defaults: "
                                          f"{validation_problem(err)}")
    return SamplerEntry(**base, cls=obj)


@functools.cache
def available_samplers() -> dict[str, SamplerEntry]:
    """Every entry point of the group, by name (sorted), loaded once; broken ones carry their error."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in _entry_points():
        same = found.setdefault(ep.name, [])
        # An editable install can list one entry point twice (source tree + site-packages): same value, keep one.
        if all(other.value != ep.value for other in same):
            same.append(ep)
    entries: dict[str, SamplerEntry] = {}
    for name in sorted(found):
        eps = found[name]
        if len(eps) > 1:
            where = ", ".join(f"{ep.value} ({_package_of(ep) or '?'})" for ep in eps)
            entries[name] = SamplerEntry(name=name, value=eps[0].value, package=_package_of(eps[0]),
                                         error=f"registered more than once: {where}")
        else:
            entries[name] = _load(eps[0])
    return entries


def reset_registry() -> None:
    """Forget the cached discovery (for tests and after installing a plugin in-process)."""
    available_samplers.cache_clear()


def get_sampler(name: str) -> type[Sampler]:
    """The sampler class registered as ``name``; UnknownSamplerError lists the installed ones."""
    entries = available_samplers()
    entry = entries.get(name)
    if entry is None:
        usable = sorted(n for n, e in entries.items() if e.ok)
        listing = ", ".join(usable) if usable else "none"
        raise UnknownSamplerError(f"unknown sampler {name!r}; installed samplers: {listing}")
    if entry.cls is None:
        state = "incompatible" if entry.incompatible else "broken"
        raise SamplerError(f"sampler {name!r} is installed but {state}: {entry.error}")
    return entry.cls


# The sampler `ddpmctl sample` uses when --sampler is left out, by checkpoint kind (checkpoint.KINDS). A new kind
# whose checkpoints only its own sampler can run adds itself here; every other kind samples with DEFAULT_SAMPLER.
DEFAULT_SAMPLER = "ddim"
SAMPLER_FOR_KIND: dict[str, str] = {"student": "student", "ddgan": "ddgan", "cld": "sscs"}


def default_sampler(kind: str) -> str:
    """The sampler name for a checkpoint of this kind when the user names none (SAMPLER_FOR_KIND, else ddim)."""
    return SAMPLER_FOR_KIND.get(kind, DEFAULT_SAMPLER)
