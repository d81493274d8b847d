"""ddpmctl: train, sample, evaluate and distill Improved-DDPM diffusion models on image folders.

The names in ``__all__`` are the public surface: a sampler plugin may import these and nothing else.
Heavy names load lazily, so ``import ddpmctl`` (and ``ddpmctl --version``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from ddpmctl.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DdpmctlError,
    SamplerError,
    TrainingError,
    UnknownSamplerError,
)

__version__ = "0.1.0"

_LAZY = {
    "beta_schedule": "ddpmctl.schedules",
    "GaussianDiffusion": "ddpmctl.diffusion",
    "respace": "ddpmctl.respace",
    "space_timesteps": "ddpmctl.respace",
    "CheckpointConfig": "ddpmctl.config",
    "DiffusionConfig": "ddpmctl.config",
    "ModelConfig": "ddpmctl.config",
    "StudentConfig": "ddpmctl.config",
    "LoadedCheckpoint": "ddpmctl.checkpoint",
    "load_checkpoint": "ddpmctl.checkpoint",
    "save_checkpoint": "ddpmctl.checkpoint",
    "Sampler": "ddpmctl.samplers",
    "SampleRNG": "ddpmctl.samplers",
    "StepInfo": "ddpmctl.samplers",
}

__all__ = [
    "__version__",
    "DdpmctlError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "SamplerError",
    "TrainingError",
    "UnknownSamplerError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ddpmctl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
