"""`ddpmctl respace CKPT --steps K --out FILE`: the same weights on a K-step chain (IDDPM Sec. 4), kind "respaced"."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from ddpmctl.cli.common import (CHECKPOINT_ARG_HELP, device_option, guarded, option_errors, out_console, output_file,
                                print_json, resolve_checkpoint_argument, resolve_device)
from ddpmctl.errors import CheckpointError, SamplerError

Spacing = Literal["even", "ddim"]  # the sampler spacings a respaced checkpoint can be made with


def respaced_config(config: Any, steps: int, spacing: Spacing) -> Any:
    """The parent's config with ``use_timesteps`` = K of its chain's steps, as ORIGINAL indices (composes)."""
    from ddpmctl.config import CheckpointConfig
    from ddpmctl.timesteps import choose_timesteps

    diffusion = config.diffusion
    chain = diffusion.use_timesteps if diffusion.use_timesteps is not None else tuple(range(diffusion.timesteps))
    own = choose_timesteps(len(chain), steps, spacing)  # indices into the parent's chain
    original = tuple(sorted(chain[k] for k in own))
    payload = config.model_dump()
    payload["diffusion"]["use_timesteps"] = original
    return CheckpointConfig.model_validate(payload)


@guarded
def respace_command(
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_ARG_HELP, show_default=False)],
    steps: Annotated[int, typer.Option("--steps", min=1, help="Steps of the new chain (1..the parent's).",
                                       show_default=False)],
    out: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--out", "-o", metavar="FILE|DIR", help="The checkpoint file to write; an existing folder or a path ending in "
        "/ means into that folder.", show_default="CKPT's folder, as {CKPT name}_respaced{K}.safetensors")] = None,
    spacing: Annotated[Spacing, typer.Option(
        "--spacing", help="even: K evenly spaced steps (IDDPM); ddim: DDIM's stride range(0, T, i).")] = "even",
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    device: Annotated[Optional[str], device_option(  # noqa: UP007 - typer needs Optional on 3.10
        "After writing, load the new checkpoint's network on this device (auto | cpu | cuda | cuda:N) to check it "
        "(respacing itself never runs the network).", show_default="none: no check")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Write a checkpoint that samples in K steps: same weights, the diffusion respaced (learned variances rescale)."""
    from ddpmctl.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
    from ddpmctl.fileio import file_sha256, load_tensors

    torch_device = resolve_device(device) if device is not None else None
    checkpoint = resolve_checkpoint_argument(checkpoint, quiet=quiet or json_output)
    info = read_checkpoint_info(checkpoint)  # validated: a foreign or broken file fails here in one line
    if info.kind == "student":
        raise SamplerError(f"{checkpoint.name} is a distilled student: its step grid is fixed and cannot be respaced")
    if info.kind == "ddgan":
        raise SamplerError(f"{checkpoint.name} is a denoising diffusion GAN: its generator was trained for its own "
                           f"{info.config.diffusion.timesteps} steps, there is no longer chain to respace")
    if info.kind == "cld":
        raise SamplerError(f"{checkpoint.name} is a CLD network: a continuous-time SDE has no discrete chain to "
                           "respace (sample it in fewer steps with --sampler sscs, em or cld-ode and --steps)")
    with option_errors(SamplerError):  # --steps beyond the parent's chain, or no DDIM stride gives K steps
        config = respaced_config(info.config, steps, spacing)
    out_path = output_file(out, checkpoint, f"{checkpoint.stem}_respaced{steps}.safetensors", force=force)

    tensors, _ = load_tensors(checkpoint)  # the weights exactly as stored (no dtype round trip)
    sha256 = file_sha256(checkpoint)
    parent_chain = info.config.diffusion.use_timesteps
    parent_steps = len(parent_chain) if parent_chain is not None else info.config.diffusion.timesteps
    lineage = [*info.lineage, {"op": "respace", "from": checkpoint.name, "sha256": sha256, "steps": steps,
                               "spacing": spacing}]
    try:
        save_checkpoint(out_path, tensors, config, kind="respaced", lineage=lineage)
    except OSError as err:
        raise CheckpointError(f"cannot write --out {out_path}: {err.strerror or err}") from None
    if torch_device is not None:
        load_checkpoint(out_path, device=torch_device)

    use = config.diffusion.use_timesteps or ()
    summary = {"out": str(out_path), "from": str(checkpoint), "kind": "respaced", "steps": len(use),
               "parent_steps": parent_steps, "timesteps": config.diffusion.timesteps, "spacing": spacing,
               "use_timesteps": list(use)}
    if json_output:
        print_json(summary)
    elif not quiet:
        out_console.print(f"wrote {out_path}: {len(use)} of {parent_steps} steps ({spacing} spacing, original indices "
                          f"{use[0]}..{use[-1]}) from {checkpoint.name}", highlight=False, soft_wrap=True)
