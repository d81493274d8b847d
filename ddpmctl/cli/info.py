"""`ddpmctl info CKPT`: what a checkpoint holds (kind, config, lineage, sizes), as a table or JSON; without CKPT,
the machine: the CPU class ddpmctl chooses for (real or simulated) and what it decides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from ddpmctl.cli.common import device_option, guarded, out_console, print_json, resolve_device, usage_error
from ddpmctl.cli.info_run import cld_constants, cld_summary

# The loss types a checkpoint stores, by the --loss name that trains them (config.LOSS_TYPES, inverted; kept here so
# `ddpmctl --help` imports no pydantic).
LOSS_NAMES = {"rescaled_mse": "hybrid", "mse": "simple", "rescaled_kl": "vlb"}

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.checkpoint import CheckpointInfo


def _steps_summary(steps: tuple[int, ...]) -> str:
    """'50 steps (0..3999)' for a timestep subsequence of original indices."""
    return f"{len(steps)} steps ({steps[0]}..{steps[-1]})"


def _lineage_entry(entry: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                     for key, value in entry.items()) or "(empty)"


def weights_kind(lineage: list[dict[str, Any]]) -> str | None:
    """Which weights the training run saved: raw, or which EMA (None when no train entry says).

    Checkpoints written before the EMA warm-up existed record no ``ema_warmup``: their EMA had none."""
    entry = next((e for e in lineage if isinstance(e, dict) and e.get("op") == "train"), None)
    if entry is None:
        return None
    if entry.get("ema") is None:
        return f"raw training weights (step {entry.get('step')})"
    warmup = entry.get("ema_warmup", "none")
    how = ("no warm-up (improved-diffusion: starts at the random init)" if warmup == "none"
           else "warm-up 1-(1+t)^-2/3 (starts at the first trained weights)" if warmup == "power" else f"warm-up {warmup}")
    if "ema_updates" not in entry or warmup not in ("power", "none"):
        return f"EMA rate {entry['ema']}, {how}"
    from ddpmctl.ema import reached_decay

    # The decay the average reached, not only the cap: a warm-up's is far below the rate on a short run.
    updates = int(entry["ema_updates"])
    decay = reached_decay(float(entry["ema"]), warmup, updates)
    return (f"EMA rate {entry['ema']}, {how}, {updates} updates: decay {decay:.6g} reached (an average over about "
            f"the last {1 / (1 - decay):,.0f} steps)")


def checkpoint_method(kind: str) -> str:
    """What trained the weights: a denoising diffusion GAN (kind ddgan), a critically-damped Langevin diffusion
    (kind cld), else a diffusion model (train's iddpm)."""
    return kind if kind in ("ddgan", "cld") else "iddpm"


def info_payload(info: CheckpointInfo, sha256: str) -> dict[str, Any]:
    """Everything ``info`` shows, as one JSON-ready object (``--json``)."""
    config = info.config
    return {
        "path": str(info.path),
        "sha256": sha256,
        "file_size": info.file_size,
        "format": info.format,
        "kind": info.kind,
        "method": checkpoint_method(info.kind),
        "created_with": info.created_with,
        "num_parameters": info.num_parameters,
        "num_tensors": info.num_tensors,
        "config": config.model_dump(mode="json"),
        "lineage": info.lineage,
        "weights": weights_kind(info.lineage),
        "cld": cld_constants(config.cld) if config.cld is not None else None,
        "tensors": {t.name: {"shape": list(t.shape), "dtype": t.dtype} for t in info.tensors},
    }


def info_table(info: CheckpointInfo, sha256: str) -> Table:
    """The rich table ``info`` prints: one row per fact, one row per lineage entry."""
    model, diffusion, data, student = (info.config.model, info.config.diffusion, info.config.data,
                                       info.config.student)
    table = Table(title=Text(str(info.path)), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    cld = info.config.cld
    method = (f"ddgan (denoising diffusion GAN, {diffusion.timesteps} generator steps)" if info.kind == "ddgan"
              else "cld (critically-damped Langevin diffusion)" if cld is not None else "iddpm (diffusion model)")
    rows: list[tuple[str, str]] = [
        ("kind", info.kind),
        ("method", method),
        ("format", info.format),
        ("created with", f"ddpmctl {info.created_with}"),
        ("sha256", sha256),
        ("parameters", f"{info.num_parameters:,}"),
        ("tensors", str(info.num_tensors)),
        ("image size", f"{model.image_size}x{model.image_size}"),
        ("channels", f"{info.config.network_in_channels} in, {info.config.out_channels} out"
         + (" (x and v stacked)" if info.config.cld is not None else "")),
        ("network", f"{model.model_channels} ch, mult {','.join(map(str, model.channel_mult))}, "
                    f"{model.num_res_blocks} res blocks, attention at "
                    f"{','.join(map(str, model.attention_resolutions)) or 'none'}, {model.num_heads} heads, "
                    f"dropout {model.dropout}"),
    ]
    if cld is not None:
        # A CLD network has no chain: its diffusion block is a placeholder that only sets the time scale.
        rows.append(("cld process", cld_summary(cld)))
        rows.append(("time input", f"t * {diffusion.timesteps} for t in [t_min, 1]"))
    else:
        rows += [
            ("schedule", diffusion.schedule),
            ("T", str(diffusion.timesteps)),
            ("mean type", diffusion.mean_type),
            ("var type", diffusion.var_type.replace("_", "-")),  # as --var-type spells it
            ("loss", LOSS_NAMES.get(diffusion.loss_type, diffusion.loss_type)),  # as --loss spells it
        ]
    if model.latent is not None:
        rows.append(("latent", f"nz {model.latent.dim}, PixelNorm + {model.latent.mlp_layers}-layer MLP into the "
                               "embedding, tanh output"))
    if diffusion.use_timesteps is not None:
        rows.append(("respaced steps", _steps_summary(diffusion.use_timesteps)))
    if student is not None:
        rows.append(("student grid", f"{_steps_summary(student.steps)}, param {student.param}, "
                                     f"teacher {student.teacher_steps} steps"))
    if model.num_classes is None:
        rows.append(("classes", "unconditional"))
    else:
        names = data.class_names if data is not None and data.class_names else None
        rows.append(("classes", f"{model.num_classes}" + (f" ({', '.join(names)})" if names else "")))
    if data is not None:
        rows.append(("data", f"{data.source} ({data.num_images} images, {data.image_size}px, "
                             f"{data.channels} channel(s))"))
    weights = weights_kind(info.lineage)
    if weights is not None:
        rows.append(("weights", weights))
    for index, entry in enumerate(info.lineage, start=1):
        rows.append((f"lineage {index}", _lineage_entry(entry)))
    if not info.lineage:
        rows.append(("lineage", "(none)"))
    for name, value in rows:
        # Untrusted strings (path, data source, lineage) as plain Text: never parsed as rich markup.
        table.add_row(Text(name), Text(value))
    return table


def machine_payload() -> dict[str, Any]:
    """This machine as ddpmctl sees it: the CPU class it chooses for (simulated with DDPMCTL_CPU or real), the
    hardware's class, the kernels torch runs, and what that decides (``auto`` precision, fast paths)."""
    from dataclasses import asdict

    import torch

    from ddpmctl import hardware

    return {
        "cpu_class": hardware.cpu_class(),
        "simulated": hardware.simulated_cpu_class() is not None,
        "hardware_class": hardware.hardware_cpu_class(),
        "kernels": hardware.kernel_capability(),
        "native_bf16": hardware.cpu_native_bf16(),
        "auto_precision": hardware.resolve_precision("auto", "cpu")[0],
        "fast_paths": asdict(hardware.fast_paths("cpu")),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def machine_table(machine: dict[str, Any]) -> Table:
    """The rich table ``info`` prints without a checkpoint."""
    table = Table(title="this machine (CPU)", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    simulated = " (simulated: DDPMCTL_CPU)" if machine["simulated"] else ""
    rows = [("CPU class", f"{machine['cpu_class']}{simulated}"), ("hardware class", machine["hardware_class"]),
            ("torch kernels", machine["kernels"]), ("--precision auto", machine["auto_precision"]),
            ("fast paths", ", ".join(f"{k} {'on' if v else 'off'}" for k, v in machine["fast_paths"].items())),
            ("torch", f"{machine['torch']}, CUDA {'available' if machine['cuda'] else 'not available'}")]
    for name, value in rows:
        table.add_row(Text(name), Text(value))
    return table


@guarded
def info_command(
    checkpoint: Annotated[Optional[Path], typer.Argument(  # noqa: UP007 - typer needs Optional on 3.10
        help="A ddpmctl checkpoint (.safetensors), or a run folder: its saves and resolved settings. Without one: "
             "this machine's CPU class and what it decides.", show_default=False)] = None,
    device: Annotated[Optional[str], device_option(  # noqa: UP007 - typer needs Optional on 3.10
        "Also build the network and load every weight on this device (auto | cpu | cuda | cuda:N) to check the "
        "whole file.", show_default="none: read and validate the header only")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show what a checkpoint holds (kind, config, lineage, parameter and tensor counts), what a run folder holds
    (its saves and resolved settings) or, without either, this machine's CPU class."""
    from ddpmctl.checkpoint import load_checkpoint, read_checkpoint_info
    from ddpmctl.fileio import file_sha256

    if checkpoint is None:
        machine = machine_payload()
        if json_output:
            print_json({"machine": machine})
        else:
            out_console.print(machine_table(machine))
        return
    if checkpoint.is_dir():
        from ddpmctl.cli.info_run import show_run

        if device is not None:
            raise usage_error(f"--device checks one checkpoint file: give one of {checkpoint}'s saves, not the folder")
        show_run(checkpoint, json_output=json_output)
        return
    torch_device = resolve_device(device) if device is not None else None
    info = read_checkpoint_info(checkpoint)
    if torch_device is not None:
        load_checkpoint(checkpoint, device=torch_device)
    sha256 = file_sha256(checkpoint)
    checked = None if torch_device is None else (
        f"every tensor loaded into the network on {torch_device}: the file is whole")
    if json_output:
        print_json({**info_payload(info, sha256), "loaded_on": None if torch_device is None else str(torch_device)})
        return
    table = info_table(info, sha256)
    if checked is not None:
        table.add_row(Text("check"), Text(checked))
    out_console.print(table)
