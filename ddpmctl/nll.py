"""Bits/dim through the variational bound (IDDPM eq. 4-6, L_vlb = L_prior + L_0 + sum_t L_t).

Two estimators of the same quantity, the bound of the checkpoint's own chain (T terms; K for a respaced one):

- ``exact``: every term, as improved-diffusion's ``calc_bpd_loop`` (clip_denoised=True, fresh noise per term),
  but with many (image, t) pairs stacked into each network call instead of one call per t per image batch.
- ``mc``: the prior and the decoder term L_0 exactly, and an unbiased importance-sampled estimate of the KL
  terms sum_{t>=1} L_t = E_{t~p}[L_t / p(t)] from M draws per image; p(t) is proportional to sqrt(E[L_t^2])
  measured on a few "pilot" images (IDDPM Sec. 3.3's importance weights), mixed with a little uniform.

Noise is keyed, not streamed: the noise of term t of image i depends only on (seed, i, t), so any batching of the
pairs (and a plain per-t loop, via :func:`term_noise`) sees the very same noise and the very same bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ddpmctl.choices import Estimator
from ddpmctl.errors import CheckpointError, ConfigError, DataError
from ddpmctl.images import uint8_to_model
from ddpmctl.inference import MicroBatch, Precision, inference_network
from ddpmctl.seeds import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.checkpoint import LoadedCheckpoint
    from ddpmctl.diffusion import GaussianDiffusion


# The exact-mode noise of one image is drawn in blocks of this many terms, each block from its own keyed
# generator: a batch that needs terms 130..140 of image 7 draws one block, never the 130 before it.
NOISE_BLOCK = 128
# Seed-sequence purposes: exact-mode terms, pilot terms (independent of the evaluated ones), mc draws.
_PURPOSE_TERMS, _PURPOSE_PILOT, _PURPOSE_MC = 0, 1, 2
# How many (image, term) values one image chunk holds on the device before reducing them (float32 entries).
_CHUNK_ENTRIES = 1 << 22


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class NllProgress:
    """Progress of one phase: ``done`` of ``total`` (image, term) evaluations ("pilot" or "terms")."""

    phase: str
    done: int
    total: int


@dataclass(frozen=True)
class NllResult:
    """Per-image bits/dim and its breakdown. Every tensor is float64 on the CPU; image order as given.

    ``bpd`` = ``prior`` + ``decoder`` + ``kl_quartiles.sum(1)``. ``kl_quartiles[:, q]`` sums the KL terms whose
    own index t (1..K-1) has ``t * 4 // K == q`` (``quartile_ranges[q]`` gives the inclusive t range).
    For ``mc`` the KL parts are unbiased estimates and ``bpd_stderr`` is each image's own Monte-Carlo error.
    """

    estimator: str
    bpd: torch.Tensor  # [N]
    prior: torch.Tensor  # [N]
    decoder: torch.Tensor  # [N], L_0
    kl_quartiles: torch.Tensor  # [N, 4]
    quartile_ranges: tuple[tuple[int, int] | None, ...]
    num_terms: int  # terms in the bound: the chain's length K (prior not counted)
    terms_per_image: int  # network evaluations per image (K exact; 1 + M for mc)
    mc_terms: int | None = None  # M
    pilot_images: int = 0
    bpd_stderr: torch.Tensor | None = None  # [N], mc only (nan when M == 1)
    terms: torch.Tensor | None = None  # [N, K], exact mode with keep_terms=True

    @property
    def num_images(self) -> int:
        return int(self.bpd.shape[0])

    @property
    def mean(self) -> float:
        return float(self.bpd.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean over images, std (ddof=1) / sqrt(N).

        With one image there is no spread over images: for ``mc`` the image's own Monte-Carlo error is the whole
        error (nan only when M == 1), for ``exact`` it is nan.
        """
        if self.num_images == 1 and self.bpd_stderr is not None:
            return float(self.bpd_stderr[0])
        return _stderr(self.bpd)

    def breakdown(self) -> list[tuple[str, tuple[int, int] | None, float, float]]:
        """(name, own t range or None, mean bits/dim, standard error) for prior, L_0, each KL quartile, total."""
        rows: list[tuple[str, tuple[int, int] | None, float, float]] = [
            ("prior", None, float(self.prior.mean()), _stderr(self.prior)),
            ("L_0", (0, 0), float(self.decoder.mean()), _stderr(self.decoder)),
        ]
        for q, span in enumerate(self.quartile_ranges):
            if span is not None:
                column = self.kl_quartiles[:, q]
                rows.append((f"KL q{q + 1}", span, float(column.mean()), _stderr(column)))
        rows.append(("total", (0, self.num_terms - 1), self.mean, self.stderr))
        return rows


