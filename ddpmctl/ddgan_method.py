"""Training a denoising diffusion GAN (Xiao et al. 2022 Alg. 1; the official ``train_ddgan.py``) as a method: its
two networks, their optimisers, the alternating updates and the tensors a resume needs. The run folder, saving,
resume, signals, the NaN policy, precision, metrics and the EMA of the generator belong to the training loop.

One iteration, on a batch x_0 of real images (the maths: ``ddpmctl.ddgan``):

1. **D step.** A true pair (x_{t-1}, x_t) ~ q; a fake x_{t-1}' ~ q(x_{t-1} | x_t, G(x_t, z, t)) with G frozen;
   L_D = softplus(-D(real)) + softplus(D(fake)), plus the R1 penalty on the real pair every ``lazy_reg`` steps;
   one backward, gradients averaged over the ranks, Adam step.
2. **G step.** A fresh t, pair and z on the same images; L_G = softplus(-D(fake)) through the updated D (whose
   parameters take no gradient); the loop then applies G's Adam step and its EMA.

Both learning rates follow a cosine from their base to ``lr_min`` over ``--max-steps`` (constant without it).

Determinism: every random draw (t, the pair's noises, z, the posterior's noise, for both halves) is made for the
GLOBAL batch from the run's CPU generator, and each rank takes its slice, so a run is independent of how the batch
is split and resumes bit for bit from the generator's saved state. The discriminator's gradients are averaged over
the ranks by an explicit all-reduce rather than DDP: its R1 term is a double backward, which DDP does not support.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ddpmctl import distributed as dist_utils
from ddpmctl.build import build_model
from ddpmctl.config import CheckpointConfig, TrainConfig
from ddpmctl.ddgan import (cosine_lr, ddgan_diffusion, discriminator_loss, generator_loss, posterior_sample,
                           q_sample_pair, r1_due, r1_penalty)
from ddpmctl.discriminator import PairDiscriminator
from ddpmctl.loop import clip_gradients, load_optimizer_state, optimizer_state_tensors

__all__ = ["DdganDraws", "DdganMethod", "DISC_WEIGHTS", "DISC_OPTIM"]

# State-file key prefixes of the discriminator (it lives only in the training state, never in a checkpoint).
DISC_WEIGHTS = "disc."
DISC_OPTIM = "disc_optim."
# Adam's (beta1, beta2) of the official recipe for both networks.
ADAM_BETAS = (0.5, 0.9)


@dataclass(frozen=True)
class DdganDraws:
    """The random draws of one half-step (D or G) for a batch: t [N], the pair's two noises and the posterior's
    noise [N, C, H, W], the latent z [N, nz]."""

    t: torch.Tensor
    noise_prev: torch.Tensor
    noise_step: torch.Tensor
    noise_post: torch.Tensor
    z: torch.Tensor

    @classmethod
    def draw(cls, generator: torch.Generator, batch: int, shape: tuple[int, ...], timesteps: int,
             nz: int) -> DdganDraws:
        """Draw for ``batch`` images of ``shape`` from ``generator`` (CPU), in a fixed order."""
        t = torch.randint(timesteps, (batch,), generator=generator)
        noises = [torch.randn((batch, *shape), generator=generator) for _ in range(3)]
        z = torch.randn((batch, nz), generator=generator)
        return cls(t, *noises, z)

    def slice(self, lo: int, hi: int, device: torch.device, layout: torch.memory_format) -> DdganDraws:
        """Rows lo..hi on ``device`` (images in ``layout``): one rank's share."""
        def image(x: torch.Tensor) -> torch.Tensor:
            return x[lo:hi].to(device).contiguous(memory_format=layout)

        return DdganDraws(self.t[lo:hi].to(device), image(self.noise_prev), image(self.noise_step),
                          image(self.noise_post), self.z[lo:hi].to(device))


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam (0.5, 0.9), fused where this torch/device supports it, else multi-tensor (foreach)."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, foreach=True)


