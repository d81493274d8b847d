"""The sampler plugin contract v2: the :class:`Sampler` base class and its options, the per-image noise streams
(:class:`SampleRNG`) and the step callback (:class:`StepInfo`). A plugin imports these through ``ddpmctl``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ddpmctl.choices import Spacing
from ddpmctl.denoiser import Denoiser, OriginalStep
from ddpmctl.seeds import SAMPLE_NOISE, derive_seed

API_VERSION = 2  # the contract a plugin declares with ``api_version``; v1 handed plugins the loaded checkpoint


class SampleRNG:
    """One torch.Generator per image, so image i's initial noise and every per-step noise depend only on (seed, i).

    Draws happen on CPU generators and are moved to ``device`` afterwards, so an image never depends on the batch
    it was sampled in, the batch size, the device or the number of devices.
    """

    def __init__(self, seed: int, indices: Iterable[int], device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        if not self.indices:
            raise ValueError("SampleRNG needs at least one image index")
        self.device = torch.device(device)
        self.generators = [torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, i, SAMPLE_NOISE))
                           for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, shape_per_image: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape [N, *shape_per_image], row i drawn from image i's own generator."""
        rows = [torch.randn(tuple(shape_per_image), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``x`` ([N, ...] with N = the number of images), on x's device and dtype."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"randn_like: batch of {x.shape[0]} but this SampleRNG serves {len(self)} images")
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        rows = [torch.randn(tuple(x.shape[1:]), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(x.device)


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each network step (``index`` 0..total-1 in sampling order)."""

    index: int
    total: int
    t: int  # the original training-chain timestep of this step
    x: torch.Tensor  # the sample after the step
    pred_xstart: torch.Tensor | None  # the model's (clipped) x_0 estimate at this step, when the sampler has one


StepCallback = Callable[[StepInfo], None]


class SamplerOptions(BaseModel):
    """Base of every sampler's ``Options``: frozen, unknown keys rejected (so ``-O typo=1`` is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampler:
    """Base class of sampler plugins, contract v2 (see the module docstring).

    Subclasses set ``api_version = 2``, ``name`` (= the entry-point name), a one-line ``description``, an
    ``Options`` model derived from ``Sampler.Options`` and implement :meth:`sample`. What the driver reads to pick
    the timesteps: ``default_steps`` (None: every step of the chain), ``whole_chain`` (only the checkpoint's
    whole chain), ``default_spacing`` (or an option named ``spacing``) and ``checkpoint_kinds``.
    """

    api_version: ClassVar[int | None] = None  # a plugin sets API_VERSION; unset means it predates versioning (v1)
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[SamplerOptions]] = SamplerOptions
    # Checkpoint kinds it samples (check_sampler builds exact checkpoints of the first kind listed).
    checkpoint_kinds: ClassVar[tuple[str, ...]] = ("model", "respaced")
    default_steps: ClassVar[int | None] = 50
    whole_chain: ClassVar[bool] = False
    default_spacing: ClassVar[Spacing] = "even"

    def __init__(self, options: SamplerOptions | None = None) -> None:
        if options is None:
            options = self.Options()
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} expects {self.Options.__qualname__}, not {type(options)!r}")
        self.options = options

    @property
    def spacing(self) -> Spacing:
        """The spacing this run asks for: its ``spacing`` option when it has one, else ``default_spacing``."""
        return getattr(self.options, "spacing", self.default_spacing)

    def log_snr_span(self, mean_type: str, steps: int, bottom: float) -> tuple[float, float] | None:
        """Where ``spacing = logsnr`` spreads a run of ``steps`` steps after the top one: (lambda_low, lambda_high)
        for a network predicting ``mean_type`` (eps / x0 / v) on a chain whose bottom step has lambda ``bottom``;
        None (the default): from the step below the top to the bottom step."""
        return None

    def sample(self, denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[OriginalStep], *, noise: SampleRNG,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Turn the noise ``x_T`` [N, C, H, W] into images in [-1, 1] of the same shape, calling ``callback``
        once per entry of ``timesteps`` (original indices, noisiest first) with a :class:`StepInfo`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
