"""Import openai/improved-diffusion checkpoints: its ``.pt`` state dicts of ``UNetModel`` -> one ddpmctl checkpoint.

improved-diffusion saves ``torch.save(model.state_dict())`` (the raw weights and each ``ema_{rate}_{step}.pt``) and
rebuilds network and diffusion from the command-line flags of its ``script_util.py``; the file itself records
neither. So the user passes those flags (:class:`ReferenceFlags`, the reference's own names and defaults) and this
module turns them into a :class:`~ddpmctl.config.CheckpointConfig`; the table is in
docs/conventions.md "Importing improved-diffusion checkpoints".

The file is untrusted: it is read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers and refuses every other Python object, and only a flat map of names to floating-point tensors is
accepted. ddpmctl's U-Net names its parameters as the reference does, so the key map is the identity apart from a
DataParallel/DDP ``module.`` prefix; the names and shapes are then checked against the network the flags describe,
and any difference is one line naming the flag that decides it.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ddpmctl.build import build_model
from ddpmctl.checkpoint import save_checkpoint
from ddpmctl.choices import Schedule
from ddpmctl.config import CheckpointConfig, DiffusionConfig, ModelConfig
from ddpmctl.errors import CheckpointError, OptionError, validation_problem
from ddpmctl.fileio import file_sha256, load_tensors
from ddpmctl.respace import space_timesteps

__all__ = ["ReferenceFlags", "ConvertResult", "convert_checkpoint", "map_state_dict", "read_reference_state_dict",
           "reference_config"]

# The channel multipliers improved-diffusion's create_model picks by image size (it supports no other sizes).
REFERENCE_CHANNEL_MULT: dict[int, tuple[int, ...]] = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
SOURCE = "openai/improved-diffusion"


class ReferenceFlags(BaseModel):
    """improved-diffusion's model and diffusion flags (``model_and_diffusion_defaults``), with its defaults.

    ``channel_mult`` is not one of its flags (guided-diffusion's spelling): it lets image sizes other than 32, 64 and
    256 be imported. ``use_checkpoint`` (gradient checkpointing) does not change the weights and is accepted as is.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(64, ge=4, le=4096)
    num_channels: int = Field(128, ge=1)
    num_res_blocks: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_heads_upsample: int = Field(-1, ge=-1)
    attention_resolutions: tuple[int, ...] = (16, 8)
    channel_mult: tuple[int, ...] | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    learn_sigma: bool = False
    sigma_small: bool = False
    class_cond: bool = False
    diffusion_steps: int = Field(1000, ge=1, le=100_000)
    noise_schedule: Schedule = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True

    @field_validator("attention_resolutions", "channel_mult", mode="before")
    @classmethod
    def _int_list(cls, value: Any) -> Any:
        # The reference passes these as comma-separated strings ("16,8").
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip()) if value.strip() else ()
        return value


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert_checkpoint`` wrote."""

    out: Path
    source: Path
    config: CheckpointConfig
    kind: str
    num_parameters: int
    num_tensors: int

    def to_json(self) -> dict[str, Any]:
        diffusion = self.config.diffusion
        return {"out": str(self.out), "from": str(self.source), "kind": self.kind,
                "num_parameters": self.num_parameters, "num_tensors": self.num_tensors,
                "model": self.config.model.model_dump(mode="json"), "diffusion": diffusion.model_dump(mode="json")}


def read_reference_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A ``.pt`` state dict, read without unpickling objects: names -> floating-point tensors, else one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if _looks_like_safetensors(path):
        # A state dict someone stored as safetensors reads as well; a ddpmctl checkpoint needs no conversion.
        tensors, metadata = load_tensors(path)
        if metadata.get("format", "").startswith("ddpmctl/"):
            raise CheckpointError(f"{path} is already a ddpmctl checkpoint: use it as it is")
        loaded: Any = tensors
    else:
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error line says it all
                warnings.simplefilter("ignore")
                loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError (a refused object), RuntimeError (not a torch file), EOFError
            raise CheckpointError(f"{path} {_load_problem(err)}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a state dict (a map of names to "
                              "tensors, as improved-diffusion saves them)")
    state: dict[str, torch.Tensor] = {}
    for name, value in loaded.items():
        shown = repr(name)[:60]
        if not isinstance(name, str):
            raise CheckpointError(f"{path} is not a state dict: key {shown} is not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path} is not a state dict of tensors: entry {shown} is a "
                                  f"{type(value).__name__} (convert reads model weights only, e.g. not the "
                                  "optimizer's opt*.pt)")
        if value.layout != torch.strided or not value.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {shown} is {value.dtype} {str(value.layout)[6:]}, not a dense "
                                  "floating-point weight")
        state[name] = value
    if not state:
        raise CheckpointError(f"{path} holds an empty state dict")
    return state


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header's "{"."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= path.stat().st_size - 8


def _load_problem(err: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, as the rest of one line."""
    text = " ".join(str(err).split())
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if refused:
        return (f"holds a Python object ({refused.group(1)[:80]}), not only tensors; convert reads plain state dicts "
                "and never unpickles objects")
    if "GLOBAL" in text:  # another torch wording of the same refusal
        return "holds a Python object, not only tensors; convert reads plain state dicts and never unpickles objects"
    if "Unsupported operand" in text:
        return "is not a PyTorch state dict (pickle data that torch.load's weights-only reader refuses)"
    if isinstance(err, EOFError) or "zip archive" in text or "central directory" in text:
        return "is truncated or not a PyTorch file"
    return f"cannot be read as a PyTorch state dict ({text[:160] or type(err).__name__})"


