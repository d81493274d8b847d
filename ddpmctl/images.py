"""Images at the I/O boundary: uint8 <-> model range [-1, 1], PNG files, grids and npz batches (atomic writes)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

from ddpmctl.fileio import atomic_write

__all__ = ["uint8_to_model", "model_to_uint8", "save_png", "make_grid", "save_grid", "save_npz"]


def uint8_to_model(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] on the 8-bit grid: x / 127.5 - 1 (improved-diffusion's scaling)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"uint8_to_model expects a uint8 tensor, got {x_uint8.dtype}")
    return x_uint8.to(torch.float32) / 127.5 - 1.0


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range floats -> uint8: ((x + 1) * 127.5).round().clamp(0, 255) (the reference's sample conversion).

    NaN maps to 0 so a diverged model yields black pixels rather than undefined casts.
    """
    pixels = ((x.detach().to(torch.float32) + 1.0) * 127.5).round()
    pixels = torch.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0)
    return pixels.clamp(0, 255).to(torch.uint8)


def _check_uint8_images(images: torch.Tensor, ndim: int, what: str) -> None:
    """Reject anything but uint8 tensors with 1 or 3 channels in the given layout (a caller bug, not user input)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"{what} expects a uint8 torch.Tensor, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != ndim or images.shape[-3] not in (1, 3):
        layout = "CHW" if ndim == 3 else "NCHW"
        raise ValueError(f"{what} expects {layout} with 1 or 3 channels, got shape {tuple(images.shape)}")


def _to_pil(img_chw: torch.Tensor) -> Image.Image:
    """CHW uint8 tensor -> PIL image in mode L (1 channel) or RGB (3 channels)."""
    hwc = img_chw.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    if hwc.shape[2] == 1:
        return Image.fromarray(hwc[:, :, 0], mode="L")
    return Image.fromarray(hwc, mode="RGB")


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(file)`` atomically (``fileio.atomic_write``): never a half-written file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return atomic_write(path, fill)


def save_png(path: str | os.PathLike[str], img_uint8_chw: torch.Tensor) -> Path:
    """Write one uint8 CHW image (1 channel -> grayscale PNG, 3 -> RGB PNG) atomically; returns the path."""
    _check_uint8_images(img_uint8_chw, 3, "save_png")
    pil = _to_pil(img_uint8_chw)
    return _atomic_write(path, lambda f: pil.save(f, format="PNG"))


def make_grid(
    images_uint8_nchw: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0
) -> torch.Tensor:
    """Tile N images into one uint8 CHW image, ``nrow`` per row (default ceil(sqrt(N))), like torchvision's make_grid.

    Every cell, the outer border included, is surrounded by ``padding`` pixels of ``pad_value``:
    height = rows * (H + padding) + padding, width = nrow * (W + padding) + padding.
    """
    _check_uint8_images(images_uint8_nchw, 4, "make_grid")
    n, c, h, w = images_uint8_nchw.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    ncol = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol = min(ncol, n)
    rows = math.ceil(n / ncol)
    grid = torch.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, dtype=torch.uint8)
    src = images_uint8_nchw.detach().cpu()
    for i in range(n):
        top = (i // ncol) * (h + padding) + padding
        left = (i % ncol) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = src[i]
    return grid


def save_grid(path: str | os.PathLike[str], images_uint8_nchw: torch.Tensor, nrow: int | None = None) -> Path:
    """Write N uint8 NCHW images as one PNG grid (see :func:`make_grid`) atomically; returns the path."""
    return save_png(path, make_grid(images_uint8_nchw, nrow=nrow))


def save_npz(path: str | os.PathLike[str], images_uint8_nchw: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Write a batch as an .npz like improved-diffusion's image_sample.py, atomically; returns the path.

    Keys as the reference writes them: ``arr_0`` (the images once, uint8 NHWC, what its evaluators read) and, when
    labels are given, ``arr_1`` (int64 [N]). Only plain numeric arrays, uncompressed:
    ``np.load(path, allow_pickle=False)`` reads it.
    """
    _check_uint8_images(images_uint8_nchw, 4, "save_npz")
    nhwc = images_uint8_nchw.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    arrays: dict[str, np.ndarray] = {"arr_0": nhwc}
    if labels is not None:
        label_array = torch.as_tensor(labels).detach().cpu().to(torch.int64).numpy()
        if label_array.shape != (nhwc.shape[0],):
            raise ValueError(f"labels must have shape [{nhwc.shape[0]}], got {tuple(label_array.shape)}")
        arrays["arr_1"] = label_array
    return _atomic_write(path, lambda f: np.savez(f, **arrays))
