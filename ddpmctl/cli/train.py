"""`ddpmctl train DATA`: flags (+ ``--config FILE``) -> TrainConfig -> ddpmctl.train.train, with progress.

Layers, lowest first: TrainConfig's defaults, the ``--config`` file (TOML, or a run's own ``config.json``), the
saved run with ``--resume``, then the options actually given on the command line. Every option shows its real
default in ``--help``; whether it was *given* is asked of click (the parameter's source), so a default never
overrides a value from a lower layer.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer

from ddpmctl.choices import (CldWeighting, ColorMode, EmaWarmup, LossName, MeanType, Method, NanPolicy, PrecisionRequest, Schedule,
                             TimestepSamplerName)
from ddpmctl.cli.common import console, device_option, given, guarded, print_json, resolve_device, usage_error
from ddpmctl.errors import validation_problem

try:  # Python >= 3.11
    import tomllib
except ImportError:  # Python 3.10: the same parser as a package (dependency with python_version < "3.11")
    import tomli as tomllib  # type: ignore[no-redef]

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import ValidationError

    from ddpmctl.config import TrainConfig

# The command line spells the variance types with hyphens (tests/test_cli_options.py keeps them equal to the
# config's, whose other choices the CLI takes from ddpmctl.choices as they are).
VarType = Literal["learned-range", "fixed-small", "fixed-large", "learned"]

# Options whose value is a comma-separated list of integers.
_INT_LISTS = ("channel_mult", "attention_resolutions")
# Options spelled with hyphens on the command line but stored with underscores, and the reverse: files may use
# either spelling (learned-range / learned_range, loss-second-moment / loss_second_moment).
_HYPHEN_VALUES = ("var_type",)
_UNDERSCORE_VALUES = ("timestep_sampler",)
_FIELD_FLAGS = {"data": "DATA", "flip": "--flip/--no-flip"}
# Parameters of train_command that are not TrainConfig fields.
_NOT_FIELDS = ("config_file", "resume", "force", "device", "quiet", "json_output")


def _flag(field: str) -> str:
    return _FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))


def _int_list(field: str, text: str) -> list[int]:
    """'1,2,2,2' -> [1, 2, 2, 2]; '' or 'none' -> [] (e.g. no attention)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise usage_error(f"{_flag(field)}: expected comma-separated integers like 1,2,2,2, not {text!r}") from None


def _normalise(values: dict[str, Any]) -> dict[str, Any]:
    """CLI/TOML spellings -> TrainConfig values (lists of ints, learned-range -> learned_range)."""
    out = dict(values)
    for field in _INT_LISTS:
        if isinstance(out.get(field), str):
            out[field] = _int_list(field, out[field])
    for field in _HYPHEN_VALUES:
        if isinstance(out.get(field), str):
            out[field] = out[field].replace("-", "_")
    for field in _UNDERSCORE_VALUES:
        if isinstance(out.get(field), str):
            out[field] = out[field].replace("_", "-")
    return out