def map_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's parameter names -> ddpmctl's: the same names (``ddpmctl.unet`` keeps the reference's module
    layout: ``input_blocks.N.0.in_layers.2.weight``, ``.skip_connection``, ``.op``, ``.qkv``, ``.proj_out``, ...),
    without the ``module.`` prefix that DataParallel / DDP wrappers add."""
    if state and all(name.startswith("module.") for name in state):
        return {name[len("module."):]: tensor for name, tensor in state.items()}
    return dict(state)


def _flag_problems(flags: ReferenceFlags, state: dict[str, torch.Tensor]) -> str | None:
    """Flags that visibly disagree with the file, named so the user knows which one to change."""
    first, out = state.get("input_blocks.0.0.weight"), state.get("out.2.weight")
    if first is not None and first.ndim == 4 and first.shape[0] != flags.num_channels:
        return (f"--num_channels {flags.num_channels}, but the file's network has {first.shape[0]} base channels "
                "(input_blocks.0.0.weight)")
    if first is not None and out is not None and first.ndim == 4 and out.ndim >= 1:
        learned = out.shape[0] == 2 * first.shape[1]
        if learned != flags.learn_sigma:
            return (f"--learn_sigma {flags.learn_sigma}, but the file's network outputs {out.shape[0]} channels for "
                    f"{first.shape[1]} input channels: pass --learn_sigma {learned}")
    if ("label_emb.weight" in state) != flags.class_cond:
        has = "holds a class embedding (label_emb.weight)" if flags.class_cond is False else "has no class embedding"
        return f"--class_cond {flags.class_cond}, but the file {has}: pass --class_cond {not flags.class_cond}"
    return None


def _diffusion_config(flags: ReferenceFlags) -> DiffusionConfig:
    """create_gaussian_diffusion's choices: loss, mean and variance types from the flags."""
    if not flags.rescale_timesteps and flags.diffusion_steps != 1000:
        raise OptionError(f"--rescale_timesteps False: that network saw t in 0..{flags.diffusion_steps - 1}, but "
                          "ddpmctl always feeds t * 1000 / T; the two agree only with --diffusion_steps 1000")
    # With a fixed variance the reference's RESCALED_MSE has no VLB term: plain MSE (ddpmctl's "simple").
    hybrid = flags.rescale_learned_sigmas and flags.learn_sigma
    loss = "rescaled_kl" if flags.use_kl else "rescaled_mse" if hybrid else "mse"
    if flags.learn_sigma:
        var = "learned_range"
    else:
        var = "fixed_small" if flags.sigma_small else "fixed_large"
    use = None
    if flags.timestep_respacing:
        try:
            use = tuple(sorted(space_timesteps(flags.diffusion_steps, flags.timestep_respacing)))
        except ValueError as err:
            raise OptionError(f"--timestep_respacing {flags.timestep_respacing!r}: {err}") from None
    return DiffusionConfig(schedule=flags.noise_schedule, timesteps=flags.diffusion_steps,
                           mean_type="x0" if flags.predict_xstart else "eps", var_type=var, loss_type=loss,
                           use_timesteps=use)


