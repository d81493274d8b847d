"""Timestep samplers for training: uniform, and importance sampling by the loss's second moment (IDDPM Sec. 3.3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

SAMPLER_NAMES = ("uniform", "loss-second-moment")


class ScheduleSampler:
    """A distribution over a diffusion's steps; losses at a sampled t are weighted by 1/(T p_t) (unbiased)."""

    def __init__(self, diffusion: Any) -> None:
        self.diffusion = diffusion
        self.num_timesteps = int(diffusion.num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised positive float64 weights, one per step [T]."""
        raise NotImplementedError

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` steps with probability p = w / sum(w): (t int64 [B], weights float32 [B] = 1/(T p_t))."""
        w = self.weights()
        p = w / np.sum(w)
        p_t = torch.from_numpy(p)
        # Draw on the generator's device (CPU normally) so a seeded generator reproduces the batch exactly.
        gen_device = generator.device if generator is not None else torch.device("cpu")
        indices = torch.multinomial(p_t.to(gen_device), batch_size, replacement=True, generator=generator).cpu()
        weights = 1 / (len(p) * p_t[indices])
        return indices.to(device), weights.float().to(device)

    # Loss-aware samplers override these; a uniform sampler ignores losses and has no state.
    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Feed this rank's per-sample (t, loss) pairs; the uniform sampler ignores them."""

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Feed (t, loss) pairs from every rank; the uniform sampler ignores them."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that restore this sampler exactly (none for a stateless sampler)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class UniformSampler(ScheduleSampler):
    """t ~ Uniform{0..T-1}, every weight 1 (DDPM's L_simple)."""

    def __init__(self, diffusion: Any) -> None:
        super().__init__(diffusion)
        self._weights = np.ones([self.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        indices = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        return indices.to(device), torch.ones(batch_size, dtype=torch.float32, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler that adapts to observed losses; every rank must see the same losses to stay in sync."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Feed this rank's (t, loss) pairs; all-gathered across ranks when torch.distributed is initialised."""
        local_ts = local_ts.detach().reshape(-1)
        local_losses = local_losses.detach().reshape(-1)
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        device = local_ts.device
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local_ts.numel()], dtype=torch.int64, device=device))
        batch_sizes = [int(s.item()) for s in sizes]
        max_bs = max(batch_sizes)
        # all_gather needs equal shapes: pad every rank's batch to the largest one, then cut the padding off.
        pad_ts = torch.zeros(max_bs, dtype=local_ts.dtype, device=device)
        pad_ts[: local_ts.numel()] = local_ts
        pad_losses = torch.zeros(max_bs, dtype=local_losses.dtype, device=local_losses.device)
        pad_losses[: local_losses.numel()] = local_losses
        ts_batches = [torch.zeros_like(pad_ts) for _ in range(world)]
        loss_batches = [torch.zeros_like(pad_losses) for _ in range(world)]
        dist.all_gather(ts_batches, pad_ts)
        dist.all_gather(loss_batches, pad_losses)
        timesteps = [x for y, bs in zip(ts_batches, batch_sizes) for x in y[:bs].tolist()]
        losses = [x for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs].tolist()]
        self.update_with_all_losses(timesteps, losses)


class LossSecondMomentResampler(LossAwareSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history_per_term`` losses per step
    (docs/conventions.md #16)."""

    def __init__(self, diffusion: Any, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(diffusion)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._loss_history = np.zeros([self.num_timesteps, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([self.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        # Uniform until EVERY step has a full history, then sqrt of the mean squared loss, mixed with uniform.
        if not self._warmed_up():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # FIFO: shift out the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"loss_history", "loss_counts"}:
            raise ValueError(f"expected loss_history and loss_counts, got keys {sorted(state)}")
        history = state["loss_history"].detach().cpu().to(torch.float64).numpy()
        counts = state["loss_counts"].detach().cpu().to(torch.int64).numpy()
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"sampler state has shapes {history.shape} / {counts.shape}, expected "
                f"{self._loss_history.shape} / {self._loss_counts.shape} (a different T or history length)"
            )
        if (counts < 0).any() or (counts > self.history_per_term).any():
            raise ValueError(f"loss_counts must lie in 0..{self.history_per_term}")
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()


def create_named_schedule_sampler(name: str, diffusion: Any) -> ScheduleSampler:
    """The timestep sampler called ``name`` ("uniform" or "loss-second-moment") for ``diffusion``."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown timestep sampler {name!r}: choose one of {', '.join(SAMPLER_NAMES)}")
