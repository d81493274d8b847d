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
    OptionError,
    SamplerError,
    TrainingError,
    UnknownSamplerError,
)

__version__ = "0.1.0"

# public name -> (module, attribute). ``respace`` is exported as ``respace_diffusion``: the bare name would be
# shadowed by the ``ddpmctl.respace`` submodule once anything has imported it.
_LAZY: dict[str, tuple[str, str]] = {
    "beta_schedule": ("ddpmctl.schedules", "beta_schedule"),
    "build_diffusion": ("ddpmctl.build", "build_diffusion"),
    "build_model": ("ddpmctl.build", "build_model"),
    "GaussianDiffusion": ("ddpmctl.diffusion", "GaussianDiffusion"),
    "ddim_step": ("ddpmctl.diffusion", "ddim_step"),
    "respace_diffusion": ("ddpmctl.respace", "respace"),
    "space_timesteps": ("ddpmctl.respace", "space_timesteps"),
    "CheckpointConfig": ("ddpmctl.config", "CheckpointConfig"),
    "DiffusionConfig": ("ddpmctl.config", "DiffusionConfig"),
    "ModelConfig": ("ddpmctl.config", "ModelConfig"),
    "StudentConfig": ("ddpmctl.config", "StudentConfig"),
    "LoadedCheckpoint": ("ddpmctl.checkpoint", "LoadedCheckpoint"),
    "CheckpointInfo": ("ddpmctl.checkpoint", "CheckpointInfo"),
    "load_checkpoint": ("ddpmctl.checkpoint", "load_checkpoint"),
    "read_checkpoint_info": ("ddpmctl.checkpoint", "read_checkpoint_info"),
    "save_checkpoint": ("ddpmctl.checkpoint", "save_checkpoint"),
    "Sampler": ("ddpmctl.samplers", "Sampler"),
    "SamplerOptions": ("ddpmctl.samplers", "SamplerOptions"),
    "SampleRNG": ("ddpmctl.samplers", "SampleRNG"),
    "SampleProgress": ("ddpmctl.samplers", "SampleProgress"),
    "StepInfo": ("ddpmctl.samplers", "StepInfo"),
    "StepCallback": ("ddpmctl.samplers", "StepCallback"),
    "API_VERSION": ("ddpmctl.samplers", "API_VERSION"),
    "sampling_timesteps": ("ddpmctl.samplers", "sampling_timesteps"),
    "Denoiser": ("ddpmctl.denoiser", "Denoiser"),
    "Prediction": ("ddpmctl.denoiser", "Prediction"),
    "CLEAN": ("ddpmctl.denoiser", "CLEAN"),
    "CldProcess": ("ddpmctl.cld", "CldProcess"),
    "CldScore": ("ddpmctl.cld_score", "CldScore"),
    "cld_reverse_times": ("ddpmctl.cld", "reverse_times"),
    "available_samplers": ("ddpmctl.samplers", "available_samplers"),
    "get_sampler": ("ddpmctl.samplers", "get_sampler"),
    "choose_timesteps": ("ddpmctl.timesteps", "choose_timesteps"),
    "student_predict_xstart": ("ddpmctl.denoiser", "student_predict_xstart"),
}

__all__ = [
    "__version__",
    "DdpmctlError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "OptionError",
    "SamplerError",
    "TrainingError",
    "UnknownSamplerError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'ddpmctl' has no attribute {name!r}")
    module, attribute = target
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
