"""The sampler plugin contract v2 (base class, options, per-image RNG, step callback), the registry and the driver.

A sampler is one small class around one loop (k-diffusion's ``sample_*`` habit): the driver (:func:`generate`)
chooses the run's timesteps (:func:`sampling_timesteps`: even, the reference's ``ddim`` stride, logSNR-uniform,
or an explicit list) and builds a :class:`~ddpmctl.denoiser.Denoiser` (the network call, the chain's
alphas-bar, ``predict(x, t)``); the sampler receives the denoiser, the noise ``x_T``, the timesteps (original
indices, noisiest first; ``ddpmctl.denoiser`` names every index space), its per-image noise streams
(:class:`SampleRNG`) and a callback, and returns images in [-1, 1]. It never sees a checkpoint.

Plugins are registered under the entry-point group ``ddpmctl.samplers`` (one entry point = one class, its name =
the CLI name) and declare ``api_version = 2``; discovery is cached, and a plugin that fails to load or was written
for another version is recorded with its reason instead of breaking the others (xarray's ``backends/plugins.py``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ddpmctl.choices import Precision, Spacing
from ddpmctl.denoiser import Denoiser, OriginalStep
from ddpmctl.errors import SamplerError, UnknownSamplerError, validation_problem
from ddpmctl.images import model_to_uint8
from ddpmctl.inference import MicroBatch, inference_network
from ddpmctl.respace import space_timesteps
from ddpmctl.seeds import SAMPLE_LABEL, SAMPLE_NOISE, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.checkpoint import LoadedCheckpoint

ENTRY_POINT_GROUP = "ddpmctl.samplers"
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


# ----------------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class SamplerEntry:
    """One entry point of the ``ddpmctl.samplers`` group: the loaded class, or why it could not be used."""

    name: str
    value: str  # "module:Class" as registered
    package: str | None  # the distribution providing it (None for hand-made entry points)
    cls: type[Sampler] | None = None
    error: str | None = None
    incompatible: bool = False  # loads, but written for another version of the sampler API

    @property
    def ok(self) -> bool:
        return self.cls is not None


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the sampler group (tests replace this to fake plugins)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _package_of(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    try:
        return f"{dist.name} {dist.version}"
    except Exception:  # a half-broken distribution must not break discovery
        return None


def _load(ep: importlib.metadata.EntryPoint) -> SamplerEntry:
    """Import one entry point and check it is a proper Sampler; never raises."""
    base = {"name": ep.name, "value": ep.value, "package": _package_of(ep)}
    try:
        obj = ep.load()
    except Exception as err:  # any import-time failure of a third-party module is that plugin's problem only
        return SamplerEntry(**base, error=f"cannot import {ep.value}: {type(err).__name__}: {err}")
    if not (isinstance(obj, type) and issubclass(obj, Sampler)):
        return SamplerEntry(**base, error=f"{ep.value} is not a ddpmctl.Sampler subclass")
    if obj.api_version != API_VERSION:
        written = f"v{obj.api_version}" if obj.api_version is not None else "v1 (it sets no api_version)"
        return SamplerEntry(**base, incompatible=True,
                            error=f"{ep.value} is written for sampler API {written}; this ddpmctl needs "
                                  f"v{API_VERSION} (a sample(denoiser, x_T, timesteps, ...) loop): update the plugin")
    if obj.name != ep.name:
        return SamplerEntry(**base, error=f"{ep.value} calls itself {obj.name!r} but is registered as {ep.name!r}")
    if not (isinstance(obj.Options, type) and issubclass(obj.Options, BaseModel)):
        return SamplerEntry(**base, error=f"{ep.value}.Options is not a pydantic model")
    try:
        obj.Options()
    except ValidationError as err:
        return SamplerEntry(**base, error=f"{ep.value}.Options has options without defaults: "
                                          f"{validation_problem(err)}")
    return SamplerEntry(**base, cls=obj)


@functools.cache
def available_samplers() -> dict[str, SamplerEntry]:
    """Every entry point of the group, by name (sorted), loaded once; broken ones carry their error."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in _entry_points():
        same = found.setdefault(ep.name, [])
        # An editable install can list one entry point twice (source tree + site-packages): same value, keep one.
        if all(other.value != ep.value for other in same):
            same.append(ep)
    entries: dict[str, SamplerEntry] = {}
    for name in sorted(found):
        eps = found[name]
        if len(eps) > 1:
            where = ", ".join(f"{ep.value} ({_package_of(ep) or '?'})" for ep in eps)
            entries[name] = SamplerEntry(name=name, value=eps[0].value, package=_package_of(eps[0]),
                                         error=f"registered more than once: {where}")
        else:
            entries[name] = _load(eps[0])
    return entries


