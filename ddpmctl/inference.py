"""How the network is called: in a precision (training, sampling, evaluation) and in micro-batches (sampling and
likelihood evaluation).

Samplers and eval-nll hand the network whatever batch the user asked for (64 images, or 256 (image, t) pairs).
On the CPU ``InferenceNetwork`` runs a call larger than about 2**22 values in its first-level feature map (64
images for benchmark config (a) of benchmarks/README.md, 32 for the CIFAR-10 model) in micro-batches of that size, so the memory of a
call stops growing with ``--batch-size`` (config (a), one batch of 256: peak RSS 1347 -> 768 MiB). The cap sits
where splitting costs nothing: with malloc tuned (ddpmctl.allocator), micro-batches of 16 or 32 images ran ~5%
slower than one call of 64 (``make bench`` times the split call against one call). It can also run the network
under bf16 autocast, handing back fp32 so the sampler's arithmetic stays in fp32.

Splitting changes an image only at float rounding (about 1e-6), exactly as ``--batch-size`` does: a call of
another size may take other kernel blockings. Its noise, and so what it shows, depends only on (seed, i).
"""

from __future__ import annotations

from typing import Any, Literal, Union, get_args

import torch
from torch import nn

from ddpmctl.choices import Precision

__all__ = ["AutocastModel", "InferenceNetwork", "Precision", "PRECISIONS", "MicroBatch", "default_micro_batch",
           "inference_network"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
# Images per network call: a number, None (the whole batch at once) or "auto" (default_micro_batch).
MicroBatch = Union[int, None, Literal["auto"]]  # noqa: UP007 - a runtime alias on Python 3.10

# Values in one micro-batch's full-resolution feature map (image_size^2 * model_channels * images): 16 MiB in fp32.
_CPU_MICRO_BATCH_VALUES = 2**22


class AutocastModel:
    """Calls the network under ``dtype`` autocast (None: as it is) and hands back fp32, so every loss and every
    sampler step is computed in fp32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None) -> None:
        self.module, self.dtype = module, dtype

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # (Any signature whose first argument is a tensor on the network's device: model(x, t), D(x_prev, x_t, t).)
        if self.dtype is None:
            return self.module(x, *args, **kwargs)
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.module(x, *args, **kwargs)
        return out.float()


def default_micro_batch(device: torch.device, image_size: int, model_channels: int) -> int | None:
    """Images per network call on ``device``: bounded on the CPU (see above), unlimited (None) elsewhere."""
    if device.type != "cpu":
        return None
    return max(1, _CPU_MICRO_BATCH_VALUES // max(1, image_size * image_size * model_channels))


class InferenceNetwork(nn.Module):
    """``model(x, t, **kwargs)`` in micro-batches of at most ``micro_batch`` images, optionally under bf16 autocast.

    The output is float32 whatever the precision. Keyword tensors whose first dimension is the batch (class
    labels ``y``) are split alongside ``x``; anything else is passed to every call unchanged.
    """

    def __init__(self, module: nn.Module, *, precision: Precision = "fp32", micro_batch: int | None = None) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, not {micro_batch}")
        self.module = module
        self.precision = precision
        self.micro_batch = micro_batch
        self._call = AutocastModel(module, torch.bfloat16 if precision == "bf16" else None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        size = self.micro_batch
        if size is None or n <= size:
            return self._call(x, t, **kwargs)
        outputs = []
        for start in range(0, n, size):
            stop = min(start + size, n)
            part = {key: value[start:stop] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n
                    else value for key, value in kwargs.items()}
            outputs.append(self._call(x[start:stop], t[start:stop], **part))
        return torch.cat(outputs)


def inference_network(model: nn.Module, device: torch.device, image_size: int, model_channels: int, *,
                      precision: Precision = "fp32", micro_batch: MicroBatch = "auto") -> InferenceNetwork:
    """``model`` wrapped for sampling or evaluation on ``device`` ("auto": :func:`default_micro_batch`)."""
    size = default_micro_batch(device, image_size, model_channels) if micro_batch == "auto" else micro_batch
    return InferenceNetwork(model, precision=precision, micro_batch=size)
