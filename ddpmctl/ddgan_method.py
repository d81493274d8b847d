"""``train --method ddgan``: a denoising diffusion GAN (Xiao et al. 2022 Alg. 1; the official ``train_ddgan.py``)
as a training method (:class:`ddpmctl.method.Method`): its two networks, their optimisers, the alternating updates,
its metrics and the tensors a resume needs. The run folder, saves, resume, signals, the NaN policy, precision, DDP
of the generator and its EMA belong to the loop (:mod:`ddpmctl.loop`). The maths: :mod:`ddpmctl.ddgan`.

One iteration, on a batch x_0 of real images (docs/ddgan.md "The objective"):

1. **D step** (in ``forward_backward``). A true pair (x_{t-1}, x_t) ~ q; a fake x_{t-1}' ~ q(x_{t-1} | x_t,
   G(x_t, z, t)) from the frozen G; L_D = softplus(-D(real)) + softplus(D(fake)), plus R1 on the real pair every
   ``lazy_reg`` steps; one backward, D's gradients averaged over the ranks, and D's Adam step, unless the loss or
   the gradient is not finite on some rank (one host sync per step: D must not take such a step before G reads it).
2. **G step** (gradients in ``forward_backward``, the update in ``apply``). A fresh t, pair and z on the same
   images; L_G = softplus(-D(fake)) through the updated D, whose parameters take no gradient. A skipped D step
   makes the step's loss NaN, so the loop's --nan-policy judges the whole iteration.

Both learning rates follow a cosine from their base to ``lr_min`` over ``--max-steps`` (constant without it).

Determinism: every draw (the images' order and flips, then t, the pair's noises, the posterior's noise and z for
each half) is made for the GLOBAL batch from the run's CPU generator, and each rank takes its slice, so the draws
do not depend on how the batch is split, and a resume continues bit for bit from the generator's saved state. D's
gradients are averaged by an explicit all-reduce rather than DDP: its R1 term is a double backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddpmctl import distributed as dist_utils
from ddpmctl.batches import ImageBatches
from ddpmctl.build import build_model
from ddpmctl.config import CheckpointConfig, TrainConfig
from ddpmctl.data import ImageDataset
from ddpmctl.ddgan import (cosine_lr, ddgan_diffusion, discriminator_loss, generator_loss, posterior_sample,
                           q_sample_pair, r1_due, r1_penalty)
from ddpmctl.discriminator import PairDiscriminator
from ddpmctl.hardware import memory_format
from ddpmctl.method import Method, QuartileSums, Runtime, StepOutput
from ddpmctl.optim import clip_gradients, load_optimizer_state, optimizer_state_tensors
from ddpmctl.seeds import derive_seed

__all__ = ["DdganDraws", "DdganMethod"]

# Adam's (beta1, beta2) of the official recipe, for both networks.
ADAM_BETAS = (0.5, 0.9)
# State-file prefixes of the two optimizers' moments.
G_OPTIM, D_OPTIM = "optim.generator.", "optim.discriminator."
# Per-step metrics beside L_G, summed on the device: D's loss, R1, the mean logits, D's gradient norm.
D_METRICS = ("loss_d", "r1", "d_real", "d_fake", "grad_norm_d")


@dataclass(frozen=True)
class DdganDraws:
    """The random draws of one half-step (D or G): t [N], the pair's two noises and the posterior's noise
    [N, C, H, W], the latent z [N, nz]."""

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
        return cls(t, *noises, torch.randn((batch, nz), generator=generator))

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


class DdganMethod(Method):
    """G (``ddpmctl.unet`` with a latent; sampled, averaged by the loop's EMA, under DDP with torchrun) and D
    (``ddpmctl.discriminator``; its gradients averaged by :func:`ddpmctl.distributed.average_gradients`)."""

    ema_networks = ("generator",)
    syncs_every_step = True  # the D step reads its finiteness on the host
    nan_advice = "try lower --lr and --lr-d, a larger --r1-gamma, --grad-clip 1, or --nan-policy skip"

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, local_batch: int,
                 ckpt_config: CheckpointConfig, dataset: ImageDataset) -> None:
        if config.method != "ddgan" or None in (config.nz, config.lr, config.lr_d, config.lr_min):
            raise ValueError("DdganMethod needs a ddgan TrainConfig with its data defaults resolved")
        self.config, self.dist, self.device, self.local_batch = config, dist, dist.device, local_batch
        model = ckpt_config.model
        torch.manual_seed(config.seed)  # the same initial G and D on every rank
        self.layout = memory_format(self.device, training=True)
        self.generator = build_model(ckpt_config).to(self.device, memory_format=self.layout)
        self.discriminator = PairDiscriminator(model.in_channels, model.image_size, config.disc_channels or 32).to(
            self.device, memory_format=self.layout)
        torch.manual_seed(derive_seed(config.seed, dist.rank))
        self.diffusion = ddgan_diffusion(ckpt_config.diffusion.timesteps)
        self.g_params, self.d_params = list(self.generator.parameters()), list(self.discriminator.parameters())
        self.optimizer, self.d_optimizer = _adam(self.g_params, config.lr or 0.0), _adam(self.d_params,
                                                                                         config.lr_d or 0.0)
        self.shape = (model.in_channels, model.image_size, model.image_size)
        self.rng = torch.Generator().manual_seed(config.seed)
        lo = dist.rank * local_batch
        self.data = ImageBatches(dataset, self.rng, batch_size=config.batch_size or 1, flip=bool(config.flip),
                                 labels=False, device=self.device, rank_slice=slice(lo, lo + local_batch),
                                 layout=self.layout)
        self.generator_call: Callable[..., torch.Tensor] = self.generator
        self.autocast: torch.dtype | None = None
        self.grads_set_to_none = True
        # On-device sums: L_G, G's grad norm, L_G by t-quartile, and D's metrics.
        self.sums = QuartileSums(self.device, local_batch, D_METRICS)

    def networks(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def prepare(self, runtime: Runtime) -> None:
        self.generator_call = runtime.wrap(self.generator)
        self.grads_set_to_none = runtime.grads_set_to_none
        self.autocast = torch.bfloat16 if runtime.precision == "bf16" else None

    # ------------------------------------------------------------------------------------------------- step
    def _amp(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()

    def _set_learning_rates(self, step: int) -> None:
        c = self.config
        for optimizer, base in ((self.optimizer, c.lr or 0.0), (self.d_optimizer, c.lr_d or 0.0)):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(base, min(c.lr_min or 0.0, base), step, c.max_steps)

    def _fake(self, x_t: torch.Tensor, draws: DdganDraws, generator: Callable[..., torch.Tensor]) -> torch.Tensor:
        """x_{t-1}' ~ q(x_{t-1} | x_t, G(x_t, z, t)), the posterior in fp32."""
        with self._amp():
            pred_xstart = generator(x_t, draws.t, z=draws.z)
        return posterior_sample(self.diffusion, pred_xstart.float(), x_t, draws.t, draws.noise_post)

    def discriminator_step(self, x_start: torch.Tensor, draws: DdganDraws, step: int) -> dict[str, torch.Tensor]:
        """Update D on real pairs and fakes of the frozen G (see the module docstring); its metrics, and ``d_ok``."""
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
        self.d_optimizer.zero_grad(set_to_none=True)
        (loss + r1).backward()
        dist_utils.average_gradients(self.dist, self.d_params)
        norm = clip_gradients(self.d_params, c.grad_clip)
        bad = ~(torch.isfinite(loss) & torch.isfinite(r1) & torch.isfinite(norm))
        d_ok = dist_utils.all_reduce_max(self.dist, bad.float().reshape(1))[0] == 0
        if bool(d_ok):
            self.d_optimizer.step()
        return {"loss_d": loss.detach(), "r1": r1.detach(), "d_real": real.detach().mean(),
                "d_fake": fake.detach().mean(), "grad_norm_d": norm.detach(), "d_ok": d_ok}

    def generator_loss(self, x_start: torch.Tensor, draws: DdganDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """L_G through the (updated, frozen) D, backpropagated into G: (loss, per-sample loss)."""
        _, x_t = q_sample_pair(self.diffusion, x_start, draws.t, draws.noise_prev, draws.noise_step)
        self.discriminator.requires_grad_(False)
        try:
            fake_prev = self._fake(x_t, draws, self.generator_call)
            with self._amp():
                fake = self.discriminator(fake_prev, x_t, draws.t)
        finally:
            self.discriminator.requires_grad_(True)
        loss = generator_loss(fake)
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)
        loss.backward()
        return loss, F.softplus(-fake.detach())

    def forward_backward(self, step: int) -> StepOutput:
        """The D update, then G's loss and gradients; ``extra`` holds (L_G per sample, G's t, D's metrics)."""
        g, batch, T = self.rng, self.config.batch_size or 1, self.diffusion.num_timesteps
        x_start, _ = self.data.next()  # the global batch's order and flips from the run generator, then ours
        d_draws = DdganDraws.draw(g, batch, self.shape, T, self.config.nz or 1)
        g_draws = DdganDraws.draw(g, batch, self.shape, T, self.config.nz or 1)
        lo, hi = self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch
        self._set_learning_rates(step)
        d_metrics = self.discriminator_step(x_start, d_draws.slice(lo, hi, self.device, self.layout), step)
        g_local = g_draws.slice(lo, hi, self.device, self.layout)
        loss, per_sample = self.generator_loss(x_start, g_local)
        loss = torch.where(d_metrics["d_ok"], loss.detach(), torch.full_like(loss, float("nan")))
        return StepOutput(loss=loss, grad_norm=clip_gradients(self.g_params, self.config.grad_clip),
                          extra=(per_sample, g_local.t, d_metrics))

    def apply(self, out: StepOutput) -> None:
        self.optimizer.step()

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)

    # ---------------------------------------------------------------------------------------------- metrics
    def accumulate(self, out: StepOutput) -> None:
        per_sample, t, d_metrics = out.extra
        quartile = torch.clamp(t * 4 // self.diffusion.num_timesteps, max=3)
        self.sums.add(out.loss, out.grad_norm, per_sample, quartile, d_metrics)

    def log_record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """L_G (``loss``, and ``q1``..``q4`` by the quarter of the chain t is in, numbered as IDDPM training and
        eval-nll number them), D's terms, norms and rates."""
        return {**self.sums.record(reduce_sum), "lr": self.optimizer.param_groups[0]["lr"],
                "lr_d": self.d_optimizer.param_groups[0]["lr"]}

    # ------------------------------------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Both optimizers' moments, the data order and the run generator (the loop saves D's weights)."""
        tensors = {**optimizer_state_tensors(self.optimizer, G_OPTIM),
                   **optimizer_state_tensors(self.d_optimizer, D_OPTIM)}
        tensors.update(self.data.stream.state()[0])
        tensors["rng.generator"] = self.rng.get_state()
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return self.data.stream.state()[1]

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, tensors, G_OPTIM)
        load_optimizer_state(self.d_optimizer, tensors, D_OPTIM)
        self.rng.set_state(tensors["rng.generator"])
        self.data.stream.load(tensors, meta)