def reset_registry() -> None:
    """Forget the cached discovery (for tests and after installing a plugin in-process)."""
    available_samplers.cache_clear()


def get_sampler(name: str) -> type[Sampler]:
    """The sampler class registered as ``name``; UnknownSamplerError lists the installed ones."""
    entries = available_samplers()
    entry = entries.get(name)
    if entry is None:
        usable = sorted(n for n, e in entries.items() if e.ok)
        listing = ", ".join(usable) if usable else "none"
        raise UnknownSamplerError(f"unknown sampler {name!r}; installed samplers: {listing}")
    if entry.cls is None:
        state = "incompatible" if entry.incompatible else "broken"
        raise SamplerError(f"sampler {name!r} is installed but {state}: {entry.error}")
    return entry.cls


def parse_options(cls: type[Sampler], items: Sequence[str]) -> SamplerOptions:
    """``["eta=0.5", "spacing=ddim"]`` -> ``cls.Options``; one-line SamplerError for anything wrong (-O)."""
    fields = cls.Options.model_fields
    known = ", ".join(fields) if fields else "none"
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SamplerError(f"option {item!r} must look like key=value (options of {cls.name}: {known})")
        if key not in fields:
            raise SamplerError(f"sampler {cls.name!r} has no option {key!r} (its options: {known})")
        if key in values:
            raise SamplerError(f"option {key!r} given twice")
        values[key] = value.strip()
    try:
        return cls.Options.model_validate(values)
    except ValidationError as err:
        def option(loc: tuple[str | int, ...]) -> str:
            if not loc:  # a check across options (e.g. a range's two ends): name them all
                return "options " + " ".join(f"{k}={v}" for k, v in values.items())
            key = str(loc[0])
            return f"option {key}={values.get(key, '')}"

        raise SamplerError(validation_problem(err, option)) from None


def describe_options(cls: type[Sampler]) -> list[dict[str, Any]]:
    """The options of a sampler as rows (name, type, default, description) for ``ddpmctl samplers``."""
    rows = []
    for key, info in cls.Options.model_fields.items():
        annotation = info.annotation
        if getattr(annotation, "__origin__", None) is Literal:
            type_name = "|".join(str(a) for a in annotation.__args__)
        else:
            type_name = getattr(annotation, "__name__", str(annotation))
        rows.append({"name": key, "type": type_name, "default": info.get_default(call_default_factory=True),
                     "description": info.description or ""})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The batching driver used by `ddpmctl sample`


@dataclass(frozen=True)
class SampleProgress:
    """Progress of :func:`generate`: images finished so far and the step reached in the current batch."""

    images_done: int
    num: int
    step: int  # steps finished in the current batch (0 right after a batch completes and before the next)
    steps: int
    batch_start: int
    batch_size: int


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def draw_labels(seed: int, indices: Iterable[int], num_classes: int) -> torch.Tensor:
    """Class labels drawn per image from (seed, i) on a stream separate from the noise (int64 [N], CPU)."""
    return torch.tensor([
        int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
            derive_seed(seed, i, SAMPLE_LABEL))))
        for i in indices
    ], dtype=torch.int64)


def step_counts_with_ddim_stride(total: int) -> list[int]:
    """Every K the "ddimK" stride rule (range(0, total, i); docs/conventions.md #13) gives on a ``total`` chain."""
    return sorted({len(range(0, total, stride)) for stride in range(1, total + 1)})


