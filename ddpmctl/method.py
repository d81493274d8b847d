"""The contract between the training loop (:mod:`ddpmctl.loop`) and a training method.

A **method** is one objective with everything that is its own: its networks, their optimizers, how it draws a batch,
its loss and its update, its metrics, and the tensors it must save to continue bit for bit. The **loop** owns the
rest, the same for every method: the run folder and its saves (``--keep``), exact resume, Ctrl-C / SIGTERM, the NaN
policy, precision and autocast, DDP under torchrun, the metrics file, progress events, ``--max-steps`` /
``--max-time``, periodic work, and an EMA of each network the method names in :attr:`Method.ema_networks`.
(The split of EDM's ``training/loss.py`` objects, or of Lightning's ``training_step``.)

One step, as the loop drives it::

    out = method.forward_backward(step)      # this rank's share of the batch, losses, gradients; no update yet
    if the loss or gradient norm is not finite (checked at control steps, see loop.py):
        method.discard()                     # --nan-policy skip (stop raises instead)
    else:
        method.apply(out)                    # optimizer step(s), schedules, loss-aware samplers
        (the loop updates every EMA)
        method.accumulate(out)               # on-device metric sums, read back only at log steps

A method with two networks (a GAN: generator and discriminator) does both of its updates in ``forward_backward`` /
``apply`` as it needs, for example the discriminator's step inside ``forward_backward`` before the generator's
gradients; ``discard`` then only drops what is not yet applied. Lazy regularisation is the method's business: it
knows the step number.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ddpmctl.distributed import DistInfo

__all__ = ["Method", "QuartileSums", "Runtime", "StepOutput"]


@dataclass
class StepOutput:
    """What ``forward_backward`` hands back: the scalar loss and gradient norm the NaN policy checks (device tensors,
    read without a host sync), and whatever the method's own ``apply`` / ``accumulate`` need."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    extra: Any = None


@dataclass(frozen=True)
class Runtime:
    """Where and how the loop runs a method: device, ranks, precision (as resolved), and the network wrapper."""

    device: torch.device
    dist: DistInfo
    precision: str  # "fp32" | "bf16"
    wrap: Callable[[nn.Module], Callable[..., torch.Tensor]]  # DDP under torchrun, then autocast in ``precision``

    @property
    def grads_set_to_none(self) -> bool:
        """Under DDP the gradients are the all-reduce buckets themselves: zero them, never set them to None."""
        return not self.dist.distributed


class Method(ABC):
    """A training objective. Subclasses set the class attributes and implement the abstract methods.

    ``networks()`` names every network the method trains; the loop saves and restores their weights and keeps an
    EMA of those listed in ``ema_networks``. The first network is the sampled one (its EMA and raw weights are a
    run folder's ``ema_*`` and ``model_*`` checkpoints); the others' weights and EMAs live in the training state.
    """

    #: Networks (names in ``networks()``) the loop keeps an exponential moving average of.
    ema_networks: tuple[str, ...] = ()
    #: True when ``forward_backward`` already reads a device value every step: the loop then checks the NaN policy
    #: and stop requests every step too (otherwise, on a GPU, only at log and save steps).
    syncs_every_step: bool = False
    #: What the NaN-policy message suggests after "stopped, ...".
    nan_advice: str = "try a lower --lr, --grad-clip 1, or --nan-policy skip"

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Every trained network by name, the sampled one first (unwrapped: no DDP, no autocast)."""

    def prepare(self, runtime: Runtime) -> None:
        """Called once, after any resume and before the first step: wrap the networks with ``runtime.wrap``."""

    @abstractmethod
    def forward_backward(self, step: int) -> StepOutput:
        """Step ``step + 1`` (``step`` steps are done): draw this rank's share of the batch, compute the loss and
        its gradients. No optimizer step yet: the loop first applies the NaN policy."""

    @abstractmethod
    def apply(self, out: StepOutput) -> None:
        """Apply the gradients of a good step (optimizer steps, schedules); the loop updates the EMAs after it."""

    @abstractmethod
    def discard(self) -> None:
        """Drop the gradients of a step the NaN policy skips."""

    def accumulate(self, out: StepOutput) -> None:
        """Add an applied step to the method's on-device metric sums (no host sync)."""

    def log_record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """The metrics of the steps since the last log (``reduce_sum`` sums a tensor over the ranks), then zero the
        sums. The loop adds step, img/s, elapsed, nan_skips and precision around it."""
        return {}

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a resume needs besides the networks and EMAs (optimizer moments, data order, the method's RNG):
        contiguous CPU tensors. Every rank calls it; rank 0's are saved."""

    def state_meta(self) -> dict[str, Any]:
        """JSON-able values a resume needs (saved beside the tensors)."""
        return {}

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what ``state_tensors`` and ``state_meta`` returned (KeyError / ValueError / RuntimeError when it
        does not fit: the loop turns them into one CheckpointError line)."""

    def describe_step(self, step: int) -> str:
        """How messages name step ``step`` (a distillation stage says which stage and iteration)."""
        return f"step {step}"


class QuartileSums:
    """A method's on-device metric sums between two log steps, read back only at log steps (no per-step sync):
    the loss, the gradient norm and the step count; the per-sample loss and count by quarter of the time range
    (``quartile`` 0..3, reported as q1..q4); and any ``extra`` named scalars, averaged per step."""

    def __init__(self, device: torch.device, local_batch: int, extra: tuple[str, ...] = ()) -> None:
        self.extra = extra
        # [loss, steps, grad norm, loss by quartile (4), counts (4), *extra].
        self.acc = torch.zeros(11 + len(extra), device=device)
        self.ones = torch.ones(local_batch, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, per_sample: torch.Tensor, quartile: torch.Tensor,
            extra: dict[str, torch.Tensor] | None = None) -> None:
        acc = self.acc
        acc[0] += loss
        acc[1] += 1
        acc[2] += grad_norm.detach()
        acc[3:7].index_add_(0, quartile, per_sample.float())
        acc[7:11].index_add_(0, quartile, self.ones)
        for i, name in enumerate(self.extra):
            acc[11 + i] += (extra or {})[name].float()

    def record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """loss, the extras, q1..q4 and grad_norm, as means over the steps (and ranks) since the last call; then
        zero the sums. The step count is summed over the ranks too, so the means are the global batch's."""
        acc = reduce_sum(self.acc).cpu().double()
        self.acc.zero_()
        n = max(float(acc[1]), 1.0)
        record: dict[str, Any] = {"loss": float(acc[0]) / n}
        record.update({name: float(acc[11 + i]) / n for i, name in enumerate(self.extra)})
        for q in range(4):
            count = float(acc[7 + q])
            record[f"q{q + 1}"] = float(acc[3 + q]) / count if count else None
        record["grad_norm"] = float(acc[2]) / n
        return record
