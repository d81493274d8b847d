"""`ddpmctl convert MODEL.pt [improved-diffusion flags] -o OUT`: an improved-diffusion checkpoint as a ddpmctl one.

The model and diffusion flags are improved-diffusion's own (``--num_channels 128 --learn_sigma True ...``, spelled
and defaulted as in its ``script_util.py``), so its README's ``$MODEL_FLAGS $DIFFUSION_FLAGS`` paste as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ddpmctl.choices import Schedule
from ddpmctl.cli.common import guarded, out_console, output_file, print_json, usage_error

_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")
_MODEL, _DIFFUSION = "Model flags (improved-diffusion's)", "Diffusion flags (improved-diffusion's)"


def reference_bool(text: Any) -> bool:
    """improved-diffusion's str2bool: True/False, yes/no, t/f, y/n, 1/0 in any case."""
    if isinstance(text, bool):
        return text
    if str(text).lower() in _TRUE:
        return True
    if str(text).lower() in _FALSE:
        return False
    raise typer.BadParameter(f"expected True or False, not {text!r}")


def _bool(name: str, help: str, panel: str) -> Any:
    # Typed str on the signature (a bool would make a valueless flag); the parser hands the command a bool.
    return typer.Option(name, parser=reference_bool, metavar="True|False", help=help, rich_help_panel=panel)


def _opt(name: str, help: str, panel: str, **kwargs: Any) -> Any:
    return typer.Option(name, help=help, rich_help_panel=panel, **kwargs)


@guarded
def convert_command(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="An improved-diffusion state dict (.pt), e.g. the model or "
                                           "ema_0.9999_*.pt of a run, or a released checkpoint.",
                                           show_default=False)],
    out: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--out", "-o", metavar="FILE|DIR", help="The checkpoint to write (a folder: SOURCE's name in it).",
        show_default="SOURCE with .safetensors")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    image_size: Annotated[int, _opt("--image_size", "Image size (32, 64 or 256; others need --channel_mult).",
                                    _MODEL)] = 64,
    num_channels: Annotated[int, _opt("--num_channels", "Base width.", _MODEL)] = 128,
    num_res_blocks: Annotated[int, _opt("--num_res_blocks", "Residual blocks per resolution.", _MODEL)] = 2,
    num_heads: Annotated[int, _opt("--num_heads", "Attention heads.", _MODEL)] = 4,
    num_heads_upsample: Annotated[int, _opt("--num_heads_upsample", "Heads on the way up (-1: --num_heads).",
                                            _MODEL)] = -1,
    attention_resolutions: Annotated[str, _opt("--attention_resolutions", "Feature-map sizes with attention.",
                                               _MODEL, metavar="16,8")] = "16,8",
    channel_mult: Annotated[Optional[str], _opt(  # noqa: UP007
        "--channel_mult", "Width multipliers per level (not an improved-diffusion flag; for other image sizes).",
        _MODEL, metavar="1,2,2,2", show_default="the reference's for the size")] = None,
    dropout: Annotated[float, _opt("--dropout", "Dropout (used when fine-tuning).", _MODEL)] = 0.0,
    class_cond: Annotated[str, _bool("--class_cond", "Class-conditional (label_emb).", _MODEL)] = "False",
    use_scale_shift_norm: Annotated[str, _bool("--use_scale_shift_norm", "AdaGN in the residual blocks.",
                                               _MODEL)] = "True",
    use_checkpoint: Annotated[str, _bool("--use_checkpoint", "Gradient checkpointing (no effect on the weights).",
                                         _MODEL)] = "False",
    learn_sigma: Annotated[str, _bool("--learn_sigma", "Learned-range variances (2C outputs).", _DIFFUSION)] = "False",
    sigma_small: Annotated[str, _bool("--sigma_small", "Fixed small variances (else large) without "
                                      "--learn_sigma.", _DIFFUSION)] = "False",
    diffusion_steps: Annotated[int, _opt("--diffusion_steps", "T.", _DIFFUSION)] = 1000,
    noise_schedule: Annotated[Schedule, _opt("--noise_schedule", "Beta schedule.", _DIFFUSION)] = "linear",
    timestep_respacing: Annotated[str, _opt("--timestep_respacing", "Respace the chain (e.g. 100, ddim50): writes "
                                            "a respaced checkpoint.", _DIFFUSION)] = "",
    use_kl: Annotated[str, _bool("--use_kl", "Trained on L_vlb (rescaled KL).", _DIFFUSION)] = "False",
    predict_xstart: Annotated[str, _bool("--predict_xstart", "The network predicts x0 (else eps).",
                                         _DIFFUSION)] = "False",
    rescale_timesteps: Annotated[str, _bool("--rescale_timesteps", "The network saw t * 1000 / T.",
                                            _DIFFUSION)] = "True",
    rescale_learned_sigmas: Annotated[str, _bool("--rescale_learned_sigmas", "Hybrid loss (rescaled MSE).",
                                                 _DIFFUSION)] = "True",
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Import an openai/improved-diffusion checkpoint (.pt state dict) with the flags it was trained with."""
    from pydantic import ValidationError

    from ddpmctl.convert import ReferenceFlags, convert_checkpoint
    from ddpmctl.errors import validation_problem

    not_flags = ("source", "out", "force", "json_output", "quiet")
    values = {name: value for name, value in ctx.params.items() if name not in not_flags and value is not None}
    try:
        flags = ReferenceFlags(**values)
    except ValidationError as err:
        raise usage_error(validation_problem(err, lambda loc: f"--{loc[0]}" if loc else "", show_input=True)) \
            from None
    target = output_file(out, source, source.with_suffix(".safetensors").name, force=force)
    result = convert_checkpoint(source, target, flags)
    if json_output:
        print_json(result.to_json())
    elif not quiet:
        d = result.config.diffusion
        out_console.print(f"wrote {result.out}: {result.num_parameters:,} parameters, T = {d.timesteps} "
                          f"{d.schedule}, {d.mean_type}, {d.var_type} (from {source.name})", highlight=False,
                          soft_wrap=True)
