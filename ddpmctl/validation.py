"""Held-out loss (``train --val-every N``): the training objective on images the network never trains on.

Each held-out image gets one timestep and one noise draw, fixed for the whole run (a generator seeded once), so the
curve moves only with the weights. The timesteps are stratified over the chain (image i's t lies in the i-th of n
equal slices, the slices shuffled over the images): every part of the chain is represented at any n. The losses
are the training losses (``GaussianDiffusion.training_losses``: loss, mse, vb, per sample, unweighted), averaged
over the images, with the network in eval mode (no dropout) and no gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["HeldOutSet", "heldout_losses"]


class HeldOutSet:
    """Held-out images (uint8 NCHW), their labels, and the fixed (t, noise) of each, drawn once from ``seed``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, num_timesteps: int, *,
                 seed: int = 0) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError("held-out images must be a non-empty uint8 tensor [N, C, H, W]")
        n = images.shape[0]
        g = torch.Generator().manual_seed(seed)
        # Stratified: slice k of n covers [k T / n, (k + 1) T / n); a uniform point in it, slices shuffled.
        position = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
        strata = torch.floor(position * num_timesteps).to(torch.int64).clamp_(max=num_timesteps - 1)
        self.t = strata[torch.randperm(n, generator=g)]
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
