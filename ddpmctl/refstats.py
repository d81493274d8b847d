"""Reference statistics for sample quality: features of a reference set, computed once and cached.

A :class:`ReferenceStats` holds what the metrics need from the real images: their features (for KID and precision /
recall) and the mean and covariance (for the Frechet distance). They are cached as one safetensors file per
(image content, feature network): the key is the SHA-256 of the uint8 images (shape and bytes) and the network's
identity (name + weights hash), so a changed folder or other weights never reuse a stale entry.

Files ``--ref`` accepts besides images (:func:`load_reference_file`):
- ddpmctl's own statistics file (``format`` = ``ddpmctl-refstats/1``; written by :func:`save_reference`, also what
  the cache holds): features, mean, covariance, the network's identity and the images' shape;
- a pytorch-fid / TTUR-style ``.npz`` with ``mu`` and ``sigma`` (Inception pool_3 statistics): the Frechet distance
  only, since KID and precision / recall need the features themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpmctl.errors import CheckpointError, DataError, FeaturesError
from ddpmctl.features import FeatureExtractor
from ddpmctl.metrics import gaussian_stats

__all__ = ["CACHE_ENV", "REFSTATS_FORMAT", "ReferenceStats", "cache_dir", "images_sha256", "load_reference_file",
           "reference_from_images", "save_reference"]

REFSTATS_FORMAT = "ddpmctl-refstats/1"
CACHE_ENV = "DDPMCTL_CACHE_DIR"


@dataclass(frozen=True)
class ReferenceStats:
    """The reference side of the metrics. ``features`` is None for a mu/sigma-only file (Frechet distance only)."""

    network: str  # the feature network's identity ("digits-<sha>", "inception-<sha>"), or its bare name
    mu: torch.Tensor  # float64 [D]
    sigma: torch.Tensor  # float64 [D, D]
    num_images: int
    features: torch.Tensor | None = None  # float64 [N, D]
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the reference images, where known
    source: str = ""

    @property
    def network_name(self) -> str:
        return self.network.split("-", 1)[0]


def cache_dir() -> Path:
    """``$DDPMCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpmctl``, else ``~/.cache/ddpmctl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpmctl"


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of uint8 images: their shape, then their bytes in NCHW order."""
    digest = hashlib.sha256(json.dumps(list(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_reference(path: str | os.PathLike[str], stats: ReferenceStats) -> Path:
    """Write ``stats`` as ddpmctl's statistics file (safetensors, atomic)."""
    from ddpmctl.fileio import save_tensors

    tensors = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.features is not None:
        tensors["features"] = stats.features.to(torch.float32)  # float32 halves the file; stats stay float64
    metadata = {"format": REFSTATS_FORMAT, "network": stats.network, "num_images": str(stats.num_images),
                "image_shape": json.dumps(list(stats.image_shape) if stats.image_shape else None),
                "source": stats.source}
    return save_tensors(path, tensors, metadata, what="statistics file")


def _from_safetensors(path: Path) -> ReferenceStats:
    from ddpmctl.fileio import load_tensors

    try:
        tensors, metadata = load_tensors(path)
    except CheckpointError as err:
        raise DataError(f"{path} is not a statistics file: {err}") from None
    if metadata.get("format") != REFSTATS_FORMAT or "mu" not in tensors or "sigma" not in tensors:
        raise DataError(f"{path} is a safetensors file but not ddpmctl's statistics (format {REFSTATS_FORMAT})")
    shape = json.loads(metadata.get("image_shape") or "null")
    features = tensors.get("features")
    return _checked(path, ReferenceStats(
        network=metadata.get("network", ""), mu=tensors["mu"].to(torch.float64),
        sigma=tensors["sigma"].to(torch.float64), num_images=int(metadata.get("num_images", "0")),
        features=None if features is None else features.to(torch.float64),
        image_shape=tuple(shape) if shape else None, source=metadata.get("source", str(path))))


