"""Held-out loss (``train --val-every N``): the training objective on images the network never trains on.

Each held-out image gets one timestep and one noise draw, fixed for the whole run (a generator seeded once), so the
curve moves only with the weights. The timesteps are stratified over the chain (image i's t lies in the i-th of n
equal slices, the slices shuffled over the images): every part of the chain is represented at any n. The losses
are the training losses (``GaussianDiffusion.training_losses``: loss, mse, vb, per sample, unweighted), averaged
over the images, with the network in eval mode (no dropout) and no gradients.

A CLD run (``CldHeldOutSet``, :func:`heldout_cld_losses`) does the same with its own draws: t stratified over
[t_min, 1] and the kernel's two noises, fixed for the run, and the run's hybrid score-matching loss (its weighting).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CldHeldOutSet", "HeldOutSet", "heldout_cld_losses", "heldout_losses"]


def _stratified(n: int, g: torch.Generator) -> torch.Tensor:
    """n points of [0, 1), point i uniform in the i-th of n equal slices, the slices shuffled (float64)."""
    position = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    return position[torch.randperm(n, generator=g)]


class HeldOutSet:
    """Held-out images (uint8 NCHW), their labels, and the fixed (t, noise) of each, drawn once from ``seed``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_timesteps: int, *,
                 seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError("held-out images must be a non-empty uint8 tensor [N, C, H, W]")
        n = images.shape[0]
        g = torch.Generator().manual_seed(seed)
        # Stratified: slice k of n covers [k T / n, (k + 1) T / n); a uniform point in it, slices shuffled.
        self.t = torch.floor(_stratified(n, g) * num_timesteps).to(torch.int64).clamp_(max=num_timesteps - 1)
        self.noise = torch.randn(images.shape, generator=g)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]


@torch.no_grad()
def heldout_losses(network: nn.Module, diffusion: Any, heldout: HeldOutSet, *, batch_size: int = 64,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean loss, mse and vb over the held-out set (float64 sums); the network is left in the mode it was in."""
    was_training = network.training
    network.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    try:
        for lo in range(0, len(heldout), batch_size):
            hi = min(lo + batch_size, len(heldout))
            x_start = (heldout.images[lo:hi].to(device).float() / 127.5 - 1.0)  # the 8-bit grid on [-1, 1]
            kwargs = {"y": heldout.labels[lo:hi].to(device)} if heldout.labels is not None else {}
            losses = diffusion.training_losses(network, x_start, heldout.t[lo:hi].to(device),
                                               noise=heldout.noise[lo:hi].to(device), model_kwargs=kwargs)
            for i, key in enumerate(("loss", "mse", "vb")):
                sums[i] += losses[key].detach().double().sum().cpu()
    finally:
        network.train(was_training)
    n = float(len(heldout))
    return {"val_loss": float(sums[0]) / n, "val_mse": float(sums[1]) / n, "val_vb": float(sums[2]) / n}


class CldHeldOutSet:
    """Held-out images (uint8 NCHW) of a CLD run and the fixed draws of each, from ``seed``: t stratified over
    [t_min, 1] (float64) and the kernel's noises for x and v."""

    def __init__(self, images: torch.Tensor, t_min: float, *, seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError("held-out images must be a non-empty uint8 tensor [N, C, H, W]")
        g = torch.Generator().manual_seed(seed)
        self.t = t_min + (1.0 - t_min) * _stratified(images.shape[0], g)
        self.noise_x = torch.randn(images.shape, generator=g)
        self.noise_v = torch.randn(images.shape, generator=g)
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]


@torch.no_grad()
def heldout_cld_losses(network: nn.Module, process: Any, weighting: str, heldout: CldHeldOutSet, *,
                       batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, float]:
    """The mean hybrid score-matching loss (``CldProcess.hsm_loss``, summed over dimensions as training reports
    it) over the held-out set, at its fixed draws; the network is left in the mode it was in."""
    from ddpmctl.cld_method import network_time  # (cld_method imports the training machinery)

    was_training = network.training
    network.eval()
    total = torch.zeros((), dtype=torch.float64)
    try:
        for lo in range(0, len(heldout), batch_size):
            hi = min(lo + batch_size, len(heldout))
            x_start = heldout.images[lo:hi].to(device).float() / 127.5 - 1.0  # the 8-bit grid on [-1, 1]
            t = heldout.t[lo:hi].to(device)
            noise_v = heldout.noise_v[lo:hi].to(device)
            x_t, v_t = process.perturb(x_start, t, heldout.noise_x[lo:hi].to(device), noise_v)
            output = network(torch.cat([x_t, v_t], dim=1), network_time(t))
            total += process.hsm_loss(output, v_t, t, noise_v, weighting).double().sum().cpu()
    finally:
        network.train(was_training)
    return {"val_loss": float(total) / len(heldout)}
