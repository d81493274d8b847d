"""A small grid of samples from the network being trained (``train --preview-every N``): what the EMA weights
draw now, from the same noise at every preview, so successive grids show the training and nothing else.

The grid is sampled with DDIM (``min(50, T)`` steps by default, deterministic; a CLD model, whose config has a
``cld`` section, with its default sampler ``sscs`` on 50 steps) through the sampler driver, whose
noise comes from per-image generators seeded by (seed, i): the training's own random streams are never touched,
so a run with previews resumes bit for bit like one without.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ddpmctl import __version__
from ddpmctl.build import build_diffusion
from ddpmctl.checkpoint import LoadedCheckpoint
from ddpmctl.config import CheckpointConfig
from ddpmctl.images import make_grid, save_png
from ddpmctl.samplers import default_sampler, generate, get_sampler

__all__ = ["PREVIEW_SAMPLER", "preview_grid", "preview_name", "write_preview"]

PREVIEW_SAMPLER = "ddim"
PREVIEW_STEPS = 50


def preview_name(step: int) -> str:
    return f"preview_{step:06d}.png"


def preview_grid(network: nn.Module, config: CheckpointConfig, *, num: int = 16, seed: int = 0,
                 steps: int | None = None) -> torch.Tensor:
    """``num`` samples of ``network`` (eval mode, on its device) as one uint8 CHW grid; image i depends only on
    (seed, i) and the weights."""
    diffusion = build_diffusion(config.diffusion)
    cld = config.cld is not None
    # A CLD model is continuous in time: no chain caps its steps.
    chain = PREVIEW_STEPS if cld else diffusion.num_timesteps
    kind = "cld" if cld else "model"
    # The network in the shape the sampler driver takes; nothing is read from or written to disk.
    checkpoint = LoadedCheckpoint(path=Path("<training>"), config=config, kind=kind, lineage=[],
                                  created_with=__version__, model=network, diffusion=diffusion,
                                  num_parameters=sum(p.numel() for p in network.parameters()), sha256="")
    sampler = get_sampler(default_sampler(kind) if cld else PREVIEW_SAMPLER)()
    images, _ = generate(checkpoint, sampler, num=num, batch_size=num, seed=seed,
                         steps=min(PREVIEW_STEPS, chain) if steps is None else steps, output="uint8")
    return make_grid(images)


def write_preview(run_dir: str | os.PathLike[str], step: int, network: nn.Module, config: CheckpointConfig, *,
                  num: int = 16, seed: int = 0) -> Path:
    """The grid of :func:`preview_grid` as ``run_dir/preview_{step}.png`` (atomic)."""
    return save_png(Path(run_dir) / preview_name(step), preview_grid(network, config, num=num, seed=seed))
