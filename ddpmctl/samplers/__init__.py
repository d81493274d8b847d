"""Samplers: the plugin contract v2 (``contract``: base class, options, per-image RNG, step callback), the registry of
installed plugins (``registry``), option parsing (``options``) and the batching driver (``driver``); timestep
selection is ``ddpmctl.timesteps``. Every name is importable from here.

A sampler is one small class around one loop (k-diffusion's ``sample_*`` habit): the driver (:func:`generate`)
chooses the run's timesteps (:func:`sampling_timesteps`: even, the reference's ``ddim`` stride, logSNR-uniform,
or an explicit list) and builds a :class:`~ddpmctl.denoiser.Denoiser` (the network call, the chain's
alphas-bar, ``predict(x, t)``); the sampler receives the denoiser, the noise ``x_T``, the timesteps (original
indices, noisiest first; ``ddpmctl.denoiser`` names every index space), its per-image noise streams
(:class:`SampleRNG`) and a callback, and returns images in [-1, 1]. It never sees a checkpoint.

Plugins are registered under the entry-point group ``ddpmctl.samplers`` (one entry point = one class, its name =
the CLI name) and declare ``api_version = 2``; discovery is cached, and a plugin that fails to load or was written
for another version is recorded with its reason instead of breaking the others (xarray's ``backends/plugins.py``).
"""

from __future__ import annotations

from ddpmctl.samplers.contract import API_VERSION, Sampler, SampleRNG, SamplerOptions, StepCallback, StepInfo
from ddpmctl.samplers.driver import (
    SampleProgress,
    build_denoiser,
    check_sample_counts,
    draw_labels,
    generate,
    sampling_timesteps,
)
from ddpmctl.samplers.options import describe_options, parse_options
from ddpmctl.samplers.registry import (
    DEFAULT_SAMPLER,
    ENTRY_POINT_GROUP,
    SAMPLER_FOR_KIND,
    SamplerEntry,
    available_samplers,
    default_sampler,
    get_sampler,
    reset_registry,
)
from ddpmctl.timesteps import choose_timesteps, step_counts_with_ddim_stride

__all__ = ["API_VERSION", "DEFAULT_SAMPLER", "ENTRY_POINT_GROUP", "SAMPLER_FOR_KIND", "SampleProgress", "SampleRNG", "Sampler", "SamplerEntry",
           "SamplerOptions", "StepCallback", "StepInfo", "available_samplers", "build_denoiser",
           "check_sample_counts", "choose_timesteps", "default_sampler", "describe_options", "draw_labels", "generate", "get_sampler",
           "parse_options", "reset_registry", "sampling_timesteps", "step_counts_with_ddim_stride"]
