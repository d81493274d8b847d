"""Errors a user can act on. The CLI prints ``str(err)`` as one line and exits 1 (2 for an :class:`OptionError`)."""

from __future__ import annotations


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


class TrainingError(DdpmctlError):
    """Training cannot continue (e.g. a non-finite loss)."""
