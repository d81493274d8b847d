"""The one checkpoint format: safetensors with ddpmctl metadata; atomic writes, validated loads, never pickle.

A checkpoint holds the network's state dict and, in safetensors' string metadata, ``format`` ("ddpmctl/1"),
``config`` (JSON of :class:`~ddpmctl.config.CheckpointConfig`), ``kind`` (model | respaced | student | ddgan | cld),
``lineage`` (JSON list of what produced it) and ``created_with`` (the ddpmctl version).

Files are untrusted: the loader reads the 8-byte header length and the JSON header itself (with a size cap), checks
every offset against the file size and the tensor names, shapes and dtypes against the network the config
describes, and only then lets safetensors read the data (the file layer: :mod:`ddpmctl.fileio`). Every problem is
one line of :class:`CheckpointError` naming the file. ``save_tensors``, ``load_tensors``, ``write_json_atomic`` and
``file_sha256`` live in :mod:`ddpmctl.fileio` (imported here for older callers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

import ddpmctl
from ddpmctl.build import build_diffusion, build_model
from ddpmctl.config import CheckpointConfig
from ddpmctl.errors import CheckpointError, validation_problem
from ddpmctl.fileio import (
    FLOAT_TAGS,
    TAG_OF,
    SafetensorsHeader,
    TensorInfo,
    file_sha256,
    load_tensors,
    read_header,
    read_tensor_data,
    save_tensors,
    write_json_atomic,
)
from ddpmctl.hardware import memory_format

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.diffusion import GaussianDiffusion
    from torch import nn

FORMAT = "ddpmctl/1"
KINDS = ("model", "respaced", "student", "ddgan", "cld")




@dataclass
class CheckpointInfo:
    """What a checkpoint holds, validated from its header alone (no network built, no weights read)."""

    path: Path
    format: str
    kind: str
    config: CheckpointConfig
    lineage: list[dict[str, Any]]
    created_with: str
    tensors: list[TensorInfo]
    file_size: int

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass
class LoadedCheckpoint:
    """A validated checkpoint: the network (eval mode, on its device) and the diffusion it samples with."""

    path: Path
    config: CheckpointConfig
    kind: str
    lineage: list[dict[str, Any]]
    created_with: str
    model: nn.Module  # the UNetModel
    diffusion: GaussianDiffusion
    num_parameters: int
    sha256: str = field(repr=False)


def _check_consistency(config: CheckpointConfig, kind: str) -> str | None:
    """Cross-field problems a config can have although each field validates; None when consistent."""
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {', '.join(KINDS)}"
    if kind == "student" and config.student is None:
        return "kind is student but config.student is missing"
    if kind != "student" and config.student is not None:
        return f"kind is {kind} but config.student is set (only student checkpoints have one)"
    if (kind == "cld") != (config.cld is not None):
        return ("kind is cld but config.cld is missing" if kind == "cld"
                else f"kind is {kind} but config.cld is set (only cld checkpoints have one)")
    return _check_ddgan(config, kind)


def _check_ddgan(config: CheckpointConfig, kind: str) -> str | None:
    """A DDGAN generator (kind ddgan) has a latent input, predicts x_0 on a whole VP-SDE chain; nothing else does."""
    generator = config.model.latent is not None
    if kind != "ddgan":
        return f"kind is {kind} but the network has a latent input (only ddgan checkpoints have one)" \
            if generator else None
    diffusion = config.diffusion
    if not generator:
        return "kind is ddgan but config.model.latent is missing"
    if diffusion.schedule != "vp-sde" or diffusion.mean_type != "x0" or diffusion.var_type != "fixed_small" \
            or diffusion.use_timesteps is not None:
        return ("kind is ddgan but the diffusion is not the whole vp-sde chain with mean type x0 and var type "
                "fixed_small")
    return None


def save_checkpoint(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                    config: CheckpointConfig, *, kind: str, lineage: list[dict[str, Any]]) -> Path:
    """Atomically write a ddpmctl checkpoint (docs/design.md "The checkpoint format"); returns the path."""
    problem = _check_consistency(config, kind)
    if problem is not None:
        raise ValueError(f"refusing to write an inconsistent checkpoint: {problem}")
    metadata = {
        "format": FORMAT,
        "config": config.model_dump_json(),
        "kind": kind,
        "lineage": json.dumps(list(lineage), default=str),
        "created_with": ddpmctl.__version__,
    }
    return save_tensors(path, state_dict, metadata, what="checkpoint")


# --------------------------------------------------------------------------------------------------------------
# Validated reading


def _short(value: str, limit: int = 40) -> str:
    """A quoted, single-line excerpt of an untrusted string for an error message."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


_FORMAT_RE = re.compile(r"^ddpmctl/(\d{1,9})$")


