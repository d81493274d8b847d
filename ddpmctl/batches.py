"""Training batches: dataset indices as consecutive random permutations from a run's generator, random flips, and
each rank's slice of the global batch, as images in [-1, 1] on the training device.

Every rank draws the GLOBAL batch's indices and flips from the same generator and takes its own slice, so the data
order does not depend on how many ranks share a batch, and the generator's state (saved with the run) resumes it
exactly. A method draws what else it needs (timesteps, noise) from the same generator after :meth:`next`.
"""

from __future__ import annotations

from typing import Any

import torch

from ddpmctl.data import ImageDataset

__all__ = ["ImageBatches", "IndexStream"]


class IndexStream:
    """Dataset indices as consecutive random permutations (a fresh one per epoch) from the run generator."""

    def __init__(self, num_items: int, generator: torch.Generator) -> None:
        self.num_items, self.generator = num_items, generator
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = 0
        self.epoch = 0

    def take(self, count: int) -> torch.Tensor:
        # A batch may straddle two epochs (or several, when the dataset is smaller than the batch).
        parts = []
        while count > 0:
            if self.pos >= self.perm.numel():
                self.perm = torch.randperm(self.num_items, generator=self.generator)
                self.pos, self.epoch = 0, self.epoch + 1
            n = min(count, self.perm.numel() - self.pos)
            parts.append(self.perm[self.pos:self.pos + n])
            self.pos, count = self.pos + n, count - n
        return torch.cat(parts)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) a resume restores with :meth:`load`."""
        return {"data.perm": self.perm.clone()}, {"epoch": self.epoch, "data_position": self.pos}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore :meth:`state` (ValueError when the saved order is not a permutation of the data)."""
        perm = tensors["data.perm"].to(torch.int64)
        drawn = perm.numel() > 0
        if drawn and (perm.shape != (self.num_items,)
                      or not torch.equal(torch.sort(perm).values, torch.arange(self.num_items))):
            raise ValueError(f"data.perm is not a permutation of the {self.num_items} images")
        self.perm = perm
        self.pos, self.epoch = int(meta["data_position"]), int(meta["epoch"])
        if self.pos > perm.numel():
            raise ValueError(f"data_position {self.pos} lies beyond the {perm.numel()} images of the epoch")


class ImageBatches:
    """Images of the global batch (indices from an :class:`IndexStream`, flips), this rank's slice of them."""

    def __init__(self, dataset: ImageDataset, generator: torch.Generator, *, batch_size: int, flip: bool,
                 labels: bool, device: torch.device, rank_slice: slice | None = None,
                 layout: torch.memory_format = torch.contiguous_format) -> None:
        self.generator, self.batch_size, self.flip = generator, batch_size, flip
        self.device, self.layout = device, layout
        self.slice = rank_slice or slice(0, batch_size)
        self.stream = IndexStream(len(dataset.images), generator)
        # uint8 [N, C, H, W]; on a GPU the whole set moves there once when it is small (no per-step copies).
        self.images = dataset.images
        self.labels = dataset.labels if labels else None
        if device.type == "cuda" and self.images.numel() <= 2**30:
            self.images = self.images.to(device)
            self.labels = self.labels.to(device) if self.labels is not None else None

    def next(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's images of the next global batch in [-1, 1], and the model kwargs (``y``: class labels)."""
        g, batch, lo, hi = self.generator, self.batch_size, self.slice.start, self.slice.stop
        # Draw for the whole global batch on every rank (same generator, same order), then slice.
        index = self.stream.take(batch)
        flips = torch.rand(batch, generator=g) < 0.5 if self.flip else None
        dev, nb = self.device, self.device.type == "cuda"
        local = index[lo:hi].to(self.images.device, non_blocking=nb)
        images = self.images[local]
        if flips is not None:
            images = torch.where(flips[lo:hi].to(images.device).view(-1, 1, 1, 1), images.flip(3), images)
        # The 8-bit grid mapped onto [-1, 1] exactly as images.uint8_to_model does.
        x_start = (images.to(dev, non_blocking=nb).float() / 127.5 - 1.0).contiguous(memory_format=self.layout)
        kwargs = {}
        if self.labels is not None:
            kwargs["y"] = self.labels[local].to(dev, non_blocking=nb)
        return x_start, kwargs
