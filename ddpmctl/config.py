"""Pydantic models of every configuration: the single source of defaults.

Flags (cli/) -> a frozen model with ``extra="forbid"`` -> keyword arguments of one library function. A checkpoint
stores the :class:`CheckpointConfig` that rebuilds its network and diffusion, so no flag has to be repeated.
This module only describes: it imports pydantic, the standard library and the Literal types of ``ddpmctl.choices``
(itself standard library only), and builds nothing (``ddpmctl.build`` turns these descriptions into networks and
diffusions). Each fact is stored once: the chain length T lives in :class:`DiffusionConfig`, and the network's output channels follow from its input channels
and whether the variance is learned (:attr:`CheckpointConfig.out_channels`).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer, \
    model_validator

from ddpmctl.choices import (
    ChainSchedule,
    CldWeighting,
    ColorMode,
    LossName,
    LossType,
    MeanType,
    EmaWarmup,
    Method,
    NanPolicy,
    PrecisionRequest,
    Schedule,
    StudentParam,
    TimestepSamplerName,
    VarType,
    Weighting,
    is_learned_variance,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


# The largest network `train` builds. A checkpoint's config is bounded by the same numbers, so a file of a few
# hundred bytes cannot describe a network that no training run could have made (and that would cost memory to
# build before its tensors are compared with the file's).
MAX_MODEL_CHANNELS = 4096
MAX_RES_BLOCKS = 16
MAX_HEADS = 64
MAX_CHANNEL_MULT = 16
MAX_LEVELS = 13  # a 4096-pixel image halves 12 times
MAX_CLASSES = 100_000
MAX_TIMESTEPS = 100_000


class _OmitsUnusedExtensions(_Frozen):
    """A model whose later, optional fields (``_EXTENSIONS``) are left out of its JSON while they hold their default,
    so configs, checkpoints and run folders that do not use them stay byte-identical to those written before."""

    _EXTENSIONS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self._EXTENSIONS:
                if name in data and getattr(self, name) == type(self).model_fields[name].default:
                    del data[name]
        return data


class LatentConfig(_Frozen):
    """The latent input z ~ N(0, I_dim) of a DDGAN generator (Xiao et al. 2022 App. C; ``ddpmctl.unet``).

    z goes through PixelNorm and an MLP of ``mlp_layers`` linear layers (SiLU between them) into the U-Net's
    embedding, beside the timestep's, so it acts on every residual block through the scale-shift norms (AdaGN).
    A network with a latent also squashes its output with tanh: it predicts x_0 in [-1, 1].
    """

    dim: int = Field(100, ge=1, le=4096)
    mlp_layers: int = Field(4, ge=1, le=16)


class ModelConfig(_OmitsUnusedExtensions):
    """The IDDPM U-Net's architecture (``ddpmctl.unet.UNetModel``); with a :class:`DiffusionConfig` it rebuilds the
    network (the chain length T and the learned variance's extra output channels come from there). ``latent``
    makes it a DDGAN generator G(x_t, z, t)."""

    _EXTENSIONS: ClassVar[tuple[str, ...]] = ("latent",)

    image_size: int = Field(ge=4, le=4096)  # bounded: an untrusted config must not ask for gigapixel images
    in_channels: int = Field(3, ge=1, le=4)
    model_channels: int = Field(128, ge=1, le=MAX_MODEL_CHANNELS)
    num_res_blocks: int = Field(3, ge=1, le=MAX_RES_BLOCKS)
    attention_resolutions: tuple[int, ...] = Field((16, 8), max_length=MAX_LEVELS)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    channel_mult: tuple[int, ...] = Field((1, 2, 2, 2), max_length=MAX_LEVELS)
    num_heads: int = Field(4, ge=1, le=MAX_HEADS)
    use_scale_shift_norm: bool = True
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)
    latent: LatentConfig | None = None

    @field_validator("channel_mult")
    @classmethod
    def _mult_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _check_mult(v)


def _check_mult(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or any(not 1 <= m <= MAX_CHANNEL_MULT for m in v):
        raise ValueError(f"channel_mult must be a non-empty list of integers from 1 to {MAX_CHANNEL_MULT}")
    return v


class DiffusionConfig(_Frozen):
    """Everything that rebuilds the :class:`~ddpmctl.diffusion.GaussianDiffusion` a checkpoint samples with."""

    schedule: ChainSchedule = "cosine"
    timesteps: int = Field(4000, ge=1, le=MAX_TIMESTEPS)
    mean_type: MeanType = "eps"
    var_type: VarType = "learned_range"
    loss_type: LossType = "rescaled_mse"
    # Sorted original indices of a respaced chain (None: the full chain of ``timesteps`` steps).
    use_timesteps: tuple[int, ...] | None = None

    @field_validator("use_timesteps")
    @classmethod
    def _sorted_unique(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if not v or list(v) != sorted(set(v)) or v[0] < 0:
            raise ValueError("use_timesteps must be a non-empty, strictly increasing list of indices >= 0")
        return v

    @model_validator(mode="after")
    def _in_range(self) -> DiffusionConfig:
        _check_linear_length(self.schedule, self.timesteps)
        if self.use_timesteps is not None and self.use_timesteps[-1] >= self.timesteps:
            raise ValueError(f"use_timesteps reaches {self.use_timesteps[-1]} but timesteps is {self.timesteps}")
        return self

    @property
    def learned_sigma(self) -> bool:
        return is_learned_variance(self.var_type)


def _check_linear_length(schedule: str, timesteps: int) -> None:
    # The linear schedule ends at beta = 0.02 * 1000 / T, which reaches 1 (abar = 0) for T <= 20.
    if schedule == "linear" and timesteps <= 20:
        raise ValueError(f"the linear schedule needs at least 21 timesteps (got {timesteps}): "
                         "its last beta 0.02 * 1000 / T must stay below 1")


class DataInfo(_Frozen):
    """What a model was trained on (kept in checkpoints so eval-nll can find the held-out split)."""

    source: str = Field(max_length=4096)
    image_size: int = Field(ge=1, le=1 << 20)
    channels: int = Field(ge=1, le=4)
    num_images: int = Field(0, ge=0, le=1 << 40)
    class_names: tuple[str, ...] | None = Field(None, max_length=MAX_CLASSES)


class StudentConfig(_Frozen):
    """A progressively distilled student: its step grid (original indices, ascending) and output head."""

    param: StudentParam = "v"
    steps: tuple[int, ...] = Field(min_length=1, max_length=MAX_TIMESTEPS)
    teacher_steps: int = Field(ge=2, le=2 * MAX_TIMESTEPS)

    @model_validator(mode="after")
    def _grid(self) -> StudentConfig:
        if list(self.steps) != sorted(set(self.steps)) or self.steps[0] < 0:
            raise ValueError("student.steps must be strictly increasing indices >= 0")
        if self.teacher_steps != 2 * len(self.steps):
            raise ValueError(f"student.teacher_steps is {self.teacher_steps} but a {len(self.steps)}-step student "
                             f"is distilled from {2 * len(self.steps)} steps")
        return self


class CldConfig(_Frozen):
    """The critically-damped Langevin process of a CLD score network (``ddpmctl.cld.CldProcess``; docs/cld.md):
    mass M (Gamma = 2 sqrt(M), critical damping), the constant beta, v_0 ~ N(0, gamma M), the numerical epsilon on
    the training kernel's variances, and ``t_min``, the smallest time trained on (and where the likelihood's ODE
    starts). The official CIFAR-10 values are the defaults."""

    mass: float = Field(0.25, gt=0.0, le=100.0)
    beta: float = Field(4.0, gt=0.0, le=1000.0)
    gamma: float = Field(0.04, gt=0.0, le=1.0)
    numerical_eps: float = Field(1e-9, ge=0.0, le=1e-2)
    t_min: float = Field(1e-5, gt=0.0, le=0.1)


# The diffusion block of a CLD checkpoint: a CLD network has no chain; T = 1000 only sets the network's time scale
# (the SDE's t in [0, 1] enters its embedding as t * 1000, the scale of the discrete models).
CLD_DIFFUSION = DiffusionConfig(schedule="linear", timesteps=1000, mean_type="eps", var_type="fixed_small",
                                loss_type="mse")


class CheckpointConfig(_OmitsUnusedExtensions):
    """The ``config`` metadata of a checkpoint: rebuilds network + diffusion exactly. ``cld`` makes it a CLD score
    network (its diffusion block is then CLD_DIFFUSION); left out of the JSON when unset."""

    _EXTENSIONS: ClassVar[tuple[str, ...]] = ("cld",)

    model: ModelConfig
    diffusion: DiffusionConfig
    data: DataInfo | None = None
    student: StudentConfig | None = None
    cld: CldConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_model_fields(cls, data: Any) -> Any:
        """Checkpoints of ddpmctl 0.1 also stored T as ``model.num_timesteps`` and the output channels as
        ``model.out_channels``: accepted when they agree with what the rest of the config says, then dropped."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        model = dict(data["model"])
        diffusion = data.get("diffusion") if isinstance(data.get("diffusion"), dict) else {}
        timesteps = diffusion.get("timesteps", DiffusionConfig.model_fields["timesteps"].default)
        if "num_timesteps" in model and model.pop("num_timesteps") != timesteps:
            raise ValueError(f"model.num_timesteps differs from diffusion.timesteps ({timesteps})")
        if "out_channels" in model:
            stored = model.pop("out_channels")
            var_type = diffusion.get("var_type", DiffusionConfig.model_fields["var_type"].default)
            channels = model.get("in_channels", ModelConfig.model_fields["in_channels"].default)
            expected = channels * 2 if is_learned_variance(str(var_type)) else channels
            if stored != expected:
                raise ValueError(f"model.out_channels is {stored} but var_type {var_type} with {channels} input "
                                 f"channel(s) needs {expected}")
        return {**data, "model": model}

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointConfig:
        if self.student is not None and self.student.steps[-1] >= self.diffusion.timesteps:
            raise ValueError(f"student.steps reaches {self.student.steps[-1]} but the chain has "
                             f"{self.diffusion.timesteps} steps")
        data, model = self.data, self.model
        if data is not None and (data.image_size, data.channels) != (model.image_size, model.in_channels):
            raise ValueError(f"data describes {data.channels}-channel {data.image_size}x{data.image_size} images "
                             f"but the model takes {model.in_channels}-channel {model.image_size}x{model.image_size}")
        if data is not None and data.class_names is not None and model.num_classes is not None \
                and len(data.class_names) != model.num_classes:
            raise ValueError(f"data names {len(data.class_names)} classes but the model has {model.num_classes}")
        if self.cld is not None:
            if self.diffusion != CLD_DIFFUSION:
                raise ValueError("a CLD network's diffusion block must be the fixed time scale (linear, 1000 steps, "
                                 "eps, fixed_small, mse)")
            if self.student is not None or model.latent is not None or model.num_classes is not None:
                raise ValueError("a CLD network has no student grid, no latent input and no classes")
        return self

    @property
    def network_in_channels(self) -> int:
        """The network's input channels: the image's C, or 2C for a CLD score network, which reads (x, v)."""
        return 2 * self.model.in_channels if self.cld is not None else self.model.in_channels

    @property
    def out_channels(self) -> int:
        """The network's output channels: the mean's C, and C more for a learned variance (or a "both" student)."""
        channels = self.model.in_channels
        return 2 * channels if self.diffusion.learned_sigma else channels


