"""torch.distributed for training: process-group set-up from torchrun's environment, and the collectives train.py uses.

Under ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) :func:`setup` initialises the default process group
(gloo on CPU, nccl on CUDA); otherwise everything here degrades to the single-process case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ddpmctl.errors import ConfigError, TrainingError

# How long a collective waits for the other ranks before failing (rank 0 may be writing a big checkpoint meanwhile).
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "DDPMCTL_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistInfo:
    """Who this process is: rank, world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # True when setup() created the process group (and teardown() must destroy it).
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _timeout_s() -> float:
    """Collective timeout in seconds: env DDPMCTL_DIST_TIMEOUT, else 10 minutes."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"environment variable {TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def env_world_size() -> int:
    """The world size torchrun announces in WORLD_SIZE (1 outside torchrun)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def split_batch(global_batch: int, world_size: int) -> int:
    """Each rank's share of ``--batch-size`` (the global batch); ConfigError when it does not divide evenly."""
    if global_batch % world_size:
        raise ConfigError(f"--batch-size {global_batch} is the global batch and must divide evenly among "
                          f"{world_size} ranks: use a multiple of {world_size}")
    return global_batch // world_size


def cpu_threads_per_rank(local_ranks: int) -> int:
    """Torch threads for one of ``local_ranks`` processes on this machine: ``OMP_NUM_THREADS`` where set (the user's
    choice, or torchrun's default of 1), else the usable cores shared among the ranks (at least 1)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return max(1, _env_int("OMP_NUM_THREADS", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(local_ranks, 1))


def setup(device: torch.device, *, timeout_s: float | None = None) -> DistInfo:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA; one GPU per local rank).

    Collectives fail after ``timeout_s`` (default: env DDPMCTL_DIST_TIMEOUT, else 600 s) instead of waiting forever
    for a rank that died.
    """
    if timeout_s is None:
        timeout_s = _timeout_s()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 and not dist.is_initialized():
        return DistInfo(device=device)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        # torchrun starts one process per GPU: each rank takes the GPU of its local rank.
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} wants cuda:{local_rank} but only {torch.cuda.device_count()} "
                              "GPU(s) are visible (use --nproc_per_node <= the GPU count)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        # The ranks on this machine share its cores: oversubscription costs far more than it gains.
        # (OMP_NUM_THREADS, where set, is the user's own split.)
        torch.set_num_threads(cpu_threads_per_rank(_env_int("LOCAL_WORLD_SIZE", world_size)))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, owns_group=owns)


def teardown(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` under DistributedDataParallel, its gradients living in DDP's all-reduce buckets.

    DDP lays each bucket view out with its parameter's strides (channels_last or contiguous, whichever the model
    has now) and warns "Grad strides do not match bucket view strides" when a fresh gradient's strides differ, which
    autograd allows in size-1 dimensions (a [C, C, 1] attention weight). Here every parameter gets a zero gradient
    before DDP is built, so with ``gradient_as_bucket_view`` DDP turns each one into its bucket view; backward then
    accumulates in place into the bucket (no copy, no stride check to fail) as long as the caller keeps the
    gradients: zero them with ``zero_grad(set_to_none=False)``, never set them to None.
    """
    from torch.nn.parallel import DistributedDataParallel

    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def _comm_device(info: DistInfo) -> torch.device:
    # nccl moves only CUDA tensors; gloo only CPU ones.
    return info.device if info.device.type == "cuda" else torch.device("cpu")


def _lost_rank(op: str, err: BaseException) -> TrainingError:
    """A collective that failed: almost always another rank died or hung (its own log says why)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[0][:200] if lines else type(err).__name__
    return TrainingError(f"rank {dist.get_rank() if dist.is_initialized() else '?'}: {op} with the other ranks "
                         f"failed, another rank probably died or hung (see its log): {detail}")


_COMM_WORDS = ("gloo", "nccl", "NCCL", "Connection", "connection", "timed out", "Timeout", "ProcessGroup")


def lost_rank_error(info: DistInfo, err: BaseException) -> TrainingError | None:
    """For a distributed run, the one-line error of a communication failure raised outside these helpers (DDP's
    gradient all-reduce, the loss-aware sampler's all-gather); None when ``err`` is something else."""
    if not info.distributed or not isinstance(err, RuntimeError):
        return None
    dist_error = getattr(dist, "DistError", None)
    if (dist_error is not None and isinstance(err, dist_error)) or any(w in str(err) for w in _COMM_WORDS):
        return _lost_rank("communication", err)
    return None


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        try:
            if info.device.type == "cuda":
                dist.barrier(device_ids=[info.device.index])
            else:
                dist.barrier()
        except RuntimeError as err:
            raise _lost_rank("barrier", err) from None


def all_reduce_max(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks of a small float tensor (stop/NaN flags every rank must agree on)."""
    return _all_reduce(info, values, dist.ReduceOp.MAX, torch.float32) if info.distributed else values


def all_reduce_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (metric accumulators); returns a new tensor on the input's device."""
    return _all_reduce(info, values, dist.ReduceOp.SUM) if info.distributed else values


def _all_reduce(info: DistInfo, values: torch.Tensor, op: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    buf = values.to(_comm_device(info), dtype).clone()
    try:
        dist.all_reduce(buf, op=op)
    except RuntimeError as err:
        raise _lost_rank("all_reduce", err) from None
    return buf.to(values.device)


def all_gather_bytes(info: DistInfo, data: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-sized uint8 CPU tensor (RNG states, parameter digests), in rank order."""
    if not info.distributed:
        return [data]
    local = data.to(_comm_device(info)).contiguous()
    gathered = [torch.empty_like(local) for _ in range(info.world_size)]
    try:
        dist.all_gather(gathered, local)
    except RuntimeError as err:
        raise _lost_rank("all_gather", err) from None
    return [g.cpu() for g in gathered]



def average_gradients(info: DistInfo, params: list[nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in one flat all-reduce (what DDP does, for a
    network DDP cannot wrap: one whose loss has a double backward, like a discriminator's R1 penalty)."""
    if not info.distributed:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    total = _all_reduce(info, flat, dist.ReduceOp.SUM) / info.world_size
    offset = 0
    for param in params:
        n = param.grad.numel()
        param.grad.copy_(total[offset:offset + n].view(param.grad.shape))  # copy_ keeps the gradient's layout
        offset += n
