"""``train --method cld``: critically-damped Langevin diffusion trained by hybrid score matching (Dockhorn et al.
2022 Sec. 3.2; the official ``losses.py``) as a training method (:class:`ddpmctl.method.Method`): the score network,
its optimizer, the draws, the loss, metrics and resume state. The run folder, saves, resume, signals, the NaN
policy, precision, DDP and the EMA belong to the loop (:mod:`ddpmctl.loop`). The maths: :mod:`ddpmctl.cld`.

One step, on a batch x_0 of real images: t ~ U[t_min, 1] (float64), (x_t, v_t) from the kernel with v_0
marginalised, the network on (x_t, v_t) and t * 1000, and the loss of the chosen weighting summed over dimensions,
averaged over the batch (docs/cld.md "Training").

Determinism as for IDDPM training: every draw (the images' order and flips, t, the two noises) is made for the
GLOBAL batch from the run's CPU generator and each rank takes its slice; dropout uses the global torch RNG seeded
per rank; all of it is saved, so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ddpmctl import distributed as dist_utils
from ddpmctl.batches import ImageBatches
from ddpmctl.build import build_model
from ddpmctl.cld import CldProcess
from ddpmctl.config import CheckpointConfig, TrainConfig
from ddpmctl.data import ImageDataset
from ddpmctl.hardware import memory_format
from ddpmctl.method import Method, QuartileSums, Runtime, StepOutput
from ddpmctl.optim import adamw, clip_gradients, load_optimizer_state, optimizer_state_tensors
from ddpmctl.seeds import TRAIN_DROPOUT, derive_seed

__all__ = ["CldMethod", "cld_process", "network_time"]

# The network's time input is t * TIME_SCALE (CLD_DIFFUSION's T = 1000: the U-Net's embedding scale).
TIME_SCALE = 1000.0


def cld_process(config: CheckpointConfig) -> CldProcess:
    """The process a CLD checkpoint's config describes."""
    if config.cld is None:
        raise ValueError("not a CLD network: its config has no cld section")
    c = config.cld
    return CldProcess(mass=c.mass, beta=c.beta, gamma=c.gamma, numerical_eps=c.numerical_eps)


def network_time(t: torch.Tensor) -> torch.Tensor:
    """The network's time input for SDE times t [N]: t * 1000 in float32."""
    return (t.double() * TIME_SCALE).float()


class CldMethod(Method):
    """The CLD score network (the U-Net on 2C channels), AdamW, and the run's data and draws."""

    ema_networks = ("model",)

    def __init__(self, config: TrainConfig, dist: dist_utils.DistInfo, local_batch: int,
                 ckpt_config: CheckpointConfig, dataset: ImageDataset) -> None:
        if config.method != "cld" or ckpt_config.cld is None or config.cld_weighting is None or config.lr is None:
            raise ValueError("CldMethod needs a cld TrainConfig with its data defaults resolved")
        self.config, self.dist, self.device, self.local_batch = config, dist, dist.device, local_batch
        self.weighting = config.cld_weighting
        self.t_min = ckpt_config.cld.t_min
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.layout = memory_format(self.device, training=True)
        self.model = build_model(ckpt_config).to(self.device, memory_format=self.layout)
        torch.manual_seed(derive_seed(config.seed, TRAIN_DROPOUT, dist.rank))
        self.process = cld_process(ckpt_config)
        self.params = list(self.model.parameters())
        self.optimizer = adamw(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        lo = dist.rank * local_batch
        self.data = ImageBatches(dataset, self.generator, batch_size=config.batch_size or 1, flip=bool(config.flip),
                                 labels=False, device=self.device, rank_slice=slice(lo, lo + local_batch),
                                 layout=self.layout)
        self.model_call: Callable[..., torch.Tensor] = self.model
        self.grads_set_to_none = True
        self.sums = QuartileSums(self.device, local_batch)

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def prepare(self, runtime: Runtime) -> None:
        self.model_call = runtime.wrap(self.model)
        self.grads_set_to_none = runtime.grads_set_to_none

    def draws(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t [B] (float64, uniform on [t_min, 1]) and the kernel's two noises [B, *shape] for the global batch."""
        g, batch = self.generator, self.config.batch_size or 1
        t = torch.rand(batch, generator=g, dtype=torch.float64) * (1.0 - self.t_min) + self.t_min
        noise_x = torch.randn((batch, *shape), generator=g)
        noise_v = torch.randn((batch, *shape), generator=g)
        return t, noise_x, noise_v

    def losses(self, x_start: torch.Tensor, t: torch.Tensor, noise_x: torch.Tensor,
               noise_v: torch.Tensor) -> torch.Tensor:
        """Per-sample HSM losses of this rank's slice (``ddpmctl.cld.CldProcess.hsm_loss``)."""
        x_t, v_t = self.process.perturb(x_start, t, noise_x, noise_v)
        u_t = torch.cat([x_t, v_t], dim=1).contiguous(memory_format=self.layout)
        output = self.model_call(u_t, network_time(t))
        return self.process.hsm_loss(output, v_t, t, noise_v, self.weighting)

    def forward_backward(self, step: int) -> StepOutput:
        """Forward and backward on the next batch; ``extra`` holds (per-sample losses, t)."""
        x_start, _ = self.data.next()
        t, noise_x, noise_v = self.draws(tuple(x_start.shape[1:]))
        part, dev = self.data.slice, self.device
        t_local = t[part].to(dev)
        per_sample = self.losses(x_start, t_local, noise_x[part].to(dev), noise_v[part].to(dev))
        loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)
        loss.backward()
        return StepOutput(loss=loss.detach(), grad_norm=clip_gradients(self.params, self.config.grad_clip),
                          extra=(per_sample.detach(), t_local))

    def apply(self, out: StepOutput) -> None:
        self.optimizer.step()

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.grads_set_to_none)

    def accumulate(self, out: StepOutput) -> None:
        per_sample, t = out.extra
        self.sums.add(out.loss, out.grad_norm, per_sample, torch.clamp((t * 4).long(), max=3))

    def log_record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """The loss (summed over dimensions, as the official code reports it) and by quarter of [0, 1] that t is
        in (q1 nearest the data), the gradient norm and the learning rate."""
        return {**self.sums.record(reduce_sum), "lr": self.optimizer.param_groups[0]["lr"]}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = optimizer_state_tensors(self.optimizer)
        tensors.update(self.data.stream.state()[0])
        tensors["rng.generator"] = self.generator.get_state()
        return tensors

    def state_meta(self) -> dict[str, Any]:
        return self.data.stream.state()[1]

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, tensors)
        self.generator.set_state(tensors["rng.generator"])
        self.data.stream.load(tensors, meta)
