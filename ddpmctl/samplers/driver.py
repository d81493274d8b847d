"""The batching driver of ``ddpmctl sample``: the run's timesteps (chosen once per run), the denoiser, per-image
noise and labels from (seed, image index), and the sampler called batch by batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ddpmctl.choices import Precision
from ddpmctl.denoiser import Denoiser, OriginalStep
from ddpmctl.errors import SamplerError
from ddpmctl.images import model_to_uint8
from ddpmctl.inference import MicroBatch, inference_network
from ddpmctl.samplers.contract import Sampler, SampleRNG, StepInfo
from ddpmctl.seeds import SAMPLE_LABEL, derive_seed
from ddpmctl.timesteps import choose_timesteps

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.checkpoint import LoadedCheckpoint
    from ddpmctl.cld_score import CldScore

# The samplers of CLD checkpoints (kind cld), for the error that names them.
CLD_SAMPLERS = ("sscs", "em", "cld-ode")


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


def _checkpoint_chain(checkpoint: LoadedCheckpoint) -> list[OriginalStep]:
    """The original steps a checkpoint samples over, ascending: its respaced subsequence, or every step 0..T-1."""
    return [int(t) for t in checkpoint.diffusion.timestep_map]


def _check_kind(checkpoint: LoadedCheckpoint, sampler: Sampler, name: str) -> None:
    """SamplerError (one line) when ``sampler`` does not sample checkpoints of this kind, naming the one that does."""
    kinds = type(sampler).checkpoint_kinds
    if checkpoint.kind == "student" and "student" not in kinds:
        raise SamplerError(f"{name} is a distilled student: sample it with --sampler student")
    if checkpoint.kind == "ddgan" and "ddgan" not in kinds:
        raise SamplerError(f"{name} is a denoising diffusion GAN: sample it with --sampler ddgan")
    if checkpoint.kind == "cld" and "cld" not in kinds:
        raise SamplerError(f"{name} is a critically-damped Langevin diffusion: sample it with --sampler "
                           f"{', '.join(CLD_SAMPLERS[:-1])} or {CLD_SAMPLERS[-1]}")
    if checkpoint.kind != "student" and checkpoint.kind not in kinds:
        if "cld" in kinds:
            wanted = "critically-damped Langevin diffusion (train one with `ddpmctl train --method cld`)"
        elif "student" in kinds:
            wanted = "distilled student (make one with `ddpmctl distill`)"
        else:
            wanted = "denoising diffusion GAN (train one with `ddpmctl train --method ddgan`)"
        raise SamplerError(f"{name} is a {checkpoint.kind} checkpoint, not a {wanted}: use --sampler ddim, strided "
                           "or ancestral")


def _cld_countdown(checkpoint: LoadedCheckpoint, sampler: Sampler, steps: int | None,
                   timesteps: Sequence[int] | None) -> tuple[int, ...]:
    """A CLD model is continuous in time: its run is ``steps`` network steps (the sampler's ``default_steps`` when
    None), handed to the sampler as the countdown K-1, ..., 0; the sampler places them in time itself."""
    if timesteps is not None:
        k = len(timesteps)
        if k < 1 or list(timesteps) != list(range(k - 1, -1, -1)):
            raise SamplerError(f"{checkpoint.path.name} is continuous in time (a critically-damped Langevin "
                               "diffusion): choose its steps with --steps, not a list of timesteps")
        if steps is not None and steps != k:
            raise SamplerError(f"--steps {steps} and {k} timesteps disagree")
        return tuple(timesteps)
    k = type(sampler).default_steps if steps is None else steps
    if k is None or k < 1:
        raise SamplerError(f"--steps must be at least 1, not {k}")
    return tuple(range(k - 1, -1, -1))


def sampling_timesteps(checkpoint: LoadedCheckpoint, sampler: Sampler, steps: int | None = None,
                       timesteps: Sequence[int] | None = None) -> tuple[OriginalStep, ...]:
    """The original steps ``sampler`` walks on ``checkpoint``, noisiest first; SamplerError (one line) otherwise.

    ``steps`` is the user's --steps (None: the sampler's ``default_steps``, capped by the chain), spaced over the
    checkpoint's chain by ``sampler.spacing``; ``timesteps`` instead gives an explicit list of steps of the chain.
    A distilled student is sampled on its own grid by samplers that list the "student" kind, and only by them.
    A CLD checkpoint (kind cld) has no chain: its run is the countdown K-1, ..., 0 of ``steps`` network steps
    (``timesteps`` only as that countdown, which is what this function returns), sampled by the cld samplers only.
    """
    name = checkpoint.path.name
    is_student = checkpoint.kind == "student"
    _check_kind(checkpoint, sampler, name)
    if checkpoint.kind == "cld":
        return _cld_countdown(checkpoint, sampler, steps, timesteps)
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
                   micro_batch: MicroBatch = "auto") -> Denoiser | CldScore:
    """The :class:`Denoiser` of ``checkpoint`` for a run over ``timesteps`` (its network wrapped for inference:
    ``precision``, ``micro_batch``; see ddpmctl.inference); for a CLD checkpoint its :class:`CldScore`."""
    model_config = checkpoint.config.model
    network = inference_network(checkpoint.model, _model_device(checkpoint.model), model_config.image_size,
                                model_config.model_channels, precision=precision, micro_batch=micro_batch)
    if checkpoint.kind == "cld":
        from ddpmctl.cld_method import cld_process
        from ddpmctl.cld_score import CldScore

        return CldScore(network, cld_process(checkpoint.config))
    student = checkpoint.config.student if checkpoint.kind == "student" else None
    latent = model_config.latent
    return Denoiser(network, checkpoint.config.diffusion, timesteps,
                    student_head=student.param if student is not None else None,
                    latent_dim=latent.dim if latent is not None else None)


def check_sample_counts(num: int, batch_size: int, seed: int, start_index: int = 0) -> None:
    """What :func:`generate` accepts for ``num``, ``batch_size``, ``seed`` and ``start_index`` (SamplerError naming
    the option)."""
    for flag, value in (("--num", num), ("--batch-size", batch_size)):
        if value < 1:
            raise SamplerError(f"{flag} must be at least 1, not {value}")
    for flag, value in (("--seed", seed), ("--start-index", start_index)):
        if value < 0:
            raise SamplerError(f"{flag} must be at least 0, not {value}")


def generate(checkpoint: LoadedCheckpoint, sampler: Sampler, *, num: int, batch_size: int, seed: int,
             steps: int | None, class_label: int | None = None,
             callback: Callable[[SampleProgress], None] | None = None,
             output: Literal["float", "uint8"] = "float", precision: Precision = "fp32",
             micro_batch: MicroBatch = "auto",
             timesteps: Sequence[int] | None = None,
             start_index: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample images ``start_index`` .. ``start_index + num - 1`` in batches; image i depends only on (seed, i), never
    on ``batch_size``, so shards of one set (``start_index`` 0, n, 2n, ...) concatenate to the whole set.

    Returns (images [num, C, H, W] on the CPU: float in [-1, 1] or uint8, labels int64 [num] or None). For a
    class-conditional checkpoint the labels are ``class_label`` for every image, or drawn per image from (seed, i).
    ``steps`` / ``timesteps``: see :func:`sampling_timesteps`. ``precision`` "bf16" runs the network under bf16
    autocast (the sampler's arithmetic stays fp32); ``micro_batch`` caps the images per network call ("auto":
    sized for the CPU, see ddpmctl.inference) and, like ``batch_size``, changes an image only at float rounding.
    """
    check_sample_counts(num, batch_size, seed, start_index)
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
                  else draw_labels(seed, range(start_index, start_index + num), num_classes))

    device = _model_device(checkpoint.model)
    denoiser = build_denoiser(checkpoint, run_steps, precision=precision, micro_batch=micro_batch)
    shape = (model_config.in_channels, model_config.image_size, model_config.image_size)
    out_dtype = torch.uint8 if output == "uint8" else torch.float32
    images = torch.empty((num, *shape), dtype=out_dtype)
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        rng = SampleRNG(seed, range(start_index + start, start_index + stop), device)
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