class DdganMethod:
    """G (``ddpmctl.unet`` with a latent), D (``ddpmctl.discriminator``), their Adam optimisers and one iteration.

    ``generator`` is the network the loop saves, averages (EMA) and wraps for DDP (``generator_call``); the loop
    applies ``optimizer`` (G's) after :meth:`losses`. ``autocast`` is None (fp32) or torch.bfloat16.
    """

    def __init__(self, config: TrainConfig, ckpt_config: CheckpointConfig, dist: dist_utils.DistInfo,
                 layout: torch.memory_format) -> None:
        if config.method != "ddgan" or config.nz is None or config.lr is None or config.lr_d is None:
            raise ValueError("DdganMethod needs a ddgan TrainConfig with its data defaults resolved")
        self.config, self.dist, self.device, self.layout = config, dist, dist.device, layout
        model = ckpt_config.model
        self.generator = build_model(ckpt_config).to(self.device, memory_format=layout)
        self.discriminator = PairDiscriminator(model.in_channels, model.image_size,
                                               channels=config.disc_channels or 32).to(self.device,
                                                                                      memory_format=layout)
        self.diffusion = ddgan_diffusion(ckpt_config.diffusion.timesteps)
        self.optimizer = _adam(list(self.generator.parameters()), config.lr)
        self.disc_params = list(self.discriminator.parameters())
        self.disc_optimizer = _adam(self.disc_params, config.lr_d)
        self.generator_call: nn.Module = self.generator  # the loop may replace it with a DDP wrapper
        self.autocast: torch.dtype | None = None
        self.shape = (model.in_channels, model.image_size, model.image_size)

    # ------------------------------------------------------------------------------------------------- step
    def set_learning_rates(self, step: int) -> None:
        """Both rates on the cosine of ``step`` (0-based) over --max-steps."""
        c = self.config
        assert c.lr is not None and c.lr_d is not None and c.lr_min is not None
        for optimizer, base in ((self.optimizer, c.lr), (self.disc_optimizer, c.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(base, min(c.lr_min, base), step, c.max_steps)

    def _amp(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()

    def _fake(self, x_t: torch.Tensor, draws: DdganDraws, generator: nn.Module) -> torch.Tensor:
        """x_{t-1}' ~ q(x_{t-1} | x_t, G(x_t, z, t)), the posterior in fp32."""
        with self._amp():
            pred_xstart = generator(x_t, draws.t, z=draws.z)
        return posterior_sample(self.diffusion, pred_xstart.float(), x_t, draws.t, draws.noise_post)

    def discriminator_step(self, x_start: torch.Tensor, draws: DdganDraws, step: int) -> dict[str, torch.Tensor]:
        """Update D on real pairs and fakes of the frozen G; returns its loss terms and gradient norm (device
        tensors). A non-finite loss or gradient (on any rank) leaves D untouched; ``d_ok`` says which."""
        c = self.config
        x_prev, x_t = q_sample_pair(self.diffusion, x_start, draws.t, draws.noise_prev, draws.noise_step)
        regularise = r1_due(step, c.lazy_reg or 1) and (c.r1_gamma or 0.0) > 0
        x_prev.requires_grad_(regularise)
        with self._amp():
            real = self.discriminator(x_prev, x_t, draws.t)
        r1 = r1_penalty(real, x_prev, c.r1_gamma or 0.0) if regularise else torch.zeros((), device=self.device)
        with torch.no_grad():
            fake_prev = self._fake(x_t, draws, self.generator)
        with self._amp():
            fake = self.discriminator(fake_prev, x_t, draws.t)
        loss = discriminator_loss(real, fake)
        self.disc_optimizer.zero_grad(set_to_none=True)
        (loss + r1).backward()
        dist_utils.average_gradients(self.dist, self.disc_params)
        norm = clip_gradients(self.disc_params, c.grad_clip)
        bad = ~(torch.isfinite(loss) & torch.isfinite(r1) & torch.isfinite(norm))
        d_ok = dist_utils.all_reduce_max(self.dist, bad.float().reshape(1))[0] == 0
        if bool(d_ok):  # a host sync per step: D must not take a non-finite step before G reads it
            self.disc_optimizer.step()
        return {"loss_d": loss.detach(), "r1": r1.detach(), "d_real": real.detach().mean(),
                "d_fake": fake.detach().mean(), "grad_norm_d": norm.detach(), "d_ok": d_ok}

    def generator_losses(self, x_start: torch.Tensor, draws: DdganDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """G's non-saturating loss through the (updated, frozen) D, backpropagated into G: (loss, per-sample)."""
        _, x_t = q_sample_pair(self.diffusion, x_start, draws.t, draws.noise_prev, draws.noise_step)
        self.discriminator.requires_grad_(False)
        try:
            fake_prev = self._fake(x_t, draws, self.generator_call)
            with self._amp():
                fake = self.discriminator(fake_prev, x_t, draws.t)
        finally:
            self.discriminator.requires_grad_(True)
        per_sample = torch.nn.functional.softplus(-fake)
        loss = generator_loss(fake)
        self.optimizer.zero_grad(set_to_none=not self.dist.distributed)
        loss.backward()
        return loss, per_sample.detach()

    # ------------------------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """G's optimizer moments (``optim.*``), D's weights and optimizer moments (the loop adds its own)."""
        tensors = optimizer_state_tensors(self.optimizer)
        for name, value in self.discriminator.state_dict().items():
            tensors[DISC_WEIGHTS + name] = value.detach().cpu().contiguous()
        for key, value in optimizer_state_tensors(self.disc_optimizer).items():
            tensors[DISC_OPTIM + key] = value
        return tensors

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` (RuntimeError/KeyError when it does not fit these networks)."""
        load_optimizer_state(self.optimizer, tensors)
        disc = {k[len(DISC_WEIGHTS):]: v.to(self.device) for k, v in tensors.items() if k.startswith(DISC_WEIGHTS)}
        self.discriminator.load_state_dict(disc, strict=True)
        load_optimizer_state(self.disc_optimizer, {k[len(DISC_OPTIM):]: v for k, v in tensors.items()
                                                   if k.startswith(DISC_OPTIM)})
