"""Sample quality in one call: Frechet distance (FID with Inception), KID, precision and recall of uint8 images.

The library behind ``ddpmctl eval-samples`` and ``train --eval-every``::

    from ddpmctl.quality import evaluate_images, load_feature_extractor, reference_for_dataset

    extractor = load_feature_extractor("digits")                    # or "inception", weights=PATH
    reference = reference_for_dataset("builtin:digits", extractor)  # held-out split; cached after the first call
    report = evaluate_images(images_uint8_nchw, reference, extractor)
    report.fd, report.kid, report.kid_std, report.precision, report.recall, report.to_dict()

``images`` are uint8 [N, C, H, W] (``ddpmctl.samplers.generate(..., output="uint8")`` gives them). The numbers
depend only on the images and the reference: not on batch sizes (beyond float rounding) and not on any seed (KID's
subsets come from a fixed seed).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ddpmctl.choices import Split
from ddpmctl.errors import DataError
from ddpmctl.features import FeatureExtractor, load_feature_extractor
from ddpmctl.metrics import frechet_distance, gaussian_stats, kernel_inception_distance, precision_recall
from ddpmctl.refstats import ReferenceStats, check_network, load_reference_file, reference_from_images

__all__ = ["QualityReport", "evaluate_features", "evaluate_images", "load_feature_extractor", "load_reference_file",
           "load_sample_images", "load_samples_npz", "reference_for_dataset", "reference_from_images"]

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_NEIGHBOURS = 3


@dataclass(frozen=True)
class QualityReport:
    """The metrics of one set of samples against one reference. KID, precision and recall are None when the
    reference holds only mu/sigma."""

    features: str  # "digits" or "inception"
    fd: float  # the Frechet distance: FID with the inception features, "FD" with the digits network
    kid: float | None
    kid_std: float | None  # spread of the subset estimates (the standard error of one subset's KID)
    kid_subset_size: int | None
    precision: float | None
    recall: float | None
    num_samples: int
    num_reference: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out


def evaluate_features(features: torch.Tensor, reference: ReferenceStats, *, network: str,
                      notes: tuple[str, ...] = ()) -> QualityReport:
    """The metrics of sample features [N, D] against ``reference`` (same feature network)."""
    if features.shape[0] < 2:
        raise DataError(f"sample quality needs at least 2 samples, got {features.shape[0]}")
    mu, sigma = gaussian_stats(features)
    fd = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    kid = kid_std = precision = recall = None
    kid_size = None
    if reference.features is not None:
        estimate = kernel_inception_distance(features, reference.features, subsets=KID_SUBSETS,
                                             subset_size=KID_SUBSET_SIZE)
        kid, kid_std, kid_size = estimate.mean, estimate.std, estimate.subset_size
        if min(features.shape[0], reference.features.shape[0]) > PR_NEIGHBOURS:
            precision, recall = precision_recall(features, reference.features, k=PR_NEIGHBOURS)
    else:
        notes = (*notes, "the reference holds only mu and sigma: KID, precision and recall need its features")
    return QualityReport(features=network, fd=fd, kid=kid, kid_std=kid_std, kid_subset_size=kid_size,
                         precision=precision, recall=recall, num_samples=int(features.shape[0]),
                         num_reference=reference.num_images, notes=notes)


def _check_shapes(images: torch.Tensor, reference: ReferenceStats) -> None:
    if reference.image_shape is None:
        return
    got = tuple(int(s) for s in images.shape[1:])
    if got != tuple(reference.image_shape):
        c, h, w = got
        rc, rh, rw = reference.image_shape
        raise DataError(f"the samples are {c}-channel {h}x{w} images but the reference ({reference.source or 'given'})"
                        f" is {rc}-channel {rh}x{rw}: compare images of the same size and colour")


def evaluate_images(images: torch.Tensor, reference: ReferenceStats, extractor: FeatureExtractor, *,
                    batch_size: int = 64, callback: Callable[[int, int], None] | None = None) -> QualityReport:
    """Feature-extract uint8 samples [N, C, H, W] and measure them against ``reference``.

    Samples and reference images must have the same shape (DataError otherwise); both are converted to what the
    network takes in the same way, and each conversion is a note in the report.
    """
    check_network(reference, extractor, reference.source or "the reference")
    _check_shapes(images, reference)
    adapted, notes = extractor.adapt(images, "samples")
    features = extractor.extract(adapted, batch_size=batch_size, callback=callback)
    return evaluate_features(features, reference, network=extractor.name, notes=tuple(notes))


def reference_for_dataset(source: str, extractor: FeatureExtractor, *, split: Split = "test",
                          image_size: int | None = None, channels: int | None = None, cache: bool = True,
                          batch_size: int = 64, on_warning: Callable[[str], None] | None = None,
                          callback: Callable[[int, int], None] | None = None) -> ReferenceStats:
    """Statistics of an image folder or ``builtin:NAME`` (its ``split``, held-out by default), cached.

    ``image_size`` / ``channels`` load the images as the samples are (a folder is resized and center-cropped the
    way training reads it); ``on_warning`` gets the loader's notes (resizing, skipped files).
    """
    from ddpmctl.data import load_dataset

    color = {None: "auto", 1: "gray", 3: "rgb"}[channels]
    dataset = load_dataset(source, image_size=image_size, color=color, split=split,  # type: ignore[arg-type]
                           on_warning=on_warning or (lambda _: None))
    name = f"{source} ({split} split)" if source.startswith("builtin:") else source
    return reference_from_images(dataset.images, extractor, source=name, cache=cache, batch_size=batch_size,
                                 callback=callback)


def load_samples_npz(path: str | os.PathLike[str]) -> torch.Tensor:
    """Images [N, C, H, W] uint8 from a samples ``.npz`` as ``ddpmctl sample`` (and improved-diffusion) write it:
    ``arr_0`` uint8 NHWC with 1 or 3 channels (NHW taken as grayscale). Nothing is unpickled."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            key = "arr_0" if "arr_0" in names else (names[0] if len(names) == 1 else None)
            if key is None:
                raise DataError(f"{path} holds {', '.join(names) or 'no arrays'}: samples are arr_0 (uint8 NHWC)")
            array = archive[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} cannot be read as an .npz of plain arrays: {' '.join(str(err).split())[:160]}") \
            from None
    if array.ndim == 3:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] < 1:
        raise DataError(f"{path}: {key} must be uint8 images [N, H, W, 1 or 3] (NHWC, as `ddpmctl sample` writes), "
                        f"got {array.dtype} {tuple(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def load_sample_images(path: str | os.PathLike[str], *,
                       on_warning: Callable[[str], None] | None = None) -> torch.Tensor:
    """Samples to evaluate from a ``.npz`` (``load_samples_npz``) or an image folder (read whole, at its own size).

    A folder that ``ddpmctl sample`` wrote (it holds samples.npz next to its PNGs and grid.png) is read from its
    samples.npz, so the grid is never taken for a sample."""
    from ddpmctl.data import load_dataset

    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        if on_warning is not None:
            on_warning(f"{path} holds samples.npz (written by `ddpmctl sample`): evaluating that, not the PNGs")
        return load_samples_npz(path / "samples.npz")
    if path.is_dir():
        return load_dataset(str(path), on_warning=on_warning or (lambda _: None)).images
    if not path.exists():
        raise DataError(f"{path} does not exist")
    return load_samples_npz(path)