LOSS_TYPES: dict[str, LossType] = {"hybrid": "rescaled_mse", "simple": "mse", "vlb": "rescaled_kl"}


def default_model_shape(image_size: int) -> dict[str, object]:
    """Model defaults that scale with the image size, as improved-diffusion's ``create_model`` does."""
    if image_size >= 256:
        mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    elif image_size >= 128:
        mult = (1, 1, 2, 3, 4)
    elif image_size >= 64:
        mult = (1, 2, 3, 4)
    elif image_size >= 32:
        mult = (1, 2, 2, 2)
    elif image_size >= 16:
        mult = (1, 2, 2)
    else:
        mult = (1, 2)
    if image_size >= 32:
        # The reference's network at every size from 32x32 up: its attention_resolutions default is 16,8 (its
        # CIFAR-10 and ImageNet-64 runs keep it); (32, 16, 8) is the later guided-diffusion choice.
        channels, blocks = 128, 3
        attention: tuple[int, ...] = (16, 8)
    else:
        # Tiny images: a small, fast network with attention at the bottom. 8x8 (builtin:digits) gets 32 base
        # channels (1.08M parameters; 64 channels are 4.3M, four times the work per step for 1,437 images).
        channels, blocks = (64 if image_size >= 16 else 32), 2
        attention = (image_size // 2,)
    return {"channel_mult": mult, "model_channels": channels, "num_res_blocks": blocks,
            "attention_resolutions": attention}


def halvable_size(size: int, channel_mult: tuple[int, ...] | None = None) -> int:
    """The largest image size at or below ``size`` that the U-Net can halve once per level of ``channel_mult`` (the
    size-scaled default when None), so a size chosen from the data never fails to build (at least 4)."""
    for candidate in range(size, 3, -1):
        levels = len(channel_mult or default_model_shape(candidate)["channel_mult"])  # type: ignore[arg-type]
        if candidate % 2 ** (levels - 1) == 0:
            return candidate
    return size


# Small datasets overfit: below SMALL_DATASET images the small networks of images under 32x32 get dropout 0.1; from
# 32x32 up the paper's network gets the reference's CIFAR-10 dropout of 0.3 below LARGE_DATASET images (CIFAR-10
# has 50,000) and its ImageNet/LSUN dropout of 0 above.
SMALL_DATASET = 20_000
LARGE_DATASET = 200_000


# Built-in data whose mirror image is not a sample of it (a mirrored 2 or 7 is not a digit): no flips by default.
NOT_MIRRORABLE = ("builtin:digits",)


def default_training(image_size: int, num_images: int, data: str = "") -> dict[str, object]:
    """Training defaults that fit the data (``train`` with no model/diffusion flags; explicit values always win).

    - T: 4000 steps (the paper's, for 32x32 and up) but 1000 below 32x32, where a long chain only adds near-identical
      steps to sample and evaluate (bits/dim is summed over T terms).
    - batch and learning rate: 128 (the reference's README for every model of the paper but the 2048-batch
      class-conditional one) at 1e-4 from 16x16 up; below 16x16 the network is small (32 channels) and 2e-4
      converges in a few thousand steps.
    - dropout: from 32x32 up the reference's, 0.3 for CIFAR-sized data (under LARGE_DATASET images) and 0 for
      ImageNet-sized data; below 32x32 0.1 when the dataset has fewer than SMALL_DATASET images, else 0.
    - flips: random horizontal flips (the reference's), except on NOT_MIRRORABLE data.
    The parameterisation stays eps, the paper's, at every size. So 50,000 images of 32x32 with no flags train the
    reference's CIFAR-10 hybrid configuration (examples/configs/cifar10_hybrid.toml, less its fp32 and EMA choices).
    """
    tiny = image_size < 16
    if image_size >= 32:
        dropout = 0.3 if num_images < LARGE_DATASET else 0.0
    else:
        dropout = 0.1 if num_images < SMALL_DATASET else 0.0
    return {
        "timesteps": 4000 if image_size >= 32 else 1000,
        "mean_type": "eps",
        "batch_size": 128,
        "lr": 2e-4 if tiny else 1e-4,
        "dropout": dropout,
        "flip": data not in NOT_MIRRORABLE,
    }


def default_ddgan_training(image_size: int, num_images: int, data: str = "") -> dict[str, object]:
    """``train --method ddgan`` defaults that fit the data (docs/ddgan.md "Optimisation and defaults"; explicit values always win).

    - T = 4, the official CIFAR-10 chain; the generator is train's U-Net for the image size, without dropout (the
      official generators have none: a GAN's discriminator, not dropout, is what keeps it from copying the data).
    - Adam (0.5, 0.9) with the official CIFAR-10 rates, G 1.6e-4 and D 1.25e-4, cosine-decayed to 1e-5 over
      --max-steps; R1 gamma 0.02 every 15 D steps; nz = 100.
    - batch: 64 from 16x16 up (the official per-GPU batch), 128 below, as train's; the discriminator's base width
      64 from 32x32 up (official), 32 below (an 8x8 pair needs one halving to 4x4).
    - flips as train's.
    """
    tiny = image_size < 16
    return {
        "timesteps": 4,
        "mean_type": "x0",
        "batch_size": 128 if tiny else 64,
        "lr": 1.6e-4,
        "dropout": 0.0,
        "flip": data not in NOT_MIRRORABLE,
        "lr_d": 1.25e-4,
        "lr_min": 1e-5,
        "r1_gamma": 0.02,
        "lazy_reg": 15,
        "nz": 100,
        "disc_channels": 64 if image_size >= 32 else 32,
    }


def default_cld_training(image_size: int, num_images: int, data: str = "") -> dict[str, object]:
    """``train --method cld`` defaults (docs/cld.md "Training"; explicit values always win): train's batch, dropout
    and flips for the data; the official learning rate 2e-4 and gradient clipping at 1; the official process
    (CldConfig's defaults) and loss weighting reweightedv2. T and the mean type only fix the network's time scale
    (CLD_DIFFUSION)."""
    chosen = default_training(image_size, num_images, data)
    return {**chosen, "timesteps": CLD_DIFFUSION.timesteps, "mean_type": CLD_DIFFUSION.mean_type, "lr": 2e-4,
            "grad_clip": 1.0, "cld_weighting": "reweightedv2", "cld_mass": CldConfig.model_fields["mass"].default,
            "cld_beta": CldConfig.model_fields["beta"].default, "cld_gamma": CldConfig.model_fields["gamma"].default}


# TrainConfig fields that default to None = "chosen from the data" (default_training / default_model_shape), and
# those only a DDGAN run has (default_ddgan_training), or only a CLD run (default_cld_training).
DATA_DEFAULT_FIELDS = ("timesteps", "mean_type", "batch_size", "lr", "dropout", "flip")
# TrainConfig fields that default to None = "scaled with the image size" (default_model_shape).
NETWORK_SHAPE_FIELDS = ("model_channels", "channel_mult", "res_blocks", "attention_resolutions")
DDGAN_FIELDS = ("lr_d", "lr_min", "r1_gamma", "lazy_reg", "nz", "disc_channels")
CLD_FIELDS = ("cld_weighting", "cld_mass", "cld_beta", "cld_gamma")
# The IDDPM options that describe a discrete chain: `--method cld` refuses them when given (cli.train), also at
# their default values.
DISCRETE_CHAIN_FIELDS = ("schedule", "timesteps", "mean_type", "var_type", "loss", "timestep_sampler")
# What `--method ddgan` leaves to the generator and the posterior: IDDPM-only options it refuses when given.
IDDPM_ONLY_FIELDS = ("schedule", "var_type", "loss", "timestep_sampler", "weight_decay")
# A DDGAN chain is short: the generator replaces thousands of small steps by a few large ones.
DDGAN_MAX_TIMESTEPS = 64


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s)?", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*[dhms]?\s*)+$", re.IGNORECASE)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> float:
    """'90' / '90s' / '10m' / '1.5h' / '2d' / '1h30m' / '1h 30m 10s' -> seconds (a bare number is seconds)."""
    parts = _DURATION_PART.findall(text) if _DURATION.match(text) else []
    if not parts or (len(parts) > 1 and any(not unit for _, unit in parts)):  # '1h30' is ambiguous: refused
        raise ValueError(f"cannot read {text!r} as a duration (e.g. 90s, 10m, 2h, 1h30m)")
    seconds = sum(float(number) * _SECONDS[(unit or "s").lower()] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as parse_duration reads them back: 5400 -> '1h30m', 240 -> '4m', 90.5 -> '1m30.5s'."""
    whole, fraction = divmod(seconds, 1)
    hours, rest = divmod(int(whole), 3600)
    minutes, secs = divmod(rest, 60)
    secs_text = f"{secs + fraction:g}s" if secs or fraction else ""
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + secs_text or "0s"


class TrainConfig(_OmitsUnusedExtensions):
    """A training run, as resolved from ``--config FILE.toml`` and flags (flags win). Saved in the run folder.

    ``method`` ddgan trains a denoising diffusion GAN (docs/ddgan.md): ``lr`` is then the generator's, and the
    DDGAN_FIELDS configure the discriminator and its regulariser. Those fields, and ``method`` itself, are left
    out of an IDDPM run's config.json.
    """

    _EXTENSIONS: ClassVar[tuple[str, ...]] = ("method", *DDGAN_FIELDS, *CLD_FIELDS)

    method: Method = "iddpm"
    data: str
    out: str | None = None
    image_size: int | None = Field(None, ge=4, le=1024)
    color: ColorMode = "auto"
    class_cond: bool = False
    flip: bool | None = None  # None: random flips, except on data a mirror does not preserve (default_training)
    skip_bad_images: bool = False

    schedule: Schedule = "cosine"
    # None: chosen from the image size and the number of images (default_training), fixed in the run folder.
    timesteps: int | None = Field(None, ge=2, le=MAX_TIMESTEPS)
    mean_type: MeanType | None = None
    var_type: VarType = "learned_range"
    loss: LossName = "hybrid"
    timestep_sampler: TimestepSamplerName = "uniform"

    model_channels: int | None = Field(None, ge=8, le=MAX_MODEL_CHANNELS)
    channel_mult: tuple[int, ...] | None = Field(None, max_length=MAX_LEVELS)
    res_blocks: int | None = Field(None, ge=1, le=MAX_RES_BLOCKS)
    attention_resolutions: tuple[int, ...] | None = Field(None, max_length=MAX_LEVELS)
    heads: int = Field(4, ge=1, le=MAX_HEADS)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)

    batch_size: int | None = Field(None, ge=1, le=65536)
    lr: float | None = Field(None, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    ema: float = Field(0.9999, ge=0.0, lt=1.0)
    ema_warmup: EmaWarmup = "power"
    grad_clip: float | None = Field(None, gt=0.0)
    max_steps: int | None = Field(None, ge=1)
    max_time: float | None = Field(None, gt=0.0, description="seconds")
    save_every: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1, description="steps between sample-quality probes; None: off")
    eval_num: int = Field(300, ge=4, le=100_000)
    eval_steps: int = Field(20, ge=1)
    precision: PrecisionRequest = "auto"
    seed: int = Field(0, ge=0)
    nan_policy: NanPolicy = "stop"
    # A checkpoint whose weights the run starts from (fine-tuning: new optimizer, step 0); ddpmctl.finetune.
    init_from: str | None = None
    # Periodic rank-0 work (ddpmctl.watch): a sample grid every N steps, the held-out loss every N steps.
    preview_every: int | None = Field(None, ge=1)
    val_every: int | None = Field(None, ge=1)
    val_data: str | None = None

    # --method ddgan only (None: chosen by default_ddgan_training).
    lr_d: float | None = Field(None, gt=0.0, le=1.0)
    lr_min: float | None = Field(None, ge=0.0, le=1.0)
    r1_gamma: float | None = Field(None, ge=0.0)
    lazy_reg: int | None = Field(None, ge=1)
    nz: int | None = Field(None, ge=1, le=4096)
    disc_channels: int | None = Field(None, ge=4, le=1024)

    # --method cld only (None: chosen by default_cld_training; bounds as CldConfig's).
    cld_weighting: CldWeighting | None = None
    cld_mass: float | None = Field(None, gt=0.0, le=100.0)
    cld_beta: float | None = Field(None, gt=0.0, le=1000.0)
    cld_gamma: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("attention_resolutions")
    @classmethod
    def _positive_ints(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and any(x < 1 for x in v):
            raise ValueError("must be positive integers")
        return v

    @field_validator("channel_mult")
    @classmethod
    def _mult(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return v if not v else _check_mult(v)

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        return parse_duration(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        given_cld = [f"--{f.replace('_', '-')}" for f in CLD_FIELDS if getattr(self, f) is not None]
        if given_cld and self.method != "cld":
            raise ValueError(f"{', '.join(given_cld)} configure(s) a CLD run: add --method cld")
        if self.method == "ddgan":
            return self._ddgan_combinations()
        given = [f"--{f.replace('_', '-')}" for f in DDGAN_FIELDS if getattr(self, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} configure(s) a DDGAN run: add --method ddgan")
        if self.method == "cld":
            return self._cld_combinations()
        if self.timesteps is not None:
            _check_linear_length(self.schedule, self.timesteps)
        learned = is_learned_variance(self.var_type)
        if self.loss == "hybrid" and not learned:
            raise ValueError("--loss hybrid trains a learned variance: use --var-type learned-range "
                             "(or learned), or --loss simple for a fixed variance")
        if self.loss == "vlb" and not learned:
            raise ValueError("--loss vlb needs a learned variance (--var-type learned-range or learned)")
        if self.val_every is not None and self.val_data is None and not self.data.startswith("builtin:"):
            raise ValueError("--val-every needs held-out images: name a folder the run does not train on with "
                             "--val-data DIR")
        return self

    def _ddgan_combinations(self) -> TrainConfig:
        if self.timesteps is not None and self.timesteps > DDGAN_MAX_TIMESTEPS:
            raise ValueError(f"--method ddgan trains a chain of a few steps (2-8 in the paper), at most "
                             f"{DDGAN_MAX_TIMESTEPS}, not {self.timesteps}")
        changed = [f"--{f.replace('_', '-')}" for f in IDDPM_ONLY_FIELDS
                   if getattr(self, f) != type(self).model_fields[f].default]
        if changed:
            raise ValueError(f"{', '.join(changed)} do(es) not apply to --method ddgan (its chain is DDGAN's VP-SDE, "
                             "its objective a GAN's): drop it")
        if self.mean_type not in (None, "x0"):
            raise ValueError("--method ddgan: the generator predicts x0; drop --mean-type")
        if self.class_cond:
            raise ValueError("--method ddgan trains an unconditional generator: drop --class-cond")
        return self

    def _cld_combinations(self) -> TrainConfig:
        changed = [f"--{f.replace('_', '-')}" for f in ("schedule", "var_type", "loss", "timestep_sampler")
                   if getattr(self, f) != type(self).model_fields[f].default]
        if self.timesteps is not None and self.timesteps != CLD_DIFFUSION.timesteps:
            changed.append("--timesteps")
        if self.mean_type not in (None, CLD_DIFFUSION.mean_type):
            changed.append("--mean-type")
        if changed:
            raise ValueError(f"{', '.join(changed)} do(es) not apply to --method cld (a continuous-time SDE whose "
                             "network learns the velocity's score; see --cld-weighting): drop it")
        if self.class_cond:
            raise ValueError("--method cld trains an unconditional model: drop --class-cond")
        if self.init_from is not None:
            raise ValueError("--init-from fine-tunes a diffusion model: it does not apply to --method cld")
        return self

    def make_cld_config(self) -> CldConfig | None:
        """The process of a CLD run (None for the other methods)."""
        if self.method != "cld":
            return None
        values = {"mass": self.cld_mass, "beta": self.cld_beta, "gamma": self.cld_gamma}
        return CldConfig(**{k: v for k, v in values.items() if v is not None})

    @property
    def loss_type(self) -> LossType:
        return LOSS_TYPES[self.loss]

    def with_data_defaults(self, *, image_size: int, num_images: int) -> TrainConfig:
        """This config with every None of DATA_DEFAULT_FIELDS (and, for DDGAN, of DDGAN_FIELDS) replaced by the
        value chosen for the data and the method."""
        if self.method == "ddgan":
            chosen = default_ddgan_training(image_size, num_images, self.data)
            fields: tuple[str, ...] = (*DATA_DEFAULT_FIELDS, *DDGAN_FIELDS)
        elif self.method == "cld":
            chosen = default_cld_training(image_size, num_images, self.data)
            fields = (*DATA_DEFAULT_FIELDS, *CLD_FIELDS, "grad_clip")
        else:
            chosen, fields = default_training(image_size, num_images, self.data), DATA_DEFAULT_FIELDS
        fill = {field: chosen[field] for field in fields if getattr(self, field) is None}
        return self.model_copy(update=fill) if fill else self

    def make_diffusion_config(self) -> DiffusionConfig:
        if self.timesteps is None or self.mean_type is None:
            raise ValueError("resolve the data defaults first (with_data_defaults)")
        if self.method == "ddgan":
            # The generator's x_0' goes through the posterior q(x_{t-1} | x_t, x_0'): the fixed_small reverse step.
            return DiffusionConfig(schedule="vp-sde", timesteps=self.timesteps, mean_type="x0",
                                   var_type="fixed_small", loss_type="mse")
        if self.method == "cld":
            return CLD_DIFFUSION
        return DiffusionConfig(schedule=self.schedule, timesteps=self.timesteps, mean_type=self.mean_type,
                               var_type=self.var_type, loss_type=self.loss_type)

    def make_model_config(self, *, image_size: int, channels: int, num_classes: int | None) -> ModelConfig:
        """The U-Net for this run: explicit options first, then the size-scaled defaults."""
        if self.timesteps is None or self.dropout is None:
            raise ValueError("resolve the data defaults first (with_data_defaults)")
        shape = default_model_shape(image_size)
        return ModelConfig(
            image_size=image_size,
            in_channels=channels,
            model_channels=self.model_channels or shape["model_channels"],
            num_res_blocks=self.res_blocks or shape["num_res_blocks"],
            attention_resolutions=(self.attention_resolutions if self.attention_resolutions is not None
                                   else shape["attention_resolutions"]),
            dropout=self.dropout,
            channel_mult=self.channel_mult or shape["channel_mult"],
            num_heads=self.heads,
            num_classes=num_classes if self.class_cond else None,
            latent=LatentConfig(dim=self.nz) if self.method == "ddgan" and self.nz is not None else None,
        )


class DistillConfig(_Frozen):
    """A distillation run (``ddpmctl distill``'s flags); stored in the run folder's distill.json."""

    checkpoint: str
    data: str
    out: str
    from_steps: int | None = Field(None, ge=2, description="None: 1024 (or T's largest power of two), or a "
                                                           "student's own N")
    to_steps: int = Field(4, ge=1)
    iters_per_stage: int = Field(ge=1)
    batch_size: int = Field(64, ge=1, le=65536)
    lr: float = Field(5e-5, gt=0.0, le=1.0)
    param: StudentParam | None = Field(None, description="None: v for a v model, x for an x0 model; for eps: both "
                                                         "with 2C outputs, else v")
    weighting: Weighting = "truncated-snr"
    teacher_clip: bool | None = Field(None, description="clamp the teacher's x_hat to [-1, 1] in its two DDIM "
                                                        "steps; None: only in an eps model's lineage")
    # The request, resolved on each device (so a resumed auto run may continue in another precision).
    precision: PrecisionRequest = "fp32"
    grad_clip: float = Field(1.0, gt=0.0)
    flip: bool = True
    seed: int = Field(0, ge=0)
    report_samples: int = Field(64, ge=0)
    save_every: int = Field(200, ge=1)
