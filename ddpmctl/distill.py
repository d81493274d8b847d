"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) of an IDDPM model into few-step DDIM students.

Discrete-time adaptation (PAPERS.md "Progressive distillation"): the teacher's own abar table over its T training
steps; the N-step grid is k_i = round(i T / N) - 1, i = 1..N (the top step T - 1 has SNR ~ 0), its midpoints
k'_i = round((i - 1/2) T / N) - 1, and index -1 stands for clean data (abar = 1). Starting from a power of two every
grid nests in the previous one. Stage 1's teacher is the trained network run as deterministic DDIM on the
``from_steps`` grid; each stage's student (same architecture, dropout 0, a v / x / "both" head) takes one DDIM step
where its teacher takes two, and becomes the next stage's teacher.

Run folder (``--out``): ``distill.json`` (settings), ``state_{N}.safetensors`` (an unfinished stage: student,
optimizer, iteration, RNG), ``student_{N}.safetensors`` (finished stages), ``report.json`` (the quality report).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ddpmctl.build import build_diffusion, build_model
from ddpmctl.checkpoint import (
    file_sha256,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    save_tensors,
    write_json_atomic,
)
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig, StudentConfig, StudentParam
from ddpmctl.data import load_dataset
from ddpmctl.errors import CheckpointError, ConfigError, OptionError, TrainingError
from ddpmctl.images import uint8_to_model

Weighting = Literal["truncated-snr", "snr+1"]
Head = Literal["eps", "x0", "v", "x", "both"]  # eps / x0 / v: a trained model's mean_type; v / x / both: a student's

RUN_FORMAT = "ddpmctl-distill/1"
CLEAN = -1  # the "timestep" of clean data on a grid: abar = 1, alpha = 1, sigma = 0


# ----------------------------------------------------------------------------------------------------------------
# Grids


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def student_grid(num_timesteps: int, steps: int) -> list[int]:
    """Original indices k_i = round(i T / N) - 1, i = 1..N, ascending (PAPERS.md, discrete-time adaptation).

    Rounding is Python's round of the exact rational i T / N (half to even). The grid for N is the even-numbered
    points of the grid for 2N because i T / N and 2i T / (2N) are the same rational, whatever the rounding rule.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"a grid of {steps} steps needs 1 <= steps <= T = {num_timesteps}")
    return [round(Fraction(i * num_timesteps, steps)) - 1 for i in range(1, steps + 1)]


def midpoint_grid(num_timesteps: int, steps: int) -> list[int]:
    """The teacher's intermediate points k'_i = round((i - 1/2) T / N) - 1, i = 1..N."""
    return [round(Fraction((2 * i - 1) * num_timesteps, 2 * steps)) - 1 for i in range(1, steps + 1)]


def stage_times(num_timesteps: int, steps: int) -> tuple[list[int], list[int], list[int]]:
    """For student steps i = 1..N: (t = k_i, t' = k'_i, t'' = k_{i-1}) with k_0 = -1 (clean data)."""
    grid = student_grid(num_timesteps, steps)
    return grid, midpoint_grid(num_timesteps, steps), [CLEAN] + grid[:-1]


# ----------------------------------------------------------------------------------------------------------------
# Parameterisations and the DDIM step (alpha = sqrt(abar), sigma = sqrt(1 - abar), broadcastable to z)


def student_predict_xstart(model_output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                           param: StudentParam) -> torch.Tensor:
    """x_hat of a distilled student's output (Salimans & Ho Sec. 4): "v", "x" or "both" ([eps-head | x-head]).

    v: x_hat = alpha z - sigma v; x: the first C channels are x_hat; both: x_hat = sigma^2 x_head +
    alpha (z - sigma eps_head), which needs 2C output channels. Not clipped.
    """
    channels = z.shape[1]
    if param == "v":
        return alpha * z - sigma * model_output[:, :channels]
    if param == "x":
        return model_output[:, :channels]
    if param == "both":
        if model_output.shape[1] < 2 * channels:
            raise ValueError(f"param 'both' needs {2 * channels} output channels, got {model_output.shape[1]}")
        eps_head, x_head = model_output[:, :channels], model_output[:, channels:2 * channels]
        return sigma**2 * x_head + alpha * (z - sigma * eps_head)
    raise ValueError(f"unknown student parameterization {param!r} (v, x or both)")


def predict_xstart(model_output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                   head: Head) -> torch.Tensor:
    """x_hat of a trained model (mean_type eps / x0 / v: its first C channels; variance channels ignored) or of a
    student (v / x / both). eps: x_hat = (z - sigma eps) / alpha (PAPERS.md, IDDPM parameterizations)."""
    channels = z.shape[1]
    if head == "eps":
        return (z - sigma * model_output[:, :channels]) / alpha
    if head == "x0":
        return model_output[:, :channels]
    return student_predict_xstart(model_output, z, alpha, sigma, head)


def ddim_step(z: torch.Tensor, pred_xstart: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              alpha_next: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): z_next = alpha_next x_hat + sigma_next eps_hat, eps_hat = (z - alpha x_hat)/sigma.

    With alpha_next = 1, sigma_next = 0 (the step to clean data) it returns x_hat itself.
    """
    eps = (z - alpha * pred_xstart) / sigma
    return alpha_next * pred_xstart + sigma_next * eps