def _stderr(values: torch.Tensor) -> float:
    n = values.shape[0]
    return float(values.std(correction=1) / math.sqrt(n)) if n > 1 else float("nan")


def _generator(device: torch.device, key: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(key)
    return generator


def _noise_block(seed: int, purpose: int, index: int, block: int, shape: tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
    return torch.randn((NOISE_BLOCK, *shape), generator=_generator(device, derive_seed(seed, purpose, index, block)),
                       device=device)


def term_noise(seed: int, image_index: int, num_terms: int, shape: tuple[int, ...],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The exact-mode noise of image ``image_index`` for its terms t = 0..num_terms-1: [num_terms, *shape].

    What :func:`evaluate_bound` uses for the pair (image_index, t), so a plain per-t loop reproduces it exactly.
    """
    device = torch.device(device)
    blocks = [_noise_block(seed, _PURPOSE_TERMS, image_index, b, tuple(shape), device)
              for b in range((num_terms + NOISE_BLOCK - 1) // NOISE_BLOCK)]
    return torch.cat(blocks)[:num_terms]


def kl_quartile(t: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Quartile (0..3) of the chain's own index t: t * 4 // K."""
    return torch.div(t * 4, num_terms, rounding_mode="floor")


def _quartile_ranges(num_terms: int) -> tuple[tuple[int, int] | None, ...]:
    ranges: list[tuple[int, int] | None] = []
    t = torch.arange(1, num_terms)
    q = kl_quartile(t, num_terms)
    for quartile in range(4):
        members = t[q == quartile]
        ranges.append((int(members[0]), int(members[-1])) if members.numel() else None)
    return tuple(ranges)


class _ExactPairs:
    """Image i's pairs are t = 0..K-1; noise from keyed blocks (one block cached: pairs come in order)."""

    def __init__(self, seed: int, purpose: int, num_terms: int, shape: tuple[int, ...], device: torch.device):
        self.seed, self.purpose, self.per_image = seed, purpose, num_terms
        self.shape, self.device = shape, device
        self._cached: tuple[tuple[int, int], torch.Tensor] | None = None

    def _block(self, index: int, block: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != (index, block):
            self._cached = ((index, block), _noise_block(self.seed, self.purpose, index, block, self.shape,
                                                         self.device))
        return self._cached[1]

    def get(self, index: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        position = start
        while position < stop:
            block, offset = divmod(position, NOISE_BLOCK)
            take = min(stop - position, NOISE_BLOCK - offset)
            parts.append(self._block(index, block)[offset:offset + take])
            position += take
        t = torch.arange(start, stop, device=self.device)
        return t, parts[0] if len(parts) == 1 else torch.cat(parts)


class _MCPairs:
    """Image i's pairs are t = 0 (L_0, with the exact-mode noise) then M draws t_k ~ p, each with fresh noise."""

    def __init__(self, seed: int, proposal: torch.Tensor, terms: int, shape: tuple[int, ...],
                 device: torch.device):
        self.seed, self.proposal, self.terms, self.per_image = seed, proposal.to(device), terms, terms + 1
        self.shape, self.device = shape, device
        self.exact = _ExactPairs(seed, _PURPOSE_TERMS, 1, shape, device)
        self.drawn: dict[int, torch.Tensor] = {}
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _draw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None or self._cached[0] != index:
            generator = _generator(self.device, derive_seed(self.seed, _PURPOSE_MC, index, 0))
            # p has no mass at t = 0, so every draw is a KL term t >= 1.
            t_mc = torch.multinomial(self.proposal, self.terms, replacement=True, generator=generator)
            noise_mc = torch.randn((self.terms, *self.shape), generator=generator, device=self.device)
            _, noise_0 = self.exact.get(index, 0, 1)
            t = torch.cat([torch.zeros(1, dtype=torch.long, device=self.device), t_mc])
            self._cached = (index, t, torch.cat([noise_0, noise_mc]))
            self.drawn[index] = t_mc  # kept on the device: no synchronisation per image
        return self._cached[1], self._cached[2]

    def get(self, index: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, noise = self._draw(index)
        return t[start:stop], noise[start:stop]


def _vb_terms(diffusion: GaussianDiffusion, model: Denoiser, x_start: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """L_t (L_0 at t = 0) in bits/dim for a stack of pairs, as calc_bpd_loop computes each
    (docs/conventions.md #8-11)."""
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    model_kwargs = {"y": y} if y is not None else None
    return diffusion.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=True, model_kwargs=model_kwargs)["output"]


def _run_pairs(diffusion: GaussianDiffusion, model: Denoiser, x_start: torch.Tensor, y: torch.Tensor | None,
               indices: list[int], pairs: _ExactPairs | _MCPairs, batch_size: int,
               progress: Callable[[int], None]) -> torch.Tensor:
    """Every pair of the given images, ``batch_size`` pairs per network call: values [len(indices), per_image].

    ``x_start``/``y`` hold the chunk's images (row r is image ``indices[r]``); pairs are taken image-major, so a
    call holds e.g. 2 images x 64 terms, or a tail of one image and the head of the next.
    """
    per_image = pairs.per_image
    total = len(indices) * per_image
    values = torch.empty(total, dtype=torch.float32, device=x_start.device)
    position = 0
    while position < total:
        stop = min(position + batch_size, total)
        rows, ts, noises = [], [], []
        cursor = position
        while cursor < stop:
            row, start = divmod(cursor, per_image)
            end = min(per_image, start + stop - cursor)
            t, noise = pairs.get(indices[row], start, end)
            rows.append(torch.full((end - start,), row, dtype=torch.long, device=x_start.device))
            ts.append(t)
            noises.append(noise)
            cursor += end - start
        row_index = torch.cat(rows)
        y_batch = y[row_index] if y is not None else None
        out = _vb_terms(diffusion, model, x_start[row_index], torch.cat(ts), torch.cat(noises), y_batch)
        values[position:stop] = out.float()
        progress(stop - position)
        position = stop
    return values.view(len(indices), per_image)


def _check_images(images: torch.Tensor, scale_images: bool) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 on the 8-bit grid in [-1, 1] (docs/conventions.md #11: x / 127.5 - 1 exactly)."""
    if images.dim() != 4:
        raise DataError(f"expected images of shape [N, C, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise DataError("no images to evaluate")
    if scale_images:
        if images.dtype != torch.uint8:
            raise DataError(f"bits/dim needs 8-bit images (uint8), got {images.dtype}")
        return uint8_to_model(images).float()
    x = images.float()
    levels = (x.double() + 1) * 127.5
    if x.abs().max() > 1 or (levels - levels.round()).abs().max() > 1e-3:
        raise DataError("images are not on the 8-bit grid mapped to [-1, 1]: pass uint8 images instead")
    return x


def _kl_split(values: torch.Tensor, t: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Sum values [N, P] into KL quartiles [N, 4] by the quartile of t [N, P] (t = 0 entries excluded)."""
    quartile = kl_quartile(t, num_terms).clamp(0, 3)
    out = torch.zeros(values.shape[0], 4, dtype=torch.float64)
    return out.scatter_add_(1, quartile, torch.where(t > 0, values, torch.zeros_like(values)))


def pilot_proposal(diffusion: GaussianDiffusion, model: Denoiser, x_start: torch.Tensor,
                   y: torch.Tensor | None = None, *, batch_size: int = 256, seed: int = 0,
                   uniform_mix: float = 0.1, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """p(t) over t = 0..K-1 with p(0) = 0: sqrt(E[L_t^2]) over the pilot images, mixed with uniform (IDDPM Sec. 3.3).

    The pilot draws its own noise (independent of the evaluated terms), so the estimate stays unbiased.
    """
    num_terms = diffusion.num_timesteps
    if num_terms < 2:
        raise ConfigError("the chain has a single step: there are no KL terms to sample (use the exact estimator)")
    shape = tuple(x_start.shape[1:])
    pairs = _ExactPairs(seed, _PURPOSE_PILOT, num_terms, shape, x_start.device)
    values = _run_pairs(diffusion, model, x_start, y, list(range(x_start.shape[0])), pairs, batch_size,
                        progress or (lambda n: None)).double().cpu()
    scale = values[:, 1:].pow(2).mean(0).sqrt()
    uniform = torch.full_like(scale, 1.0 / scale.numel())
    if not torch.isfinite(scale).all() or scale.sum() <= 0:
        kl_p = uniform
    else:
        kl_p = (1 - uniform_mix) * scale / scale.sum() + uniform_mix * uniform
    return torch.cat([torch.zeros(1, dtype=torch.float64), kl_p])


@torch.inference_mode()
def evaluate_bound(diffusion: GaussianDiffusion, model: Denoiser, x_start: torch.Tensor,
                   labels: torch.Tensor | None = None, *, batch_size: int = 256, estimator: Estimator = "exact",
                   terms: int | None = None, seed: int = 0, pilot_images: int = 4, uniform_mix: float = 0.1,
                   proposal: torch.Tensor | None = None, keep_terms: bool = False,
                   callback: Callable[[NllProgress], None] | None = None) -> NllResult:
    """The bound for images ``x_start`` already in [-1, 1] (on ``model``'s device) under ``diffusion``.

    ``labels`` (int64 [N]) are passed to the model as ``y``. ``proposal`` (float [K], p(0) = 0) replaces the
    pilot estimate in mc mode. Image i's noise depends only on (seed, i), whatever ``batch_size`` is.
    """
    _check_estimator(batch_size, estimator, terms)
    num_terms = diffusion.num_timesteps
    n, shape, device = x_start.shape[0], tuple(x_start.shape[1:]), x_start.device
    if labels is not None:
        labels = labels.to(device=device, dtype=torch.long)
        if labels.shape != (n,):
            raise DataError(f"expected {n} labels, got shape {tuple(labels.shape)}")

    pilot = 0
    if estimator == "mc" and num_terms < 2:
        estimator = "exact"  # no KL terms at all: the exact bound is L_0 + prior, nothing to sample
        terms = None
    if estimator == "mc" and proposal is None:
        pilot = min(pilot_images, n)
        if pilot < 1:
            raise ConfigError("the mc estimator needs at least one pilot image")
        done_pilot = 0

        def pilot_progress(count: int) -> None:
            nonlocal done_pilot
            done_pilot += count
            if callback is not None:
                callback(NllProgress("pilot", done_pilot, pilot * num_terms))

        y_pilot = labels[:pilot] if labels is not None else None
        proposal = pilot_proposal(diffusion, model, x_start[:pilot], y_pilot, batch_size=batch_size, seed=seed,
                                  uniform_mix=uniform_mix, progress=pilot_progress)
    if estimator == "mc":
        assert proposal is not None and terms is not None
        proposal = proposal.double().cpu()
        if proposal.shape != (num_terms,) or proposal[0] != 0 or (proposal[1:] <= 0).any():
            raise ConfigError(f"proposal must have {num_terms} entries, p(0) = 0 and p(t) > 0 for t >= 1")
        proposal = proposal / proposal.sum()
        pairs: _ExactPairs | _MCPairs = _MCPairs(seed, proposal.float(), terms, shape, device)
    else:
        pairs = _ExactPairs(seed, _PURPOSE_TERMS, num_terms, shape, device)

    per_image = pairs.per_image
    total_pairs = n * per_image
    done = 0

    def progress(count: int) -> None:
        nonlocal done
        done += count
        if callback is not None:
            callback(NllProgress("terms", done, total_pairs))

    chunk = max(1, _CHUNK_ENTRIES // per_image)
    prior = torch.empty(n, dtype=torch.float64)
    values = torch.empty(n, per_image, dtype=torch.float64)
    for first in range(0, n, chunk):
        rows = slice(first, min(first + chunk, n))
        x_chunk = x_start[rows]
        y_chunk = labels[rows] if labels is not None else None
        prior[rows] = diffusion.prior_bpd(x_chunk).double().cpu()
        values[rows] = _run_pairs(diffusion, model, x_chunk, y_chunk, list(range(rows.start, rows.stop)), pairs,
                                  batch_size, progress).double().cpu()

    if isinstance(pairs, _MCPairs):
        assert terms is not None and proposal is not None
        return _mc_result(pairs, prior, values, proposal, terms, num_terms, pilot)
    decoder = values[:, 0].clone()
    t_all = torch.arange(num_terms).expand(n, num_terms)
    kl_quartiles = _kl_split(values, t_all, num_terms)
    return NllResult("exact", prior + values.sum(1), prior, decoder, kl_quartiles, _quartile_ranges(num_terms),
                     num_terms, per_image, terms=values if keep_terms else None)


def _check_estimator(batch_size: int, estimator: str, terms: int | None) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if estimator not in ("exact", "mc"):
        raise ConfigError(f"unknown estimator {estimator!r}: use exact or mc")
    if estimator == "exact" and terms is not None:
        raise ConfigError("terms is for the mc estimator (exact evaluates every term)")
    if estimator == "mc" and (terms is None or terms < 1):
        raise ConfigError(f"the mc estimator needs terms >= 1, got {terms}")


def _mc_result(pairs: _MCPairs, prior: torch.Tensor, values: torch.Tensor, proposal: torch.Tensor, terms: int,
               num_terms: int, pilot: int) -> NllResult:
    """The importance-sampled bound of every image from its ``terms`` drawn KL terms (and its exact L_0, prior)."""
    n = values.shape[0]
    decoder = values[:, 0].clone()
    t_mc = torch.stack([pairs.drawn[i] for i in range(n)]).cpu()
    # Importance weights 1/(M p(t_k)): E_p[L_t / p(t)] = sum_t L_t (the sum over t >= 1 of the KL terms).
    weighted = values[:, 1:] / proposal[t_mc]
    kl_quartiles = _kl_split(weighted / terms, t_mc, num_terms)
    if terms > 1:
        kl_within = weighted.std(dim=1, correction=1) / math.sqrt(terms)
    else:
        kl_within = torch.full((n,), float("nan"), dtype=torch.float64)
    return NllResult("mc", prior + decoder + kl_quartiles.sum(1), prior, decoder, kl_quartiles,
                     _quartile_ranges(num_terms), num_terms, pairs.per_image, mc_terms=terms, pilot_images=pilot,
                     bpd_stderr=kl_within)


def check_has_bound(checkpoint: LoadedCheckpoint) -> None:
    """A distilled student predicts x_0 on a few-step grid, not eps and a variance on a chain: it has no bound;
    nor has a DDGAN generator, whose x_0 is a sample of an implicit distribution (a GAN has no density)."""
    if checkpoint.kind == "student" or checkpoint.config.student is not None:
        raise CheckpointError(f"{checkpoint.path.name} is a distilled student: a student has no variational bound "
                              "(evaluate the teacher it was distilled from)")
    if checkpoint.kind == "ddgan":
        raise CheckpointError(f"{checkpoint.path.name} is a denoising diffusion GAN: its implicit generator has no "
                              "likelihood to evaluate (measure its samples with eval-samples)")
    if checkpoint.kind == "cld":
        raise CheckpointError(f"{checkpoint.path.name} is a CLD network: it has no discrete chain; its bound is "
                              "ddpmctl.cld_nll.evaluate_cld_nll (what eval-nll runs for it)")


def evaluate_nll(checkpoint: LoadedCheckpoint, images_uint8: torch.Tensor, labels: torch.Tensor | None = None, *,
                 batch_size: int = 256, estimator: Estimator = "exact", terms: int | None = None, seed: int = 0,
                 pilot_images: int = 4, keep_terms: bool = False,
                 callback: Callable[[NllProgress], None] | None = None, scale_images: bool = True,
                 micro_batch: MicroBatch = "auto", precision: Precision = "fp32") -> NllResult:
    """Bits/dim of 8-bit images under a checkpoint's own chain (IDDPM Table 1-2's NLL); see the module docstring.

    ``images_uint8``: uint8 [N, C, H, W] (``scale_images=False``: floats already on the 8-bit grid in [-1, 1]).
    ``labels`` are required for a class-conditional model and ignored otherwise. ``micro_batch`` caps the images
    per forward pass ("auto": sized for the CPU, see ddpmctl.inference); it changes results only at float rounding.
    ``precision`` "bf16" runs the network under bf16 autocast (its outputs, and everything after, stay fp32/fp64).
    """
    check_has_bound(checkpoint)
    model_config = checkpoint.config.model
    x_start = _check_images(images_uint8, scale_images)
    expected = (model_config.in_channels, model_config.image_size, model_config.image_size)
    if tuple(x_start.shape[1:]) != expected:
        raise DataError(f"the images are {'x'.join(map(str, x_start.shape[1:]))} (C x H x W) but the model takes "
                        f"{'x'.join(map(str, expected))}")
    if model_config.num_classes:
        if labels is None:
            raise DataError(f"the model is class-conditional ({model_config.num_classes} classes): labels are "
                            "needed (a labelled dataset)")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= model_config.num_classes):
            raise DataError(f"labels must lie in 0..{model_config.num_classes - 1} for this model")
    else:
        labels = None
    device = next(iter(checkpoint.model.parameters())).device
    checkpoint.model.eval()
    network = inference_network(checkpoint.model, device, model_config.image_size, model_config.model_channels,
                                micro_batch=micro_batch, precision=precision)
    return evaluate_bound(checkpoint.diffusion, network, x_start.to(device), labels,
                          batch_size=batch_size, estimator=estimator, terms=terms, seed=seed,
                          pilot_images=pilot_images, keep_terms=keep_terms, callback=callback)