def _logsnr_uniform(log_snr: Sequence[float], steps: int, span: tuple[float, float] | None = None) -> set[int]:
    """``steps`` distinct positions of a chain (``log_snr``: lambda per position, ascending positions, descending
    lambda): the top step, then ``steps - 1`` positions nearest to values evenly spaced in lambda over ``span`` =
    (lambda_low, lambda_high), clamped to the chain's range from the step below the top to the bottom step (None:
    that whole range; DPM-Solver's time steps on a discrete chain).

    The top step of a cosine chain sits at the clipped beta of 0.999, 3.5 units of lambda below its neighbour: a
    grid starting there would put its next targets in a gap the chain cannot fill (they would collapse onto the
    top steps). On the Gaussian check this halves dpmpp-2m's error at 5-50 steps (benchmarks/README.md).
    """
    total = len(log_snr)
    if steps == 1:
        return {total - 1}
    top, bottom = log_snr[-2] if steps > 2 else log_snr[-1], log_snr[0]
    if span is not None:
        low, high = span
        if not low < high:
            raise SamplerError(f"the log-SNR range needs its low end below its high end, not {low:g} .. {high:g}")
        top, bottom = max(top, min(low, bottom)), min(bottom, max(high, top))
    targets = [top + (bottom - top) * j / (steps - 2) for j in range(steps - 1)] if steps > 2 else [bottom]
    # The chain's lambda decreases with the position: the nearest position by bisection, then kept distinct.
    chosen = [total - 1]
    for target in targets:
        lo, hi = 0, total - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if log_snr[mid] > target else (lo, mid)
        chosen.append(lo if abs(log_snr[lo] - target) <= abs(log_snr[hi] - target) else hi)
    # Strictly decreasing positions with room for the rest: from the top down, then from the bottom up.
    for j in range(1, steps):
        chosen[j] = min(chosen[j], chosen[j - 1] - 1)
    for j in range(steps - 1, -1, -1):
        chosen[j] = max(chosen[j], steps - 1 - j, chosen[j + 1] + 1 if j < steps - 1 else 0)
    return set(chosen)


def choose_timesteps(total: int, steps: int, spacing: Spacing, *, log_snr: Sequence[float] | None = None,
                     log_snr_span: tuple[float, float] | None = None) -> set[int]:
    """K positions of a ``total``-step chain (the one --steps check and the one spacing helper of ddpmctl).

    even: the IDDPM rule (docs/conventions.md #12); ddim: the reference's stride range(0, total, i)
    (docs/conventions.md #13; a SamplerError names nearby K that work); logsnr: uniform in lambda = log alpha -
    log sigma between the top and the bottom step (``log_snr``: lambda of each position, ascending positions), or
    over ``log_snr_span`` = (lambda_low, lambda_high) within them.
    One step is always the TOP step: a single network call on pure noise must be made where the network expects
    pure noise.
    """
    if not 1 <= steps <= total:
        raise SamplerError(f"--steps must be between 1 and the chain's {total} steps, not {steps}")
    if steps == 1:
        return {total - 1}
    if spacing == "even":
        return space_timesteps(total, str(steps))
    if spacing == "logsnr":
        if log_snr is None or len(log_snr) != total:
            raise ValueError("spacing logsnr needs the log-SNR of every step of the chain")
        return _logsnr_uniform(log_snr, steps, log_snr_span)
    try:
        return space_timesteps(total, f"ddim{steps}")
    except ValueError:
        counts = step_counts_with_ddim_stride(total)
        nearby = [c for c in counts if c < steps][-2:] + [c for c in counts if c > steps][:2]
        raise SamplerError(f"spacing ddim cannot give exactly {steps} steps on a {total}-step chain "
                           f"(possible nearby: {', '.join(map(str, nearby))}); pick one or use even spacing") from None


def _checkpoint_chain(checkpoint: LoadedCheckpoint) -> list[OriginalStep]:
    """The original steps a checkpoint samples over, ascending: its respaced subsequence, or every step 0..T-1."""
    return [int(t) for t in checkpoint.diffusion.timestep_map]


