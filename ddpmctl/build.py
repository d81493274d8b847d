"""Configs -> objects: the one place that turns a :class:`~ddpmctl.config.CheckpointConfig` into its network and
a :class:`~ddpmctl.config.DiffusionConfig` into its diffusion (``ddpmctl.config`` only describes them)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ddpmctl.config import CheckpointConfig, DiffusionConfig
from ddpmctl.diffusion import GaussianDiffusion
from ddpmctl.respace import respace
from ddpmctl.schedules import beta_schedule
from ddpmctl.unet import UNetModel

__all__ = ["build_diffusion", "build_model"]


def build_model(config: CheckpointConfig, *, device: torch.device | str | None = None) -> UNetModel:
    """The U-Net ``config`` describes, freshly initialised (on ``device``; "meta" gives shapes without memory).

    Its output has ``config.out_channels`` channels, its input ``config.network_in_channels`` (2C for a CLD score
    network), and it scales original indices by 1000 / T, with T the diffusion's full chain length (also for a
    respaced or student checkpoint; a CLD checkpoint's T is 1000, so its time t in [0, 1] enters as t * 1000).
    """
    with torch.device(device) if device is not None else nullcontext():
        return UNetModel(config.model, out_channels=config.out_channels, num_timesteps=config.diffusion.timesteps,
                         in_channels=config.network_in_channels)


def build_diffusion(config: DiffusionConfig) -> GaussianDiffusion:
    """The full-chain diffusion, respaced onto ``config.use_timesteps`` when that is set."""
    base = GaussianDiffusion(
        beta_schedule(config.schedule, config.timesteps),
        mean_type=config.mean_type,
        var_type=config.var_type,
        loss_type=config.loss_type,
    )
    if config.use_timesteps is None:
        return base
    return respace(base, set(config.use_timesteps))