def distillation_target(z_t: torch.Tensor, z_tpp: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
                        alpha_tpp: torch.Tensor, sigma_tpp: torch.Tensor) -> torch.Tensor:
    """x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) (Salimans & Ho Alg. 2).

    The unique x_hat for which one DDIM step from t lands on the teacher's z_t''. For t'' = clean data (alpha 1,
    sigma 0) it is z_t'' itself: the teacher's x_hat at its midpoint.
    """
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


# ----------------------------------------------------------------------------------------------------------------
# A network as an x_hat predictor on original indices


class GridDenoiser:
    """x_hat(z, t) of a network on ORIGINAL training-chain indices t (t = -1: clean data), in fp32 unless z is not.

    ``alphas_cumprod`` is the full training chain's abar table (float64 [T]); ``head`` says what the network's
    first channels mean. Used for both teacher and student so they cannot disagree on a convention.
    """

    def __init__(self, model: torch.nn.Module, head: Head, alphas_cumprod: torch.Tensor) -> None:
        self.model = model
        self.head = head
        # abar with clean data prepended: index t + 1, so t = -1 gives abar = 1.
        self.abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.detach().double().cpu()])

    @property
    def num_timesteps(self) -> int:
        return self.abar.numel() - 1

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t as [N, 1, ..., 1] in like's dtype/device (computed in float64)."""
        abar = self.abar[t.detach().cpu() + 1]
        shape = (-1,) + (1,) * (like.dim() - 1)
        alpha = abar.sqrt().to(like.device, like.dtype).view(shape)
        sigma = (1.0 - abar).sqrt().to(like.device, like.dtype).view(shape)
        return alpha, sigma

    def predict_xstart(self, z: torch.Tensor, t: torch.Tensor, *, clip: bool,
                       model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        output = self.model(z, t.to(z.device), **(model_kwargs or {}))
        alpha, sigma = self.alpha_sigma(t, z)
        x_hat = predict_xstart(output.to(z.dtype), z, alpha, sigma, self.head)
        return x_hat.clamp(-1.0, 1.0) if clip else x_hat

    def step(self, z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, *, clip: bool = True,
             model_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step z_t -> z_{t_next} (per-sample t); returns (z_next, x_hat)."""
        x_hat = self.predict_xstart(z, t, clip=clip, model_kwargs=model_kwargs)
        alpha, sigma = self.alpha_sigma(t, z)
        alpha_next, sigma_next = self.alpha_sigma(t_next, z)
        return ddim_step(z, x_hat, alpha, sigma, alpha_next, sigma_next), x_hat


def ddim_on_grid(denoiser: GridDenoiser, x_T: torch.Tensor, grid: list[int], *, clip: bool = True,
                 model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Deterministic DDIM from noise at grid[-1] down the ascending original indices ``grid``; returns x_hat."""
    z = x_T
    n = x_T.shape[0]
    for j in range(len(grid) - 1, -1, -1):
        t = torch.full((n,), grid[j], dtype=torch.int64)
        t_next = torch.full((n,), grid[j - 1] if j > 0 else CLEAN, dtype=torch.int64)
        z, _ = denoiser.step(z, t, t_next, clip=clip, model_kwargs=model_kwargs)
    return z


def teacher_target(teacher: GridDenoiser, z_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                   t_prev: torch.Tensor, *, clip: bool = True,
                   model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """The student's x_hat target at z_t: two (clipped) teacher DDIM steps t -> t' -> t'', then the inversion."""
    z_mid, _ = teacher.step(z_t, t, t_mid, clip=clip, model_kwargs=model_kwargs)
    z_tpp, _ = teacher.step(z_mid, t_mid, t_prev, clip=clip, model_kwargs=model_kwargs)
    alpha_t, sigma_t = teacher.alpha_sigma(t, z_t)
    alpha_tpp, sigma_tpp = teacher.alpha_sigma(t_prev, z_t)
    return distillation_target(z_t, z_tpp, alpha_t, sigma_t, alpha_tpp, sigma_tpp)


def loss_weight(alpha: torch.Tensor, sigma: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """truncated-snr: max(SNR, 1) (= max of x- and eps-space MSE); snr+1: SNR + 1 (= v-space MSE)."""
    snr = alpha**2 / sigma**2
    if weighting == "truncated-snr":
        return snr.clamp(min=1.0)
    return snr + 1.0


def zero_extra_head(model: torch.nn.Module, channels: int, out_channels: int) -> None:
    """Zero the output conv's channels C..2C (the teacher's variance channels), the "both" student's x-head."""
    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == out_channels:
            last = module
    if last is None:
        raise ConfigError("cannot find the network's output convolution to initialise the x-head of --param both")
    with torch.no_grad():
        last.weight[channels:].zero_()
        if last.bias is not None:
            last.bias[channels:].zero_()


# ----------------------------------------------------------------------------------------------------------------
# Settings, events, results


class DistillConfig(BaseModel):
    """A distillation run (``ddpmctl distill``'s flags); stored in the run folder's distill.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip: float = Field(1.0, gt=0.0)
    flip: bool = True
    seed: int = Field(0, ge=0)
    report_samples: int = Field(64, ge=0)
    save_every: int = Field(200, ge=1)

    # Settings that may change between an interrupted run and its --resume without changing any result.
    # (The checkpoint is compared by its sha256, not by how its path was spelled.)
    RESUMABLE_CHANGES: ClassVar[tuple[str, ...]] = ("checkpoint", "out", "save_every")


@dataclass
class StageReport:
    """One finished stage: its student and how close its samples are to the original teacher's."""

    stage: int
    steps: int
    teacher_steps: int
    iters: int
    loss: float | None  # mean training loss over the stage's last iterations (None when resumed from a finished file)
    seconds: float
    student: str
    student_distance: float | None  # MSE(student N-step samples, teacher from_steps DDIM), [-1, 1] units
    ddim_distance: float | None  # MSE(teacher N-step DDIM on the student's grid, teacher from_steps DDIM)

    @property
    def ratio(self) -> float | None:
        if self.student_distance is None or not self.ddim_distance:
            return None
        return self.student_distance / self.ddim_distance


@dataclass
class DistillEvent:
    """Progress for a caller to render: kind = plan | reference | stage_start | step | stage_end | saved."""

    kind: str
    stage: int = 0
    num_stages: int = 0
    steps: int = 0
    teacher_steps: int = 0
    iteration: int = 0
    total: int = 0
    loss: float | None = None
    lr: float | None = None
    report: StageReport | None = None
    message: str = ""


@dataclass
class DistillResult:
    """The run folder, the per-stage reports and whether it stopped early (state saved, resume with --resume)."""

    out: Path
    from_steps: int
    to_steps: int
    param: str
    stages: list[StageReport] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "from_steps": self.from_steps,
            "to_steps": self.to_steps,
            "param": self.param,
            "interrupted": self.interrupted,
            "stages": [dict(asdict(s), ratio=s.ratio) for s in self.stages],
        }


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _plan(config: DistillConfig, parent: Any) -> tuple[int, str, list[int]]:
    """(from_steps, param, [student steps per stage]) after checking every combination.

    OptionError when the options do not fit the teacher (the CLI exits 2); ConfigError when the teacher itself is
    unusable.
    """
    T = parent.config.diffusion.timesteps
    channels = parent.config.model.in_channels
    out_channels = parent.config.out_channels
    name = Path(config.checkpoint).name
    if parent.kind == "student":
        student = parent.config.student
        own = len(student.steps)
        if student.steps != tuple(student_grid(T, own)):
            raise ConfigError(f"{name}'s step grid is not the k_i = round(i T / N) - 1 grid: cannot distill it further")
        if config.from_steps is not None and config.from_steps != own:
            raise OptionError(f"{name} is a {own}-step student: --from-steps must be {own} (or omitted)")
        from_steps = own
        if config.param is not None and config.param != student.param:
            raise OptionError(f"{name} predicts {student.param!r}: --param must be {student.param} (or omitted)")
        param = student.param
    else:
        from_steps = config.from_steps or min(1024, 1 << (T.bit_length() - 1))
        param = config.param or _default_param(parent.config.diffusion.mean_type, out_channels, channels)
    if not is_power_of_two(from_steps):
        raise OptionError(f"--from-steps {from_steps} is not a power of two (e.g. 256, 512, 1024)")
    if from_steps > T:
        raise OptionError(f"--from-steps {from_steps} exceeds the {T} steps of {name}'s training chain")
    if not is_power_of_two(config.to_steps):
        raise OptionError(f"--to-steps {config.to_steps} is not a power of two (e.g. 1, 2, 4, 8)")
    if config.to_steps >= from_steps:
        raise OptionError(f"--to-steps {config.to_steps} must be smaller than --from-steps {from_steps}")
    if param == "both" and out_channels < 2 * channels:
        raise OptionError(f"--param both needs {2 * channels} output channels but {name} has {out_channels} "
                          "(it was trained with a fixed variance): use --param v or x")
    stages = []
    steps = from_steps
    while steps > config.to_steps:
        steps //= 2
        stages.append(steps)
    return from_steps, param, stages


def _default_param(mean_type: str, out_channels: int, channels: int) -> StudentParam:
    """The head that starts closest to the teacher: its own for a v / x0 model (the student starts as an exact
    copy); for eps (which cannot take the SNR ~ 0 step) "both" with the zero-initialised variance channels as the
    x-head when there are 2C outputs, else v."""
    if mean_type == "v":
        return "v"
    if mean_type == "x0":
        return "x"
    return "both" if out_channels >= 2 * channels else "v"


def _head_of(checkpoint: Any) -> Head:
    if checkpoint.kind == "student":
        return checkpoint.config.student.param
    return checkpoint.config.diffusion.mean_type


def _full_chain(checkpoint: Any) -> DiffusionConfig:
    return checkpoint.config.diffusion.model_copy(update={"use_timesteps": None})


def _teacher_grid(checkpoint: Any, from_steps: int) -> list[int]:
    T = checkpoint.config.diffusion.timesteps
    return student_grid(T, from_steps)


# ----------------------------------------------------------------------------------------------------------------
# Run-folder state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, moments in state["state"].items():
        for key, value in moments.items():
            tensors[f"optim/{index}/{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, json.dumps(state["param_groups"])


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str,
                    device: torch.device) -> None:
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, index, key = name.split("/", 2)
            # Adam keeps "step" on the CPU (unless capturable); the moments live with the parameters.
            moments.setdefault(int(index), {})[key] = value if key == "step" else value.to(device)
    optimizer.load_state_dict({"state": moments, "param_groups": json.loads(groups)})


def _save_stage_state(path: Path, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      generator: torch.Generator, iteration: int, recent: list[float], seconds: float) -> None:
    tensors = {f"model/{k}": v for k, v in student.state_dict().items()}
    optim_tensors, groups = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng/generator"] = generator.get_state()
    save_tensors(path, tensors, {"format": RUN_FORMAT, "iteration": str(iteration), "param_groups": groups,
                                 "recent_losses": json.dumps(recent), "seconds": repr(seconds)}, what="stage state")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------
# The run


def _dataset(config: DistillConfig, model_config: ModelConfig) -> Any:
    if model_config.in_channels not in (1, 3):
        raise ConfigError(f"distillation needs 1- or 3-channel images; the model has {model_config.in_channels}")
    data = load_dataset(config.data, image_size=model_config.image_size,
                        color="gray" if model_config.in_channels == 1 else "rgb",
                        class_cond=model_config.num_classes is not None)
    if data.channels != model_config.in_channels or data.image_size != model_config.image_size:
        raise ConfigError(f"{config.data} gives {data.channels}x{data.image_size}x{data.image_size} images but the "
                          f"model takes {model_config.in_channels}x{model_config.image_size}x{model_config.image_size}")
    if model_config.num_classes is not None:
        if data.labels is None:
            raise ConfigError(f"the model is class-conditional but {config.data} has no class labels")
        if int(data.labels.max()) >= model_config.num_classes:
            raise ConfigError(f"{config.data} has {data.num_classes} classes but the model knows "
                              f"{model_config.num_classes}")
    return data


def _batch(data: Any, batch_size: int, flip: bool, generator: torch.Generator,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random batch in [-1, 1] (with replacement), horizontally flipped per image with probability 1/2."""
    index = torch.randint(len(data.images), (batch_size,), generator=generator)
    x = uint8_to_model(data.images[index])
    if flip:
        mask = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    labels = data.labels[index].to(device) if data.labels is not None else None
    return x.to(device), labels


def _report_noise(config: DistillConfig, shape: tuple[int, ...], num_classes: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(config.seed + 0x5EED_0000)
    noise = torch.randn((config.report_samples, *shape), generator=generator)
    labels = None if num_classes is None else torch.arange(config.report_samples) % num_classes
    return noise, labels


def _sample_in_batches(denoiser: GridDenoiser, noise: torch.Tensor, labels: torch.Tensor | None, grid: list[int],
                       batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, noise.shape[0], batch_size):
            kwargs = None if labels is None else {"y": labels[start:start + batch_size].to(device)}
            out.append(ddim_on_grid(denoiser, noise[start:start + batch_size].to(device), grid,
                                    model_kwargs=kwargs).float().cpu())
    return torch.cat(out)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def _seed_for_stage(seed: int, steps: int) -> int:
    # Each stage has its own stream: a resumed stage never depends on how earlier stages were run.
    return (seed * 1_000_003 + steps * 7_919 + 17) % (2**63)


def _prepare_out(config: DistillConfig, out: Path, settings: dict[str, Any], *, resume: bool, force: bool) -> bool:
    """Create / check the run folder; True when continuing an existing run."""
    marker = out / "distill.json"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if marker.exists():
        if force:
            for pattern in ("state_*.safetensors", "student_*.safetensors", "report.json"):
                for old in out.glob(pattern):
                    old.unlink()
        elif resume:
            saved = _read_json(marker)
            if saved.get("format") != RUN_FORMAT:
                raise ConfigError(f"{marker} was not written by this version of ddpmctl distill")
            previous = saved.get("config", {})
            for key, value in settings["config"].items():
                if key in DistillConfig.RESUMABLE_CHANGES:
                    continue
                if previous.get(key) != value:
                    raise ConfigError(f"--resume: {key} was {previous.get(key)!r} in {out}, now {value!r} "
                                      "(use the same settings, or --force to start over)")
            if saved.get("parent_sha256") != settings["parent_sha256"]:
                raise ConfigError(f"--resume: {config.checkpoint} is not the checkpoint {out} was distilled from")
            return True
        else:
            raise ConfigError(f"{out} already holds a distillation run: pass --resume to continue it or --force "
                              "to start over")
    elif out.exists() and any(out.glob("student_*.safetensors")) and not force:
        raise ConfigError(f"{out} holds student checkpoints of another run: choose an empty --out or pass --force")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror or err}") from None
    write_json_atomic(marker, settings)
    return False


def distill(config: DistillConfig, *, device: torch.device | str = "cpu", resume: bool = False, force: bool = False,
            callback: Callable[[DistillEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> DistillResult:
    """Progressive distillation from ``config.from_steps`` to ``config.to_steps`` (Salimans & Ho Alg. 2).

    Every stage halves the steps, writes ``student_{N}.safetensors`` and a report entry; ``should_stop`` is polled
    every iteration, and when it says so the stage state is saved and the result comes back with interrupted=True.
    """
    device = torch.device(device)
    emit = callback or (lambda event: None)
    stop = should_stop or (lambda: False)

    parent = load_checkpoint(config.checkpoint, device=device)
    from_steps, param, stage_steps = _plan(config, parent)
    T = parent.config.diffusion.timesteps
    model_config = parent.config.model
    channels = model_config.in_channels
    shape = (channels, model_config.image_size, model_config.image_size)
    data = _dataset(config, model_config)
    full_chain = _full_chain(parent)
    alphas_cumprod = build_diffusion(full_chain).alphas_cumprod
    parent_head = _head_of(parent)

    out = Path(config.out)
    settings = {"format": RUN_FORMAT, "config": config.model_dump(mode="json"), "parent_sha256": parent.sha256,
                "from_steps": from_steps, "to_steps": config.to_steps, "param": param, "stages": stage_steps}
    continuing = _prepare_out(config, out, settings, resume=resume, force=force)
    result = DistillResult(out=out, from_steps=from_steps, to_steps=config.to_steps, param=param)
    emit(DistillEvent("plan", num_stages=len(stage_steps), steps=config.to_steps, teacher_steps=from_steps,
                      message=f"{from_steps} -> {config.to_steps} steps in {len(stage_steps)} stages, param {param}"))

    previous_reports: dict[int, dict[str, Any]] = {}
    report_path = out / "report.json"
    if continuing and report_path.exists():
        previous_reports = {int(s["steps"]): s for s in _read_json(report_path).get("stages", [])}

    parent.model.eval().requires_grad_(False)
    original = GridDenoiser(parent.model, parent_head, alphas_cumprod)
    reference = None
    if config.report_samples:
        emit(DistillEvent("reference", teacher_steps=from_steps,
                          message=f"teacher reference: {config.report_samples} samples, {from_steps} DDIM steps"))
        noise, noise_labels = _report_noise(config, shape, model_config.num_classes)
        reference = _sample_in_batches(original, noise, noise_labels, _teacher_grid(parent, from_steps),
                                       config.batch_size, device)

    student_model_config = model_config.model_copy(update={"dropout": 0.0})
    teacher = original
    teacher_name, teacher_sha = parent.path.name, parent.sha256
    lineage = list(parent.lineage)

    for stage, steps in enumerate(stage_steps, start=1):
        student_path = out / f"student_{steps}.safetensors"
        state_path = out / f"state_{steps}.safetensors"
        grid = student_grid(T, steps)
        checkpoint_config = CheckpointConfig(
            model=student_model_config, diffusion=full_chain, data=parent.config.data,
            student=StudentConfig(param=param, steps=tuple(grid), teacher_steps=2 * steps))
        entry = {"op": "distill", "stage": stage, "steps": steps, "teacher_steps": 2 * steps, "param": param,
                 "iters": config.iters_per_stage, "parent": teacher_name, "parent_sha256": teacher_sha}
        student = build_model(checkpoint_config).to(device)

        if continuing and student_path.exists():
            # A finished stage: its file is the next teacher.
            finished = load_checkpoint(student_path, device=device)
            student.load_state_dict(finished.model.state_dict())
            old = previous_reports.get(steps, {})
            report = StageReport(stage=stage, steps=steps, teacher_steps=2 * steps, iters=config.iters_per_stage,
                                 loss=old.get("loss"), seconds=float(old.get("seconds", 0.0)),
                                 student=student_path.name, student_distance=old.get("student_distance"),
                                 ddim_distance=old.get("ddim_distance"))
        else:
            student.load_state_dict(teacher.model.state_dict())
            if stage == 1 and parent.kind != "student" and param == "both":
                zero_extra_head(student, channels, checkpoint_config.out_channels)
            report = _train_stage(
                config, stage=stage, num_stages=len(stage_steps), steps=steps,
                teacher=teacher, student=student, param=param, alphas_cumprod=alphas_cumprod, data=data,
                device=device, state_path=state_path, resume=continuing, emit=emit, stop=stop)
            if report is None:
                result.interrupted = True
                return result
            report.student = student_path.name
            save_checkpoint(student_path, student.state_dict(), checkpoint_config, kind="student",
                            lineage=lineage + [entry])
            state_path.unlink(missing_ok=True)

        student.eval().requires_grad_(False)
        student_denoiser = GridDenoiser(student, param, alphas_cumprod)
        if reference is not None and report.student_distance is None:
            report.student_distance = _distance(
                _sample_in_batches(student_denoiser, noise, noise_labels, grid, config.batch_size, device), reference)
            report.ddim_distance = _distance(
                _sample_in_batches(original, noise, noise_labels, grid, config.batch_size, device), reference)
        result.stages.append(report)
        write_json_atomic(report_path, {**result.to_json(), "parent": str(config.checkpoint),
                                        "reference": {"steps": from_steps, "samples": config.report_samples,
                                                      "seed": config.seed}})
        emit(DistillEvent("stage_end", stage=stage, num_stages=len(stage_steps), steps=steps,
                          teacher_steps=2 * steps, report=report))

        lineage = lineage + [entry]
        teacher = student_denoiser
        teacher_name, teacher_sha = student_path.name, file_sha256(student_path)
    return result


def _train_stage(config: DistillConfig, *, stage: int, num_stages: int, steps: int, teacher: GridDenoiser,
                 student: torch.nn.Module, param: str,
                 alphas_cumprod: torch.Tensor, data: Any, device: torch.device, state_path: Path, resume: bool,
                 emit: Callable[[DistillEvent], None], stop: Callable[[], bool]) -> StageReport | None:
    """One stage: Adam with linear decay to 0, grad clip, no EMA. None when stopped (state saved)."""
    iters = config.iters_per_stage
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(_seed_for_stage(config.seed, steps))
    iteration, recent, seconds = 0, [], 0.0
    if resume and state_path.exists():
        tensors, meta = load_tensors(state_path)
        student.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
        _load_optimizer(optimizer, tensors, meta["param_groups"], device)
        generator.set_state(tensors["rng/generator"])
        iteration = int(meta["iteration"])
        recent = json.loads(meta.get("recent_losses", "[]"))
        seconds = float(meta.get("seconds", "0"))

    student_denoiser = GridDenoiser(student, param, alphas_cumprod)  # type: ignore[arg-type]
    # Student step i (1..N) goes k_i -> k_{i-1}; the teacher passes through the midpoint k'_i on its own grid.
    times = stage_times(alphas_cumprod.numel(), steps)
    starts, mids, ends = (torch.tensor(v, dtype=torch.int64) for v in times)
    window = max(1, min(100, iters // 10))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    emit(DistillEvent("stage_start", stage=stage, num_stages=num_stages, steps=steps, teacher_steps=2 * steps,
                      iteration=iteration, total=iters))
    student.train()
    started = time.perf_counter()
    while iteration < iters:
        if stop():
            _save_stage_state(state_path, student, optimizer, generator, iteration, recent,
                              seconds + time.perf_counter() - started)
            emit(DistillEvent("saved", stage=stage, steps=steps, iteration=iteration, total=iters,
                              message=f"interrupted: stage state saved to {state_path}"))
            return None
        x_start, labels = _batch(data, config.batch_size, config.flip, generator, device)
        i = torch.randint(steps, (config.batch_size,), generator=generator)
        noise = torch.randn(x_start.shape, generator=generator).to(device)
        t, t_mid, t_prev = starts[i], mids[i], ends[i]
        kwargs = None if labels is None else {"y": labels}
        alpha, sigma = student_denoiser.alpha_sigma(t, x_start)
        z_t = alpha * x_start + sigma * noise
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            target = teacher_target(teacher, z_t, t, t_mid, t_prev, model_kwargs=kwargs).float()
        with autocast:
            output = student(z_t, t.to(device), **(kwargs or {}))
        pred = student_predict_xstart(output.float(), z_t, alpha, sigma, param)  # type: ignore[arg-type]
        weight = loss_weight(alpha, sigma, config.weighting).view(-1)
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"stage {stage} ({steps} steps): the loss became {loss.item()} at iteration "
                                f"{iteration}: try a lower --lr")
        lr = config.lr * (1.0 - iteration / iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        optimizer.step()
        iteration += 1
        recent = (recent + [loss.item()])[-window:]
        emit(DistillEvent("step", stage=stage, num_stages=num_stages, steps=steps, teacher_steps=2 * steps,
                          iteration=iteration, total=iters, loss=recent[-1], lr=lr))
        if iteration % config.save_every == 0 and iteration < iters:
            _save_stage_state(state_path, student, optimizer, generator, iteration, recent,
                              seconds + time.perf_counter() - started)
    seconds += time.perf_counter() - started
    return StageReport(stage=stage, steps=steps, teacher_steps=2 * steps, iters=iters,
                       loss=sum(recent) / len(recent) if recent else None, seconds=seconds, student="",
                       student_distance=None, ddim_distance=None)