def sampling_timesteps(checkpoint: LoadedCheckpoint, sampler: Sampler, steps: int | None = None,
                       timesteps: Sequence[int] | None = None) -> tuple[OriginalStep, ...]:
    """The original steps ``sampler`` walks on ``checkpoint``, noisiest first; SamplerError (one line) otherwise.

    ``steps`` is the user's --steps (None: the sampler's ``default_steps``, capped by the chain), spaced over the
    checkpoint's chain by ``sampler.spacing``; ``timesteps`` instead gives an explicit list of steps of the chain.
    A distilled student is sampled on its own grid by samplers that list the "student" kind, and only by them.
    """
    name = checkpoint.path.name
    kinds = type(sampler).checkpoint_kinds
    is_student = checkpoint.kind == "student"
    if is_student and "student" not in kinds:
        raise SamplerError(f"{name} is a distilled student: sample it with --sampler student")
    if checkpoint.kind == "ddgan" and "ddgan" not in kinds:
        raise SamplerError(f"{name} is a denoising diffusion GAN: sample it with --sampler ddgan")
    if not is_student and checkpoint.kind not in kinds:
        raise SamplerError(f"{name} is a {checkpoint.kind} checkpoint, not a "
                           + ("distilled student (make one with `ddpmctl distill`)" if "student" in kinds else
                              "denoising diffusion GAN (train one with `ddpmctl train --method ddgan`)")
                           + ": use --sampler ddim, strided or ancestral")
    if is_student:
        student = checkpoint.config.student
        if student is None or checkpoint.config.diffusion.use_timesteps is not None:
            raise SamplerError(f"{name}: a student needs its grid and its full training chain in the checkpoint")
        n = len(student.steps)
        if (steps is not None and steps != n) or (timesteps is not None and sorted(timesteps) != list(student.steps)):
            raise SamplerError(f"{name} is a {n}-step student: omit --steps or pass --steps {n}")
        return tuple(sorted(student.steps, reverse=True))

    chain = _checkpoint_chain(checkpoint)
    total = len(chain)
    if timesteps is not None:
        chosen = sorted({int(t) for t in timesteps})
        outside = [t for t in chosen if t not in set(chain)]
        if not chosen or outside:
            raise SamplerError(f"explicit timesteps must be steps of {name}'s chain "
                               f"({chain[0]}..{chain[-1]}, {total} steps); {outside[:3] or 'none given'} are not")
        if type(sampler).whole_chain and len(chosen) != total:
            raise SamplerError(f"{sampler.name} walks the checkpoint's whole chain of {total} steps")
        return tuple(reversed(chosen))
    if type(sampler).whole_chain:
        if steps is not None and steps != total and checkpoint.kind == "ddgan":
            raise SamplerError(f"{name} is a {total}-step denoising diffusion GAN: omit --steps or pass --steps {total}")
        if steps is not None and steps != total:
            raise SamplerError(
                f"{sampler.name} walks the checkpoint's whole chain of {total} steps, not {steps}: use --sampler "
                f"strided or ddim for fewer steps, or `ddpmctl respace --steps {steps}` first")
        return tuple(reversed(chain))
    default = type(sampler).default_steps
    k = (total if default is None else min(default, total)) if steps is None else steps
    abar = checkpoint.diffusion.alphas_cumprod
    log_snr = [0.5 * (math.log(float(a)) - math.log1p(-float(a))) for a in abar] if sampler.spacing == "logsnr" else None
    span = None if log_snr is None else sampler.log_snr_span(checkpoint.config.diffusion.mean_type, k, log_snr[0])
    positions = choose_timesteps(total, k, sampler.spacing, log_snr=log_snr, log_snr_span=span)
    return tuple(chain[p] for p in sorted(positions, reverse=True))


