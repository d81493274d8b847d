"""Training data order: dataset indices as consecutive random permutations from a run's generator.

Every rank draws the GLOBAL batch's indices from the same generator and takes its own slice, so the data order does
not depend on how many ranks share a batch, and the generator's state (saved with the run) resumes it exactly.
"""

from __future__ import annotations

import torch

__all__ = ["IndexStream", "local_images"]


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


def local_images(images: torch.Tensor, local: torch.Tensor, flips: torch.Tensor | None, device: torch.device,
                 layout: torch.memory_format) -> torch.Tensor:
    """This rank's uint8 ``images[local]`` (flipped left-right where ``flips``) as model input in [-1, 1] on
    ``device`` in ``layout``: the 8-bit grid mapped onto [-1, 1] exactly as images.uint8_to_model does."""
    nb = device.type == "cuda"
    chosen = images[local]
    if flips is not None:
        chosen = torch.where(flips.to(chosen.device).view(-1, 1, 1, 1), chosen.flip(3), chosen)
    return (chosen.to(device, non_blocking=nb).float() / 127.5 - 1.0).contiguous(memory_format=layout)