def _parse_config_file(path: Path) -> dict[str, Any]:
    """The raw key/value table of ``--config``: TOML, or JSON (a run's ``config.json``: its ``train`` section).

    A run folder stands for its ``config.json``. A run's ``out`` is dropped: the new run needs its own folder.
    Only a regular file of at most 1 MiB is read (a named pipe or a device is refused, never read from).
    """
    from ddpmctl.errors import ConfigError
    from ddpmctl.runfiles import parse_json, read_small_text

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise usage_error(f"--config {path}: is a folder without a config.json, not a config file")
        path = path / "config.json"
    try:
        text = read_small_text(path)
        if path.suffix.lower() == ".json" or text.lstrip()[:1] == "{":
            raw = parse_json(text, path)
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a JSON object of options")
            if isinstance(raw.get("train"), dict):  # a run folder's config.json
                raw = {key: value for key, value in raw["train"].items() if key != "out"}
            return raw
        return tomllib.loads(text)
    except ConfigError as err:
        raise usage_error(f"--config {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise usage_error(f"--config {path}: not valid TOML ({err})") from None
    except RecursionError:
        raise usage_error(f"--config {path}: not valid TOML (nested too deeply)") from None


def _file_value(path: Path, field: str, value: Any, fields: Any) -> Any:
    """A ``--config`` value checked exactly as the option's value is: the field's type without coercion (an int
    is not ``true`` or ``2.0``, a flag is a boolean), its choices and its range. One line, exit 2, otherwise."""
    from pydantic import TypeAdapter, ValidationError

    from ddpmctl.config import parse_duration

    if field in _INT_LISTS and isinstance(value, list):
        value = tuple(value)
    if field == "max_time" and isinstance(value, str):
        try:
            value = parse_duration(value)
        except ValueError as err:
            raise usage_error(f"--config {path}: {field}: {err}") from None
    info = fields[field]
    try:
        return TypeAdapter(Annotated[info.annotation, info]).validate_python(value, strict=True)
    except ValidationError as err:
        problem = validation_problem(err, lambda loc: field + "".join(f"[{i}]" for i in loc), show_input=True)
        raise usage_error(f"--config {path}: {problem}") from None


def _read_config_file(path: Path, fields: Any) -> dict[str, Any]:
    """``--config FILE``: keys are TrainConfig field names (hyphens accepted); unknown keys and values the option
    would not take are usage errors."""
    values: dict[str, Any] = {}
    for key, value in _parse_config_file(path).items():
        field = key.replace("-", "_")
        if field not in fields:
            raise usage_error(f"--config {path}: unknown key {key[:40]!r} (keys are the option names, e.g. "
                              "batch_size, lr, max_steps)")
        values[field] = value
    return {field: _file_value(path, field, value, fields) for field, value in _normalise(values).items()}


def _validation_line(err: ValidationError) -> str:
    """The first pydantic problem as one line naming the option."""
    return validation_problem(err, lambda loc: _flag(str(loc[0])) if loc else "", show_input=True)


def _default_out(data: str) -> str:
    """runs/<data name>-<timestamp> (builtin:digits -> digits)."""
    name = data.split(":", 1)[1] if data.startswith("builtin:") else Path(data.rstrip("/\\")).name or "data"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


class _ProgressView:
    """Renders TrainEvents on stderr: step/total, loss, img/s, ETA (elapsed/remaining time for --max-time only)."""

    def __init__(self, config: TrainConfig) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.config = config
        self.by_time = config.max_steps is None
        fields = "loss {task.fields[loss]}  {task.fields[speed]}{task.fields[quality]}"
        if self.by_time:
            columns: list[Any] = [TextColumn("step {task.fields[step]}"), BarColumn(), TimeElapsedColumn(),
                                  TextColumn("/ {task.fields[budget]}"), TextColumn(fields)]
        else:
            columns = [TextColumn("step {task.completed:.0f}/{task.total:.0f}"), BarColumn(),
                       TextColumn(fields), TextColumn("ETA {task.fields[eta]}")]
        self.progress = Progress(*columns, console=console, transient=False)
        self.task: Any = None  # a rich TaskID once training has started
        self.rate: float | None = None

    def __enter__(self) -> _ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.__exit__(*exc)

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = max(0, int(seconds))
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def __call__(self, event: Any) -> None:
        if event.kind == "warning":
            self.progress.console.print(f"warning: {event.message}", markup=False, highlight=False, soft_wrap=True)
            return
        if event.kind == "start":
            # The bar appears once set-up (data, folder checks) has succeeded, so errors print alone.
            out = self.config.out
            what = f"resuming {out} at step {event.step}" if event.step else f"training in {out}"
            console.print(f"{what} ({event.message})", markup=False, highlight=False)
            self.progress.__enter__()
            total = self.config.max_time if self.by_time else self.config.max_steps
            self.task = self.progress.add_task("train", total=total, completed=0 if self.by_time else event.step,
                                               loss="-", speed="", eta="-", step=event.step, quality="",
                                               budget=("no limit: Ctrl-C saves and stops" if self.config.max_time is None
                                                       else self._clock(self.config.max_time)))
            self.start_step, self.start_time = event.step, event.elapsed
            return
        if self.task is None:
            return
        if event.kind == "log" and event.metrics and "eval_fd" in event.metrics:
            m = event.metrics
            name = "FID" if m["eval_features"] == "inception" else "FD"
            self.progress.update(self.task, quality=f"  {name} {m['eval_fd']:.2f} (step {m['step']})")
        elif event.kind == "log" and event.metrics:
            m = event.metrics
            self.progress.update(self.task, loss=f"{m['loss']:.4f}",
                                 speed=f"{m['img_per_s']:.0f} img/s {m.get('precision', '')}".rstrip())
        if event.kind in ("step", "log", "end"):
            if self.by_time:
                self.progress.update(self.task, completed=min(event.elapsed, self.config.max_time or 0),
                                     step=event.step)
            else:
                done = event.step - self.start_step
                remaining = (self.config.max_steps or 0) - event.step
                eta: float | None = None
                if done > 0:
                    eta = remaining * (event.elapsed - self.start_time) / done
                if self.config.max_time is not None:
                    left = self.config.max_time - event.elapsed
                    eta = left if eta is None else min(eta, left)
                self.progress.update(self.task, completed=event.step, eta="-" if eta is None else self._clock(eta))


def _opt(*names: str, **kwargs: Any) -> Any:
    """typer.Option in the "Model" / "Diffusion" / ... help panels."""
    return typer.Option(*names, **kwargs)


_DATA, _DIFFUSION, _NETWORK, _OPTIMISATION, _RUN = "Data", "Diffusion", "Network", "Optimisation", "Run"
_DDGAN = "DDGAN (--method ddgan; docs/ddgan.md)"
_CLD = "CLD (--method cld; docs/cld.md)"
_SCALED = "scaled with the image size, like the reference's"
_CHOSEN = "chosen from the data (README: Defaults that fit the data)"


@guarded
def train_command(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(  # noqa: UP007 - typer needs Optional on 3.10
        help="Image folder or builtin:digits (optional with --resume or a --config that sets data).",
        show_default=False)] = None,
    out: Annotated[Optional[str], _opt(  # noqa: UP007
        "--out", "-o", metavar="DIR", help="Run folder.", show_default="runs/<data>-<time>",
        rich_help_panel=_RUN)] = None,
    config_file: Annotated[Optional[Path], _opt(  # noqa: UP007
        "--config", metavar="FILE|RUN", show_default=False, rich_help_panel=_RUN,
        help="Options from a TOML file (keys = option names with underscores), or from a run's config.json "
             "(or the run folder itself) to reuse its settings; options given here override it.")] = None,
    method: Annotated[Method, _opt(
        "--method", help="iddpm: an Improved-DDPM diffusion model; ddgan: a denoising diffusion GAN (Xiao et al. "
        "2022) that samples in T = 2-8 generator steps (sample it with --sampler ddgan); cld: critically-damped "
        "Langevin diffusion (Dockhorn et al. 2022; sample it with --sampler sscs, em or cld-ode).",
        rich_help_panel=_RUN)] = "iddpm",
    image_size: Annotated[Optional[int], _opt(  # noqa: UP007
        "--image-size", help="Resize/crop to this size.", show_default="the data's",
        rich_help_panel=_DATA)] = None,
    color: Annotated[ColorMode, _opt("--color", help="1 or 3 channels (auto: 1 when every image is grayscale).",
                                     rich_help_panel=_DATA)] = "auto",
    class_cond: Annotated[bool, _opt("--class-cond/--no-class-cond", help="Condition on class labels (sub-folder "
                                     "names).", rich_help_panel=_DATA)] = False,
    flip: Annotated[Optional[bool], _opt(  # noqa: UP007
        "--flip/--no-flip", help="Random horizontal flips.", show_default="on, except for builtin:digits",
        rich_help_panel=_DATA)] = None,
    skip_bad_images: Annotated[bool, _opt("--skip-bad-images/--no-skip-bad-images", help="Skip unreadable images "
                                          "(counted) instead of stopping.", rich_help_panel=_DATA)] = False,
    schedule: Annotated[Schedule, _opt("--schedule", help="Beta schedule.", rich_help_panel=_DIFFUSION)] = "cosine",
    timesteps: Annotated[Optional[int], _opt(  # noqa: UP007
        "--timesteps", help="Diffusion steps T.", show_default=f"{_CHOSEN}: 1000 below 32x32, else 4000",
        rich_help_panel=_DIFFUSION)] = None,
    mean_type: Annotated[Optional[MeanType], _opt(  # noqa: UP007
        "--mean-type", help="What the network predicts.", show_default="eps", rich_help_panel=_DIFFUSION)] = None,
    var_type: Annotated[VarType, _opt("--var-type", help="Reverse-process variance.", rich_help_panel=_DIFFUSION)
                        ] = "learned-range",
    loss: Annotated[LossName, _opt("--loss", help="hybrid = L_simple + L_vlb/1000 (IDDPM's L_hybrid); simple = "
                                   "L_simple, the mse of the mean, plus with a learned variance its KL term unscaled "
                                   "(improved-diffusion's mse loss); vlb = L_vlb alone.", rich_help_panel=_DIFFUSION)
                        ] = "hybrid",
    timestep_sampler: Annotated[TimestepSamplerName, _opt("--timestep-sampler", help="How t is drawn.",
                                                      rich_help_panel=_DIFFUSION)] = "uniform",
    model_channels: Annotated[Optional[int], _opt(  # noqa: UP007
        "--model-channels", help="Base width.", show_default=_SCALED, rich_help_panel=_NETWORK)] = None,
    channel_mult: Annotated[Optional[str], _opt(  # noqa: UP007
        "--channel-mult", metavar="1,2,2,2", help="Width multiplier per resolution.",
        show_default=_SCALED, rich_help_panel=_NETWORK)] = None,
    res_blocks: Annotated[Optional[int], _opt(  # noqa: UP007
        "--res-blocks", help="Residual blocks per resolution.", show_default=_SCALED,
        rich_help_panel=_NETWORK)] = None,
    attention_resolutions: Annotated[Optional[str], _opt(  # noqa: UP007
        "--attention-resolutions", metavar="16,8", help="Feature-map sizes with self-attention, or none.",
        show_default=_SCALED, rich_help_panel=_NETWORK)] = None,
    heads: Annotated[int, _opt("--heads", help="Attention heads.", rich_help_panel=_NETWORK)] = 4,
    dropout: Annotated[Optional[float], _opt(  # noqa: UP007
        "--dropout", help="Dropout.", show_default=f"{_CHOSEN}: 0.1 under 20,000 images, else 0",
        rich_help_panel=_NETWORK)] = None,
    batch_size: Annotated[Optional[int], _opt(  # noqa: UP007
        "--batch-size", "-b", help="Global batch, split among torchrun ranks.",
        show_default=f"{_CHOSEN}: 128 below 16x16, else 64", rich_help_panel=_OPTIMISATION)] = None,
    lr: Annotated[Optional[float], _opt(  # noqa: UP007
        "--lr", help="AdamW learning rate.", show_default=f"{_CHOSEN}: 2e-4 below 16x16, else 1e-4",
        rich_help_panel=_OPTIMISATION)] = None,
    weight_decay: Annotated[float, _opt("--weight-decay", help="AdamW weight decay.",
                                        rich_help_panel=_OPTIMISATION)] = 0.0,
    ema: Annotated[float, _opt("--ema", metavar="RATE", help="EMA rate (with the warm-up: the cap of its growing "
                               "decay).", rich_help_panel=_OPTIMISATION)] = 0.9999,
    ema_warmup: Annotated[EmaWarmup, _opt(
        "--ema-warmup", help="power: decay min(rate, 1-(1+t)^-2/3), so the average starts at the first trained "
        "weights; none: improved-diffusion's EMA, which starts at the random init.",
        rich_help_panel=_OPTIMISATION)] = "power",
    grad_clip: Annotated[Optional[float], _opt(  # noqa: UP007
        "--grad-clip", metavar="NORM", help="Clip the global gradient norm (the norm is logged always).",
        show_default="no clipping", rich_help_panel=_OPTIMISATION)] = None,
    precision: Annotated[PrecisionRequest, _opt("--precision", help="bf16: autocast for the network; weights, optimizer "
                                         "and losses stay fp32. auto: bf16 where the device has it natively (CUDA "
                                         "with bf16, a CPU with AVX-512-BF16 or AMX), else fp32.",
                                         rich_help_panel=_OPTIMISATION)] = "auto",
    nan_policy: Annotated[NanPolicy, _opt("--nan-policy", help="On a non-finite loss: stop (keeping the last "
                                          "checkpoint) or skip the step.", rich_help_panel=_OPTIMISATION)] = "stop",
    lr_d: Annotated[Optional[float], _opt(  # noqa: UP007
        "--lr-d", help="The discriminator's Adam (0.5, 0.9) learning rate (--lr is the generator's: 1.6e-4).",
        show_default="1.25e-4", rich_help_panel=_DDGAN)] = None,
    lr_min: Annotated[Optional[float], _opt(  # noqa: UP007
        "--lr-min", help="Both rates decay on a cosine to this at --max-steps (constant without --max-steps).",
        show_default="1e-5", rich_help_panel=_DDGAN)] = None,
    r1_gamma: Annotated[Optional[float], _opt(  # noqa: UP007
        "--r1-gamma", help="R1 penalty gamma/2 E||grad D(real)||^2 on real pairs (0: none).",
        show_default="0.02", rich_help_panel=_DDGAN)] = None,
    lazy_reg: Annotated[Optional[int], _opt(  # noqa: UP007
        "--lazy-reg", metavar="K", help="Add R1 every K discriminator steps (not scaled by K, as the official "
        "code).", show_default="15", rich_help_panel=_DDGAN)] = None,
    nz: Annotated[Optional[int], _opt(  # noqa: UP007
        "--nz", help="Dimensions of the generator's latent z.", show_default="100", rich_help_panel=_DDGAN)] = None,
    disc_channels: Annotated[Optional[int], _opt(  # noqa: UP007
        "--disc-channels", help="The discriminator's base width (2, 4, 8x it per level).",
        show_default="64 from 32x32 up, else 32", rich_help_panel=_DDGAN)] = None,
    cld_weighting: Annotated[Optional[CldWeighting], _opt(  # noqa: UP007
        "--cld-weighting", help="The score-matching loss's weighting: reweightedv2 (the official default, the "
        "noise-prediction loss), reweightedv1 (that times beta Gamma), or likelihood (the weighting under which the "
        "loss bounds the likelihood).", show_default="reweightedv2", rich_help_panel=_CLD)] = None,
    cld_mass: Annotated[Optional[float], _opt(  # noqa: UP007
        "--cld-mass", metavar="M", help="The velocity's mass M (the damping Gamma = 2 sqrt(M): critical).",
        show_default="0.25", rich_help_panel=_CLD)] = None,
    cld_beta: Annotated[Optional[float], _opt(  # noqa: UP007
        "--cld-beta", help="The SDE's constant time scaling beta.", show_default="4", rich_help_panel=_CLD)] = None,
    cld_gamma: Annotated[Optional[float], _opt(  # noqa: UP007
        "--cld-gamma", help="The initial velocity's variance, as a fraction of M: v_0 ~ N(0, gamma M).",
        show_default="0.04", rich_help_panel=_CLD)] = None,
    max_steps: Annotated[Optional[int], _opt(  # noqa: UP007
        "--max-steps", help="Stop after this many optimizer steps in all.", show_default="no limit",
        rich_help_panel=_RUN)] = None,
    max_time: Annotated[Optional[str], _opt(  # noqa: UP007
        "--max-time", metavar="DURATION", help="Wall-clock budget of this invocation, e.g. 90s, 10m, 2h, 1h30m.",
        show_default="no limit", rich_help_panel=_RUN)] = None,
    save_every: Annotated[int, _opt("--save-every", metavar="STEPS", help="Checkpoint interval.",
                                    rich_help_panel=_RUN)] = 1000,
    keep: Annotated[int, _opt("--keep", metavar="N", help="Keep the last N saves.", rich_help_panel=_RUN)] = 3,
    log_every: Annotated[int, _opt("--log-every", metavar="STEPS", help="metrics.jsonl interval.",
                                   rich_help_panel=_RUN)] = 10,
    eval_every: Annotated[Optional[int], _opt(  # noqa: UP007
        "--eval-every", metavar="STEPS", help="Sample --eval-num images from the EMA weights (DDIM, --eval-steps) "
        "every STEPS steps and log their FD (digits network; FID for other images, with "
        "$DDPMCTL_INCEPTION_WEIGHTS) to metrics.jsonl and the progress line.", show_default="off",
        rich_help_panel=_RUN)] = None,
    eval_num: Annotated[int, _opt("--eval-num", metavar="N", help="Images per --eval-every probe.",
                                  rich_help_panel=_RUN)] = 300,
    eval_steps: Annotated[int, _opt("--eval-steps", metavar="STEPS", help="DDIM steps of an --eval-every probe.",
                                    rich_help_panel=_RUN)] = 20,
    seed: Annotated[int, _opt("--seed", help="Same seed, same machine: a bit-identical run.", rich_help_panel=_RUN)
                    ] = 0,
    preview_every: Annotated[Optional[int], _opt(  # noqa: UP007
        "--preview-every", metavar="STEPS", help="Write a grid of 16 samples of the EMA network (DDIM, fixed noise) "
        "as RUN/preview_{step}.png every STEPS steps.", show_default="never", rich_help_panel=_RUN)] = None,
    val_every: Annotated[Optional[int], _opt(  # noqa: UP007
        "--val-every", metavar="STEPS", help="Log the loss on held-out images (val_loss, val_mse, val_vb in "
        "metrics.jsonl) every STEPS steps.", show_default="never", rich_help_panel=_RUN)] = None,
    val_data: Annotated[Optional[str], _opt(  # noqa: UP007
        "--val-data", metavar="DIR", help="The held-out images of --val-every: a folder the run does not train on.",
        show_default="a built-in dataset's test split", rich_help_panel=_RUN)] = None,
    init_from: Annotated[Optional[str], _opt(  # noqa: UP007
        "--init-from", metavar="CKPT", help="Fine-tune: start from this checkpoint's weights (new optimizer, step "
        "0). The network and diffusion options default to the checkpoint's.", show_default="random init",
        rich_help_panel=_RUN)] = None,
    resume: Annotated[bool, _opt("--resume", help="Continue the run in --out from its newest save.",
                                 rich_help_panel=_RUN)] = False,
    force: Annotated[bool, _opt("--force", help="Delete the run already in --out and start over.",
                                rich_help_panel=_RUN)] = False,
    device: Annotated[str, device_option()] = "auto",
    quiet: Annotated[bool, _opt("--quiet", "-q", help="Show nothing but errors.")] = False,
    json_output: Annotated[bool, _opt("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Train an Improved-DDPM model (or, with --method ddgan, a denoising diffusion GAN; with --method cld, a
    critically-damped Langevin diffusion) on an image folder (or builtin:digits); torchrun for several processes."""
    from pydantic import ValidationError

    from ddpmctl.config import TrainConfig
    from ddpmctl.distributed import env_world_size, split_batch
    from ddpmctl.errors import ConfigError
    from ddpmctl.runfolder import saved_train_config
    from ddpmctl.train import train

    from_flags = _normalise({name: value for name, value in ctx.params.items()
                             if name not in _NOT_FIELDS and given(ctx, name)})
    file_values = _read_config_file(config_file, TrainConfig.model_fields) if config_file is not None else {}
    if resume and force:
        raise usage_error("--resume continues the run in --out, --force deletes it: give one of them")
    values = {**file_values, **from_flags}
    if values.get("init_from") is not None and not resume:
        from ddpmctl.finetune import options_from_checkpoint

        if values.get("method") in ("ddgan", "cld"):
            raise usage_error("--init-from starts from a diffusion model's weights: it does not apply to "
                              f"--method {values['method']}")

        # Layers: the checkpoint's network and diffusion, then --config, then the command line.
        values = {**options_from_checkpoint(values["init_from"]), **values}
    if resume:
        if values.get("out") is None:
            raise usage_error("--resume needs --out DIR (the run folder to continue)")
        # Omitted options take the saved values; given ones must match (train() names any that differ).
        values = {**saved_train_config(Path(values["out"])), **values}
    if values.get("method") == "cld":
        _refuse_discrete_chain_options(from_flags)
    if values.get("data") is None:
        raise usage_error("missing DATA: an image folder or builtin:digits (or `data` in --config)")
    if values.get("out") is None:
        values["out"] = _default_out(str(values["data"]))
    try:
        config = TrainConfig(**values)
    except ValidationError as err:
        raise usage_error(_validation_line(err)) from None

    try:  # before any rank joins the process group: every rank stops at once with the same line
        if config.batch_size is not None:  # (a batch chosen from the data is checked once the data is loaded)
            split_batch(config.batch_size, env_world_size())
    except ConfigError as err:
        raise usage_error(str(err)) from None
    main_rank = int(os.environ.get("RANK", "0") or 0) == 0
    show = main_rank and not quiet
    torch_device = resolve_device(device)
    if show:
        with _ProgressView(config) as view:
            result = train(config, device=torch_device, resume=resume, force=force, callback=view)
    else:
        result = train(config, device=torch_device, resume=resume, force=force)
    if not main_rank:
        return
    if json_output:
        print_json(result.to_json())
    elif not quiet or result.stop_reason == "interrupted":
        # Plain echo, not rich: a long path must stay on one line for scripts and copy-paste.
        typer.echo(f"EMA checkpoint: {result.ema_checkpoint}")
    if result.stop_reason == "interrupted":
        typer.echo(f"interrupted at step {result.step}: saved {result.ema_checkpoint}; continue with "
                   f"`ddpmctl train --out {result.run_dir} --resume`", err=True)
        raise typer.Exit(130)
    if not quiet and not json_output:
        message = stop_message(result, config)
        if message:
            typer.echo(message, err=True)


def _refuse_discrete_chain_options(given_values: dict[str, Any]) -> None:
    """``--method cld`` with an option of the discrete chain on the command line, even at its default value: one
    line, exit 2. (TrainConfig refuses values that differ from the default, also from --config; a run's own
    config.json, which records every field, stays readable as --config.)"""
    from ddpmctl.config import DISCRETE_CHAIN_FIELDS

    named = [f"--{f.replace('_', '-')}" for f in DISCRETE_CHAIN_FIELDS if given_values.get(f) is not None]
    if named:
        raise usage_error(f"{', '.join(named)} do(es) not apply to --method cld (a continuous-time SDE whose network "
                          "learns the velocity's score; see --cld-weighting): drop it")


def stop_message(result: Any, config: TrainConfig) -> str | None:
    """Why a run ended where it did, when that is not simply its --max-steps reached: the --max-time budget, or a
    resumed run that had nothing left to train (and how to go on)."""
    from ddpmctl.config import format_duration

    resume = f"`ddpmctl train --out {result.run_dir} --resume"
    if result.stop_reason == "max_time" and config.max_time is not None:
        of = f" of --max-steps {config.max_steps}" if config.max_steps is not None else ""
        return (f"stopped by --max-time {format_duration(config.max_time)} at step {result.step}{of}: saved "
                f"{result.ema_checkpoint}; continue with {resume}` (the time budget counts per invocation)")
    if result.stop_reason == "max_steps" and result.step == result.start_step and config.max_steps is not None:
        return (f"{result.run_dir} is already at step {result.step}, --max-steps {config.max_steps}: nothing to "
                f"train; continue with {resume} --max-steps {max(2 * result.step, config.max_steps + 1)}`")
    return None