def _from_npz(path: Path) -> ReferenceStats:
    """A pytorch-fid / TTUR statistics file: ``mu`` [D] and ``sigma`` [D, D] (never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in ("mu", "sigma") if name in archive.files}
            names = list(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} cannot be read as an .npz of plain arrays: {' '.join(str(err).split())[:160]}") \
            from None
    if len(arrays) != 2:
        raise DataError(f"{path} holds {', '.join(names) or 'no arrays'}: a statistics .npz needs mu and sigma")
    mu, sigma = (torch.from_numpy(np.asarray(arrays[k], dtype=np.float64)) for k in ("mu", "sigma"))
    return _checked(path, ReferenceStats(network="inception", mu=mu, sigma=sigma, num_images=0, source=str(path)))


def _checked(path: Path, stats: ReferenceStats) -> ReferenceStats:
    d = stats.mu.shape[0] if stats.mu.ndim == 1 else -1
    if d < 1 or stats.sigma.shape != (d, d):
        raise DataError(f"{path}: mu must be [D] and sigma [D, D], got {tuple(stats.mu.shape)} and "
                        f"{tuple(stats.sigma.shape)}")
    if stats.features is not None and (stats.features.ndim != 2 or stats.features.shape[1] != d):
        raise DataError(f"{path}: features must be [N, {d}], got {tuple(stats.features.shape)}")
    if not (torch.isfinite(stats.mu).all() and torch.isfinite(stats.sigma).all()):
        raise DataError(f"{path}: mu or sigma holds NaN or infinite values")
    return stats


def load_reference_file(path: str | os.PathLike[str]) -> ReferenceStats:
    """ddpmctl's statistics file or a pytorch-fid ``mu``/``sigma`` ``.npz`` (see the module docstring)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    if head.startswith(b"PK"):
        return _from_npz(path)
    return _from_safetensors(path)


def check_network(stats: ReferenceStats, extractor: FeatureExtractor, where: str) -> None:
    """FeaturesError unless ``stats`` were computed with ``extractor``'s network (and, where known, its weights)."""
    if stats.network_name != extractor.name:
        raise FeaturesError(f"{where} holds {stats.network_name or 'unknown'} statistics but the features are "
                            f"{extractor.name}: use --features {stats.network_name or extractor.name}")
    if "-" in stats.network and stats.network != extractor.identity:
        raise FeaturesError(f"{where} was computed with other {extractor.name} weights ({stats.network}) than "
                            f"these ({extractor.identity})")
    if stats.mu.shape[0] != extractor.dims:
        raise FeaturesError(f"{where} has {stats.mu.shape[0]}-dimensional statistics but the {extractor.name} "
                            f"features have {extractor.dims}")


def reference_from_images(images: torch.Tensor, extractor: FeatureExtractor, *, source: str = "",
                          cache: bool = True, batch_size: int = 64,
                          callback: Callable[[int, int], None] | None = None) -> ReferenceStats:
    """Statistics of uint8 reference images under ``extractor``, from the cache when these exact images were seen.

    The images are first adapted to the network (``FeatureExtractor.adapt``); the cache key is computed on the
    images as given, so it does not depend on how they are converted.
    """
    key = f"{images_sha256(images)[:32]}-{extractor.identity}"
    path = cache_dir() / "refstats" / f"{key}.safetensors"
    if cache and path.is_file():
        try:
            stats = _from_safetensors(path)
            if stats.network == extractor.identity and stats.features is not None:
                return stats
        except DataError:
            pass  # a damaged cache entry is recomputed and replaced
    adapted, _ = extractor.adapt(images, "reference")
    features = extractor.extract(adapted, batch_size=batch_size, callback=callback)
    mu, sigma = gaussian_stats(features)
    stats = ReferenceStats(network=extractor.identity, mu=mu, sigma=sigma, num_images=int(images.shape[0]),
                           features=features, image_shape=tuple(int(s) for s in images.shape[1:]), source=source)
    if cache:
        try:
            save_reference(path, stats)
        except CheckpointError:
            pass  # an unwritable cache only costs the recomputation next time
    return stats
