"""`ddpmctl train DATA`: flags (+ ``--config FILE.toml``) -> TrainConfig -> ddpmctl.train.train, with progress.

Only options the user actually gave override the file (and, with ``--resume``, the saved run): every option defaults
to None here and the dict of given values is laid over the lower layers.
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ddpmctl.cli.common import console, guarded, print_json, resolve_device, usage_error
from ddpmctl.config import TrainConfig

# Options whose value is a comma-separated list of integers.
_INT_LISTS = ("channel_mult", "attention_resolutions")
# Options spelled with hyphens on the command line but stored with underscores.
_HYPHEN_VALUES = ("var_type",)
_FIELD_FLAGS = {"data": "DATA", "flip": "--no-flip"}


def _opt(*names: str, **kwargs: Any) -> Any:
    """typer.Option without a shown default (every option defaults to None: 'not given')."""
    return typer.Option(*names, show_default=False, **kwargs)


def _default(text: str, field: str) -> str:
    """Help text ending in the TrainConfig default (parentheses: square brackets are rich markup)."""
    value = TrainConfig.model_fields[field].default
    return f"{text} (default: {value})."


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
    return out


def _read_config_file(path: Path) -> dict[str, Any]:
    """``--config FILE.toml``: keys are TrainConfig field names (hyphens accepted); unknown keys are usage errors."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise usage_error(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise usage_error(f"--config {path}: is a folder, not a TOML file") from None
    except OSError as err:
        raise usage_error(f"--config {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise usage_error(f"--config {path}: not valid TOML ({err})") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = key.replace("-", "_")
        if field not in TrainConfig.model_fields:
            raise usage_error(f"--config {path}: unknown key {key!r} (keys are the option names, e.g. "
                              "batch_size, lr, max_steps)")
        if field in _INT_LISTS and isinstance(value, list):
            value = [str(v) if isinstance(v, bool) else v for v in value]
        values[field] = value
    return _normalise(values)


def _validation_line(err: ValidationError) -> str:
    """The first pydantic problem as one line naming the option."""
    first = err.errors()[0]
    message = str(first.get("msg", "invalid value"))
    message = re.sub(r"^(Value|Assertion) error, ", "", message)
    loc = first.get("loc") or ()
    if not loc:
        return message
    field = str(loc[0])
    shown = first.get("input")
    given = f" (got {shown!r})" if shown is not None and not isinstance(shown, dict) else ""
    return f"{_flag(field)}: {message[:1].lower() + message[1:]}{given}"


def _default_out(data: str) -> str:
    """runs/<data name>-<timestamp> (builtin:digits -> digits)."""
    name = data.split(":", 1)[1] if data.startswith("builtin:") else Path(data.rstrip("/\\")).name or "data"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


class _ProgressView:
    """Renders TrainEvents on stderr: step/total, loss, img/s, ETA (elapsed/remaining time for --max-time only)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.by_time = config.max_steps is None
        fields = "loss {task.fields[loss]}  {task.fields[speed]}"
        if self.by_time:
            columns: list[Any] = [TextColumn("step {task.fields[step]}"), BarColumn(), TimeElapsedColumn(),
                                  TextColumn("/ {task.fields[budget]}"), TextColumn(fields)]
        else:
            columns = [TextColumn("step {task.completed:.0f}/{task.total:.0f}"), BarColumn(),
                       TextColumn(fields), TextColumn("ETA {task.fields[eta]}")]
        self.progress = Progress(*columns, console=console, transient=False)
        self.task: TaskID | None = None
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
            self.progress.console.print(f"warning: {event.message}", markup=False, highlight=False)
            return
        if event.kind == "start":
            # The bar appears once set-up (data, folder checks) has succeeded, so errors print alone.
            out = self.config.out
            what = f"resuming {out} at step {event.step}" if event.step else f"training in {out}"
            console.print(f"{what} ({event.message})", markup=False, highlight=False)
            self.progress.__enter__()
            total = self.config.max_time if self.by_time else self.config.max_steps
            self.task = self.progress.add_task("train", total=total, completed=0 if self.by_time else event.step,
                                               loss="-", speed="", eta="-", step=event.step,
                                               budget=("no limit: Ctrl-C saves and stops" if self.config.max_time is None
                                                       else self._clock(self.config.max_time)))
            self.start_step, self.start_time = event.step, event.elapsed
            return
        if self.task is None:
            return
        if event.kind == "log" and event.metrics:
            m = event.metrics
            self.progress.update(self.task, loss=f"{m['loss']:.4f}", speed=f"{m['img_per_s']:.0f} img/s")
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


@guarded
def train_command(
    data: Annotated[Optional[str], typer.Argument(
        help="Image folder or builtin:digits (optional with --resume or a --config that sets data).",
        show_default=False)] = None,
    out: Annotated[Optional[str], _opt("--out", "-o", help="Run folder (default: runs/<data>-<time>).")] = None,
    config_file: Annotated[Optional[Path], _opt(
        "--config", help="TOML file of options (keys = option names with underscores); flags override it.")] = None,
    image_size: Annotated[Optional[str], _opt("--image-size", metavar="INT",
                                              help="Resize/crop to this size (default: the data's).")] = None,
    color: Annotated[Optional[str], _opt("--color", metavar="auto|rgb|gray",
                                         help=_default("1 or 3 channels", "color"))] = None,
    class_cond: Annotated[Optional[bool], _opt("--class-cond",
                                               help="Condition on class labels (sub-folder names).")] = None,
    no_flip: Annotated[Optional[bool], _opt("--no-flip", help="No random horizontal flips.")] = None,
    skip_bad_images: Annotated[Optional[bool], _opt("--skip-bad-images",
                                                    help="Skip unreadable images (counted).")] = None,
    schedule: Annotated[Optional[str], _opt("--schedule", metavar="cosine|linear",
                                            help=_default("Beta schedule", "schedule"))] = None,
    timesteps: Annotated[Optional[str], _opt("--timesteps", metavar="INT",
                                             help=_default("Diffusion steps T", "timesteps"))] = None,
    mean_type: Annotated[Optional[str], _opt("--mean-type", metavar="eps|x0|v",
                                             help=_default("What the network predicts", "mean_type"))] = None,
    var_type: Annotated[Optional[str], _opt("--var-type", metavar="learned-range|fixed-small|fixed-large|learned",
                                            help="Reverse-process variance (default: learned-range).")] = None,
    loss: Annotated[Optional[str], _opt("--loss", metavar="hybrid|simple|vlb", help=_default(
        "hybrid = L_simple + L_vlb/1000, simple = L_simple, vlb = rescaled KL", "loss"))] = None,
    timestep_sampler: Annotated[Optional[str], _opt("--timestep-sampler", metavar="uniform|loss-second-moment",
                                                    help=_default("How t is drawn", "timestep_sampler"))] = None,
    model_channels: Annotated[Optional[str], _opt("--model-channels", metavar="INT",
                                                  help="Base width (default: scaled with the image size).")] = None,
    channel_mult: Annotated[Optional[str], _opt("--channel-mult", metavar="1,2,2,2", help=(
        "Width multiplier per resolution (default: scaled with the image size)."))] = None,
    res_blocks: Annotated[Optional[str], _opt("--res-blocks", metavar="INT", help=(
        "Residual blocks per resolution (default: scaled with the image size)."))] = None,
    attention_resolutions: Annotated[Optional[str], _opt("--attention-resolutions", metavar="16,8", help=(
        "Feature-map sizes with self-attention, or none (default: scaled with the image size)."))] = None,
    heads: Annotated[Optional[str], _opt("--heads", metavar="INT", help=_default("Attention heads", "heads"))] = None,
    dropout: Annotated[Optional[str], _opt("--dropout", metavar="FLOAT", help=_default("Dropout", "dropout"))] = None,
    batch_size: Annotated[Optional[str], _opt("--batch-size", metavar="INT", help=_default(
        "Global batch, split among torchrun ranks", "batch_size"))] = None,
    lr: Annotated[Optional[str], _opt("--lr", metavar="FLOAT", help=_default("AdamW learning rate", "lr"))] = None,
    weight_decay: Annotated[Optional[str], _opt("--weight-decay", metavar="FLOAT",
                                                help=_default("AdamW weight decay", "weight_decay"))] = None,
    ema: Annotated[Optional[str], _opt("--ema", metavar="RATE", help=_default("EMA rate", "ema"))] = None,
    grad_clip: Annotated[Optional[str], _opt("--grad-clip", metavar="NORM", help=(
        "Clip the global gradient norm (default: no clipping; the norm is logged always)."))] = None,
    max_steps: Annotated[Optional[str], _opt("--max-steps", metavar="INT",
                                             help="Stop after this many optimizer steps in all.")] = None,
    max_time: Annotated[Optional[str], _opt("--max-time", metavar="DURATION",
                                            help="Wall-clock budget of this invocation, e.g. 90s, 10m, 2h.")] = None,
    save_every: Annotated[Optional[str], _opt("--save-every", metavar="STEPS",
                                              help=_default("Checkpoint interval", "save_every"))] = None,
    keep: Annotated[Optional[str], _opt("--keep", metavar="N", help=_default("Keep the last N saves", "keep"))] = None,
    log_every: Annotated[Optional[str], _opt("--log-every", metavar="STEPS",
                                             help=_default("metrics.jsonl interval", "log_every"))] = None,
    precision: Annotated[Optional[str], _opt("--precision", metavar="fp32|bf16", help=_default(
        "bf16: autocast for the network; weights, optimizer and losses stay fp32", "precision"))] = None,
    seed: Annotated[Optional[str], _opt("--seed", metavar="INT", help=_default(
        "Same seed, same machine: a bit-identical run", "seed"))] = None,
    nan_policy: Annotated[Optional[str], _opt("--nan-policy", metavar="stop|skip", help=_default(
        "On a non-finite loss: stop (keeping the last checkpoint) or skip the step", "nan_policy"))] = None,
    resume: Annotated[bool, _opt("--resume", help="Continue the run in --out from its newest save.")] = False,
    force: Annotated[bool, _opt("--force", help="Delete the run already in --out and start over.")] = False,
    device: Annotated[str, _opt("--device", help="auto | cpu | cuda | cuda:N (auto = CUDA when available).")] = "auto",
    quiet: Annotated[bool, _opt("--quiet", "-q", help="Show nothing but errors.")] = False,
    json_output: Annotated[bool, _opt("--json", help="Print the final summary as JSON.")] = False,
) -> None:
    """Train an Improved-DDPM model on an image folder (or builtin:digits); torchrun for several processes."""
    from ddpmctl.distributed import env_world_size, split_batch
    from ddpmctl.errors import ConfigError
    from ddpmctl.runfolder import saved_train_config
    from ddpmctl.train import train

    given: dict[str, Any] = {
        "data": data, "out": out, "image_size": image_size, "color": color, "class_cond": class_cond,
        "flip": False if no_flip else None, "skip_bad_images": skip_bad_images, "schedule": schedule,
        "timesteps": timesteps, "mean_type": mean_type, "var_type": var_type, "loss": loss,
        "timestep_sampler": timestep_sampler, "model_channels": model_channels, "channel_mult": channel_mult,
        "res_blocks": res_blocks, "attention_resolutions": attention_resolutions, "heads": heads,
        "dropout": dropout, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "ema": ema,
        "grad_clip": grad_clip, "max_steps": max_steps, "max_time": max_time, "save_every": save_every,
        "keep": keep, "log_every": log_every, "precision": precision, "seed": seed, "nan_policy": nan_policy,
    }
    given = _normalise({k: v for k, v in given.items() if v is not None})
    file_values = _read_config_file(config_file) if config_file is not None else {}
    if resume and force:
        raise usage_error("--resume continues the run in --out, --force deletes it: give one of them")
    values = {**file_values, **given}
    if resume:
        if values.get("out") is None:
            raise usage_error("--resume needs --out DIR (the run folder to continue)")
        # Omitted options take the saved values; given ones must match (train() names any that differ).
        values = {**saved_train_config(Path(values["out"])), **values}
    if values.get("data") is None:
        raise usage_error("missing DATA: an image folder or builtin:digits (or `data` in --config)")
    if values.get("out") is None:
        values["out"] = _default_out(str(values["data"]))
    try:
        config = TrainConfig(**values)
    except ValidationError as err:
        raise usage_error(_validation_line(err)) from None

    try:  # before any rank joins the process group: every rank stops at once with the same line
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
