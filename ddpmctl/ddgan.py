"""The maths of denoising diffusion GANs (Xiao, Kreis and Vahdat, ICLR 2022), on the core's GaussianDiffusion.

Notation (docs/ddgan.md "The chain"): a chain of T steps (2-8) from the discretised VP-SDE
(``ddpmctl.schedules.vp_sde_betas``); index k = 0..T-1 as everywhere in ddpmctl, x_{-1} = x_0 the data. The
generator G(x_k, z, k) predicts x_0', and p(x_{k-1} | x_k) = q(x_{k-1} | x_k, x_0') is the core's posterior
(``GaussianDiffusion.q_posterior_mean_variance``; its variance is 0 at k = 0, where it returns x_0' itself). The
discriminator D(x_{k-1}, x_k, k) tells true pairs (x_{k-1}, x_k) ~ q from generated ones.

Objective (paper eq. 6-7, the official ``train_ddgan.py``): the non-saturating GAN losses with softplus,
    L_D = E softplus(-D(real)) + E softplus(D(fake)),    L_G = E softplus(-D(fake)),
and the R1 penalty (Mescheder et al. 2018) on real pairs, gamma / 2 E ||grad_{x_{k-1}} D(x_{k-1}, x_k, k)||^2,
added every ``lazy`` D steps and NOT multiplied by ``lazy`` (the official code's lazy regularisation; StyleGAN2
scales it by the interval, DDGAN does not).

No I/O; torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddpmctl.diffusion import GaussianDiffusion
from ddpmctl.schedules import beta_schedule

__all__ = ["ddgan_diffusion", "q_sample_pair", "posterior_sample", "discriminator_loss", "generator_loss",
           "r1_penalty", "r1_due", "cosine_lr"]


def ddgan_diffusion(timesteps: int) -> GaussianDiffusion:
    """The DDGAN chain of ``timesteps`` steps: VP-SDE betas, x_0 prediction, the posterior as reverse step."""
    return GaussianDiffusion(beta_schedule("vp-sde", timesteps), mean_type="x0", var_type="fixed_small",
                             loss_type="mse")


def q_sample_pair(diffusion: GaussianDiffusion, x_start: torch.Tensor, t: torch.Tensor, noise_prev: torch.Tensor,
                  noise_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A true pair (x_{t-1}, x_t): x_{t-1} ~ q(x_{t-1} | x_0) (x_0 itself at t = 0), then one forward step
    x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise_step (DDPM eq. 2), so x_t ~ q(x_t | x_0) as well."""
    prev = diffusion.q_sample(x_start, (t - 1).clamp(min=0), noise_prev)
    prev = torch.where((t == 0).view(-1, *([1] * (x_start.dim() - 1))), x_start, prev)
    betas = diffusion.betas.to(x_start.device)[t].view(-1, *([1] * (x_start.dim() - 1)))
    x_t = (1.0 - betas).sqrt().to(x_start.dtype) * prev + betas.sqrt().to(x_start.dtype) * noise_step
    return prev, x_t


def posterior_sample(diffusion: GaussianDiffusion, pred_xstart: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
    """x_{t-1} ~ q(x_{t-1} | x_t, x_0') (IDDPM eq. 10-12): mean + sqrt(variance) noise; the mean x_0' at t = 0."""
    mean, variance, _ = diffusion.q_posterior_mean_variance(pred_xstart, x_t, t)
    return mean + variance.sqrt() * noise


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = mean softplus(-D(real)) + mean softplus(D(fake)) (the non-saturating GAN, Goodfellow et al. 2014)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = mean softplus(-D(fake)) = -mean log sigmoid(D(fake)): the non-saturating generator loss."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_input: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma / 2 * mean over the batch of ||d sum(D) / d x_real||^2 (Mescheder et al. 2018 eq. 9), with a graph
    so it can be backpropagated into D. ``real_input`` must require grad and have produced ``real_logits``."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_input, create_graph=True)
    # At least fp32: under bf16 autocast the gradient may come back in bf16.
    grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(dim=1).mean()


def r1_due(step: int, lazy: int) -> bool:
    """Whether the D update of 0-based ``step`` adds R1: every ``lazy`` steps, starting with the first."""
    return step % lazy == 0


def cosine_lr(base: float, final: float, step: int, total: int | None) -> float:
    """Cosine decay from ``base`` at step 0 to ``final`` at ``total`` (SGDR, Loshchilov and Hutter 2017, eq. 5;
    torch's CosineAnnealingLR); ``base`` throughout when there is no ``total``."""
    if total is None:
        return base
    progress = min(step, total) / total
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))