def _validate_metadata(path: Path, metadata: dict[str, str] | None) -> tuple[CheckpointConfig, str, list, str]:
    """format, kind, config, lineage, created_with -> validated values (docs/design.md "The checkpoint format")."""
    if not metadata or "format" not in metadata:
        raise CheckpointError(f"{path} has no ddpmctl metadata: was it written by ddpmctl?")
    fmt = metadata["format"]
    if fmt != FORMAT:
        match = _FORMAT_RE.match(fmt)
        if match and int(match.group(1)) > int(FORMAT.split("/")[1]):
            raise CheckpointError(f"{path}: format {fmt} is newer than this ddpmctl understands ({FORMAT}); "
                                  "upgrade ddpmctl to read it")
        raise CheckpointError(f"{path} has unknown format {_short(fmt)} (this ddpmctl reads {FORMAT})")
    kind = metadata.get("kind")
    if kind not in KINDS:
        shown = "missing" if kind is None else _short(kind)
        raise CheckpointError(f"{path}: kind is {shown}; expected one of {', '.join(KINDS)}")
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no config metadata")
    try:
        config = CheckpointConfig.model_validate_json(metadata["config"])
    except ValidationError as err:
        if any(e.get("type") == "json_invalid" for e in err.errors()):
            raise CheckpointError(f"{path}: config metadata is not valid JSON") from None
        problem = validation_problem(err, lambda loc: ".".join(map(str, ("config", *loc))))
        raise CheckpointError(f"{path}: invalid {problem}") from None
    problem = _check_consistency(config, kind)
    if problem is not None:
        raise CheckpointError(f"{path}: inconsistent config: {problem}")
    try:
        lineage = json.loads(metadata.get("lineage", "[]"))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: lineage metadata is not valid JSON") from None
    if not isinstance(lineage, list) or not all(isinstance(entry, dict) for entry in lineage):
        raise CheckpointError(f"{path}: lineage metadata is not a JSON list of objects")
    created_with = metadata.get("created_with", "unknown")
    return config, kind, lineage, created_with


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Header, metadata and tensor list of a checkpoint, validated without building the network (``ddpmctl info``)."""
    path = Path(path)
    header = read_header(path)
    config, kind, lineage, created_with = _validate_metadata(path, header.metadata)
    return CheckpointInfo(path=path, format=FORMAT, kind=kind, config=config, lineage=lineage,
                          created_with=created_with, tensors=header.tensors, file_size=header.file_size)


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _meta_network(path: Path, config: CheckpointConfig, header: SafetensorsHeader) -> nn.Module:
    """The config's network on the meta device: its state dict's names, shapes and dtypes, without memory. The
    stored weights are later assigned to it, so the network is built once and nothing is initialised in vain."""
    model_cfg = config.model
    # Each residual block holds several tensors: a config asking for more blocks than the file has tensors cannot
    # match, and refusing it here keeps a hostile config from making us build an enormous module tree.
    if len(model_cfg.channel_mult) * model_cfg.num_res_blocks > len(header.tensors):
        raise CheckpointError(f"{path}: the config describes a network with more blocks than the file has "
                              f"tensors ({len(header.tensors)})")
    try:
        return build_model(config, device="meta")
    except CheckpointError:
        raise
    except Exception as err:  # untrusted config values the network code rejects
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{path}: config.model does not describe a buildable network: {message}") from None


def _check_tensors(path: Path, header: SafetensorsHeader, expected: dict[str, torch.Tensor]) -> None:
    stored = {t.name: t for t in header.tensors}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing:
        raise CheckpointError(f"{path} does not match its config: {len(missing)} tensor(s) missing "
                              f"({_names(missing)})")
    if extra:
        raise CheckpointError(f"{path} does not match its config: {len(extra)} unexpected tensor(s) "
                              f"({_names(extra)})")
    for name, want in expected.items():
        have = stored[name]
        if have.shape != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(have.shape)}, the config's network "
                                  f"needs {list(want.shape)}")
        if want.dtype.is_floating_point:
            if have.dtype not in FLOAT_TAGS:
                raise CheckpointError(f"{path}: tensor {name} has dtype {have.dtype}, expected a floating-point "
                                      f"dtype ({', '.join(FLOAT_TAGS)})")
        elif have.dtype != TAG_OF.get(want.dtype):
            raise CheckpointError(f"{path}: tensor {name} has dtype {have.dtype}, expected "
                                  f"{TAG_OF.get(want.dtype, want.dtype)}")


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Validate and load a checkpoint: the network (weights loaded, eval mode, on ``device``) and its diffusion."""
    path = Path(path)
    header = read_header(path)
    config, kind, lineage, created_with = _validate_metadata(path, header.metadata)
    model = _meta_network(path, config, header)
    expected = dict(model.state_dict())
    _check_tensors(path, header, expected)
    state = read_tensor_data(path, list(expected))
    for name, tensor in state.items():
        if expected[name].dtype.is_floating_point and tensor.dtype != expected[name].dtype:
            # fp16/bf16 weights (e.g. from a half-precision export) are cast up to the network's dtype.
            state[name] = tensor.to(expected[name].dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as err:  # shapes were checked above; this is a last line of defence for untrusted files
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{path}: weights do not fit the config's network: {message}") from None
    # channels_last where it wins (hardware.fast_paths): oneDNN's convolutions run fastest in it.
    model.eval().to(device, memory_format=memory_format(device))
    try:
        diffusion = build_diffusion(config.diffusion)
    except (ValueError, RuntimeError) as err:
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{path}: config.diffusion does not build: {message}") from None
    return LoadedCheckpoint(
        path=path,
        config=config,
        kind=kind,
        lineage=lineage,
        created_with=created_with,
        model=model,
        diffusion=diffusion,
        num_parameters=sum(p.numel() for p in model.parameters()),
        sha256=file_sha256(path),
    )


__all__ = [
    "FORMAT",
    "KINDS",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "TensorInfo",
    "file_sha256",
    "load_checkpoint",
    "load_tensors",
    "read_checkpoint_info",
    "save_checkpoint",
    "save_tensors",
    "write_json_atomic",
]