def build_denoiser(checkpoint: LoadedCheckpoint, timesteps: Sequence[OriginalStep], *, precision: Precision = "fp32",
                   micro_batch: MicroBatch = "auto") -> Denoiser:
    """The :class:`Denoiser` of ``checkpoint`` for a run over ``timesteps`` (its network wrapped for inference:
    ``precision``, ``micro_batch``; see ddpmctl.inference)."""
    model_config = checkpoint.config.model
    network = inference_network(checkpoint.model, _model_device(checkpoint.model), model_config.image_size,
                                model_config.model_channels, precision=precision, micro_batch=micro_batch)
    student = checkpoint.config.student if checkpoint.kind == "student" else None
    latent = model_config.latent
    return Denoiser(network, checkpoint.config.diffusion, timesteps,
                    student_head=student.param if student is not None else None,
                    latent_dim=latent.dim if latent is not None else None)


def check_sample_counts(num: int, batch_size: int, seed: int) -> None:
    """What :func:`generate` accepts for ``num``, ``batch_size`` and ``seed`` (SamplerError naming the option)."""
    if num < 1:
        raise SamplerError(f"--num must be at least 1, not {num}")
    if batch_size < 1:
        raise SamplerError(f"--batch-size must be at least 1, not {batch_size}")
    if seed < 0:
        raise SamplerError(f"--seed must be >= 0, not {seed}")


def generate(checkpoint: LoadedCheckpoint, sampler: Sampler, *, num: int, batch_size: int, seed: int,
             steps: int | None, class_label: int | None = None,
             callback: Callable[[SampleProgress], None] | None = None,
             output: Literal["float", "uint8"] = "float", precision: Precision = "fp32",
             micro_batch: MicroBatch = "auto",
             timesteps: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample ``num`` images in batches; image i depends only on (seed, i), never on ``batch_size``.

    Returns (images [num, C, H, W] on the CPU: float in [-1, 1] or uint8, labels int64 [num] or None). For a
    class-conditional checkpoint the labels are ``class_label`` for every image, or drawn per image from (seed, i).
    ``steps`` / ``timesteps``: see :func:`sampling_timesteps`. ``precision`` "bf16" runs the network under bf16
    autocast (the sampler's arithmetic stays fp32); ``micro_batch`` caps the images per network call ("auto":
    sized for the CPU, see ddpmctl.inference) and, like ``batch_size``, changes an image only at float rounding.
    """
    check_sample_counts(num, batch_size, seed)
    run_steps = sampling_timesteps(checkpoint, sampler, steps, timesteps)  # validates before any network call
    total_steps = len(run_steps)

    model_config = checkpoint.config.model
    num_classes = model_config.num_classes
    if class_label is not None:
        if num_classes is None:
            raise SamplerError(f"{checkpoint.path.name} is not class-conditional: drop --class")
        if not 0 <= class_label < num_classes:
            raise SamplerError(f"--class {class_label} is out of range: the model has classes 0..{num_classes - 1}")
    labels = None
    if num_classes is not None:
        labels = (torch.full((num,), class_label, dtype=torch.int64) if class_label is not None
                  else draw_labels(seed, range(num), num_classes))

    device = _model_device(checkpoint.model)
    denoiser = build_denoiser(checkpoint, run_steps, precision=precision, micro_batch=micro_batch)
    shape = (model_config.in_channels, model_config.image_size, model_config.image_size)
    out_dtype = torch.uint8 if output == "uint8" else torch.float32
    images = torch.empty((num, *shape), dtype=out_dtype)
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        rng = SampleRNG(seed, range(start, stop), device)
        x_T = rng.randn(shape)
        batch_denoiser = denoiser.conditioned(y=labels[start:stop].to(device)) if labels is not None else denoiser

        def on_step(info: StepInfo, start: int = start, stop: int = stop) -> None:
            if callback is not None:
                callback(SampleProgress(images_done=start, num=num, step=info.index + 1, steps=total_steps,
                                        batch_start=start, batch_size=stop - start))

        with torch.no_grad():
            x = sampler.sample(batch_denoiser, x_T, run_steps, noise=rng, callback=on_step)
        x = x.detach().float().cpu()
        if output == "uint8":
            images[start:stop] = model_to_uint8(x)
        else:
            images[start:stop] = x
        if callback is not None:
            callback(SampleProgress(images_done=stop, num=num, step=0, steps=total_steps,
                                    batch_start=stop, batch_size=0))
    return images, labels