def reference_config(flags: ReferenceFlags, state: dict[str, torch.Tensor]) -> CheckpointConfig:
    """The ddpmctl config of the network and diffusion the flags build (input channels and class count are read
    from the weights: the reference fixes them at 3 and 1000)."""
    problem = _flag_problems(flags, state)
    if problem is not None:
        raise OptionError(problem)
    if flags.num_heads_upsample not in (-1, flags.num_heads):
        raise OptionError(f"--num_heads_upsample {flags.num_heads_upsample}: ddpmctl's U-Net uses --num_heads "
                          f"({flags.num_heads}) heads in every attention block")
    mult = flags.channel_mult or REFERENCE_CHANNEL_MULT.get(flags.image_size)
    if mult is None:
        raise OptionError(f"--image_size {flags.image_size}: improved-diffusion builds 32, 64 and 256 only; for "
                          "another size give its --channel_mult (e.g. 1,2,2)")
    first = state.get("input_blocks.0.0.weight")
    in_channels = int(first.shape[1]) if first is not None and first.ndim == 4 else 3
    label = state.get("label_emb.weight")
    try:
        model = ModelConfig(image_size=flags.image_size, in_channels=in_channels, model_channels=flags.num_channels,
                            num_res_blocks=flags.num_res_blocks, attention_resolutions=flags.attention_resolutions,
                            dropout=flags.dropout, channel_mult=mult, num_heads=flags.num_heads,
                            use_scale_shift_norm=flags.use_scale_shift_norm,
                            num_classes=int(label.shape[0]) if label is not None and label.ndim == 2 else None)
        return CheckpointConfig(model=model, diffusion=_diffusion_config(flags))
    except ValidationError as err:
        raise OptionError(f"the flags describe no ddpmctl network: {validation_problem(err)}") from None


def _check_against_network(path: Path, config: CheckpointConfig, state: dict[str, torch.Tensor]) -> None:
    """Every name and shape equal to the network the flags build (on the meta device: no memory, no init)."""
    expected = {name: tuple(t.shape) for name, t in build_model(config, device="meta").state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    hint = "check --image_size, --num_res_blocks, --attention_resolutions and --num_channels"
    if missing or extra:
        what = (f"{len(missing)} tensor(s) the flags' network needs are missing ({', '.join(missing[:3])})" if missing
                else f"{len(extra)} tensor(s) the flags' network lacks ({', '.join(extra[:3])})")
        raise CheckpointError(f"{path} does not match the flags: {what}; {hint}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path} does not match the flags: {name} has shape {list(state[name].shape)}, the "
                                  f"flags' network needs {list(shape)}; {hint}")


def convert_checkpoint(source: str | os.PathLike[str], out: str | os.PathLike[str],
                       flags: ReferenceFlags) -> ConvertResult:
    """Read an improved-diffusion ``.pt`` state dict and write it, checked, as one ddpmctl checkpoint (atomic).

    The caller decides whether ``out`` may be overwritten. OptionError: flags that contradict each other or the
    file; CheckpointError: the file is unreadable, not a state dict of tensors, or not the flags' network.
    """
    source, out = Path(source), Path(out)
    state = map_state_dict(read_reference_state_dict(source))
    config = reference_config(flags, state)
    _check_against_network(source, config, state)
    kind = "respaced" if config.diffusion.use_timesteps is not None else "model"
    lineage = [{"op": "convert", "from": source.name, "sha256": file_sha256(source), "source": SOURCE,
                "flags": flags.model_dump(mode="json", exclude_defaults=True)}]
    weights = {name: tensor.float() for name, tensor in state.items()}  # the reference's fp16 exports included
    save_checkpoint(out, weights, config, kind=kind, lineage=lineage)
    return ConvertResult(out=out, source=source, config=config, kind=kind,
                         num_parameters=sum(t.numel() for t in weights.values()), num_tensors=len(weights))
