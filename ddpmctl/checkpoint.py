"""The one checkpoint format: safetensors with ddpmctl metadata; atomic writes, validated loads, never pickle.

A checkpoint holds the network's state dict and, in safetensors' string metadata, ``format`` ("ddpmctl/1"),
``config`` (JSON of :class:`~ddpmctl.config.CheckpointConfig`), ``kind`` (model | respaced | student | ddgan),
``lineage`` (JSON list of what produced it) and ``created_with`` (the ddpmctl version).

Files are untrusted: the loader reads the 8-byte header length and the JSON header itself (with a size cap), checks
every offset against the file size and the tensor names, shapes and dtypes against the network the config
describes, and only then lets safetensors read the data. Every problem is one line of :class:`CheckpointError`
naming the file. This is the only module that imports safetensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from pydantic import ValidationError

import ddpmctl
from ddpmctl.build import build_diffusion, build_model
from ddpmctl.config import CheckpointConfig
from ddpmctl.errors import CheckpointError, validation_problem
from ddpmctl.fileio import atomic_write
from ddpmctl.hardware import memory_format

if TYPE_CHECKING:  # pragma: no cover
    from ddpmctl.diffusion import GaussianDiffusion
    from torch import nn

FORMAT = "ddpmctl/1"
KINDS = ("model", "respaced", "student", "ddgan")

# Same cap as safetensors' own MAX_HEADER_SIZE, so anything accepted here is accepted by the library too.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype tag -> (torch dtype, bytes per element); tags torch lacks are refused as unsupported.
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
# Weights stored in a lower precision are cast up to the network's float32 on load.
_FLOAT_TAGS = ("F32", "F16", "BF16")
_TAG_OF = {dtype: tag for tag, (dtype, _) in _DTYPES.items()}

_PICKLE_HINT = "is a PyTorch pickle checkpoint; ddpmctl never loads pickle (convert it to safetensors first)"


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and safetensors dtype tag (e.g. "F32") of one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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


# --------------------------------------------------------------------------------------------------------------
# Atomic writes


def _atomic_write(path: Path, write: Callable[[Path], None], *, what: str) -> Path:
    """fileio.atomic_write with one-line CheckpointErrors that say whether a previous file is untouched."""
    path = Path(path)
    untouched = f"the previous {what} is untouched" if path.exists() else f"no {what} was written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, write)
    except (OSError, safetensors.SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointError(f"could not write {path}: {reason}; {untouched}") from None


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; tensors sharing storage are cloned (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors must map str -> torch.Tensor, got {type(name).__name__} -> "
                            f"{type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        whole = t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        if (ptr in seen and t.numel() > 0) or not whole:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, *, what: str = "file") -> Path:
    """Atomically write ``tensors`` (+ string ``metadata``) as one safetensors file; returns the path."""
    payload = _cpu_tensors(tensors)
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    # Looked up at call time (not imported by name) so a test can simulate a failing disk.
    return _atomic_write(Path(path), lambda tmp: safetensors.torch.save_file(payload, str(tmp), metadata=meta),
                         what=what)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (run-folder state, configs)."""
    text = json.dumps(obj, indent=2, default=str) + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return _atomic_write(Path(path), write, what="file")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (checkpoint identity in lineage)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    return digest.hexdigest()


def _check_consistency(config: CheckpointConfig, kind: str) -> str | None:
    """Cross-field problems a config can have although each field validates; None when consistent."""
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {', '.join(KINDS)}"
    if kind == "student" and config.student is None:
        return "kind is student but config.student is missing"
    if kind != "student" and config.student is not None:
        return f"kind is {kind} but config.student is set (only student checkpoints have one)"
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


@dataclass
class _Header:
    metadata: dict[str, str] | None
    tensors: list[TensorInfo]
    offsets: dict[str, tuple[int, int]]
    file_size: int


def _foreign_kind(path: Path, head: bytes) -> str | None:
    """What a file that is not a safetensors file is, when its first bytes tell: an honest error names it.

    A torch.save file is a zip archive holding ``data.pkl`` or a bare pickle (opcode 0x80, protocol 2..5); an
    ``.npz`` (such as ``ddpmctl sample``'s samples.npz) is a zip archive of ``.npy`` arrays.
    """
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile, ValueError):
            names = []
        if names and all(name.endswith(".npy") for name in names):
            return "is a NumPy .npz archive (e.g. samples from `ddpmctl sample`), not a checkpoint"
        if names and not any(name.endswith(".pkl") for name in names):
            return "is a zip archive, not a checkpoint"
        return _PICKLE_HINT
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _PICKLE_HINT
    if head.startswith(b"\x93NUMPY"):
        return "is a NumPy .npy array, not a checkpoint"
    if head.startswith(b"\x89PNG"):
        return "is a PNG image, not a checkpoint"
    return None


def _check_path(path: Path) -> os.stat_result:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file")
    return info


def _parse_tensor_entry(path: Path, name: str, entry: Any) -> tuple[TensorInfo, tuple[int, int]]:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt safetensors header: tensor {name!r} {problem}")

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("is not an object with dtype, shape and data_offsets")
    tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(tag, str):
        raise bad("has a dtype that is not a string")
    if tag not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag[:20]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad("has a shape that is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad("has data_offsets that are not two increasing non-negative integers")
    nbytes = math.prod(shape) * _DTYPES[tag][1]
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"has {offsets[1] - offsets[0]} bytes of data for shape {shape} ({nbytes} needed)")
    return TensorInfo(name, tuple(shape), tag), (offsets[0], offsets[1])


def _read_header(path: Path) -> _Header:
    """Parse and check the safetensors header ourselves: bounded reads, offsets within the file, no code run."""
    size = _check_path(path).st_size
    not_safetensors = f"{path} is not a safetensors file"
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                if (kind := _foreign_kind(path, head)) is not None:
                    raise CheckpointError(f"{path} {kind}")
                raise CheckpointError(f"{not_safetensors} (only {size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length < 2 or length > MAX_HEADER_BYTES or length > size - 8:
                if (kind := _foreign_kind(path, head)) is not None:
                    raise CheckpointError(f"{path} {kind}")
                first = handle.read(1)
                if first == b"{" and 2 <= length <= MAX_HEADER_BYTES:
                    # A plausible header that runs past the end of the file: cut off during a copy or write.
                    raise CheckpointError(f"{path} is truncated: its header needs {length} bytes but only "
                                          f"{size - 8} follow")
                raise CheckpointError(f"{not_safetensors} (bad header length)")
            raw = handle.read(length)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        if (kind := _foreign_kind(path, head)) is not None:
            raise CheckpointError(f"{path} {kind}") from None
        raise CheckpointError(f"{not_safetensors} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_safetensors} (its header is not a JSON object)")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path} has a corrupt safetensors header: __metadata__ is not a map of strings")
    tensors: list[TensorInfo] = []
    offsets: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        info, span = _parse_tensor_entry(path, name, entry)
        tensors.append(info)
        offsets[name] = span

    # The data buffer must be exactly the tensors back to back, as safetensors itself requires.
    data_size = size - 8 - length
    end = 0
    for begin, stop in sorted(offsets.values()):
        if begin != end:
            raise CheckpointError(f"{path} has a corrupt safetensors header: tensor data overlaps or has gaps")
        end = stop
    if end > data_size:
        raise CheckpointError(f"{path} is truncated: its header promises {end} bytes of tensor data but only "
                              f"{data_size} are present")
    if end < data_size:
        raise CheckpointError(f"{path} has {data_size - end} unexpected bytes after its tensor data")
    return _Header(metadata, tensors, offsets, size)


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
    header = _read_header(path)
    config, kind, lineage, created_with = _validate_metadata(path, header.metadata)
    return CheckpointInfo(path=path, format=FORMAT, kind=kind, config=config, lineage=lineage,
                          created_with=created_with, tensors=header.tensors, file_size=header.file_size)


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _meta_network(path: Path, config: CheckpointConfig, header: _Header) -> nn.Module:
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


def _check_tensors(path: Path, header: _Header, expected: dict[str, torch.Tensor]) -> None:
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
            if have.dtype not in _FLOAT_TAGS:
                raise CheckpointError(f"{path}: tensor {name} has dtype {have.dtype}, expected a floating-point "
                                      f"dtype ({', '.join(_FLOAT_TAGS)})")
        elif have.dtype != _TAG_OF.get(want.dtype):
            raise CheckpointError(f"{path}: tensor {name} has dtype {have.dtype}, expected "
                                  f"{_TAG_OF.get(want.dtype, want.dtype)}")


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensor data via safetensors (only after our own header checks); any library error becomes one line."""
    try:
        out: dict[str, torch.Tensor] = {}
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in names:
                out[name] = handle.get_tensor(name)
        return out
    except Exception as err:  # SafetensorError, OSError, or the file changing under us
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise CheckpointError(f"{path} could not be read as safetensors: {message}") from None


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Validate and load a checkpoint: the network (weights loaded, eval mode, on ``device``) and its diffusion."""
    path = Path(path)
    header = _read_header(path)
    config, kind, lineage, created_with = _validate_metadata(path, header.metadata)
    model = _meta_network(path, config, header)
    expected = dict(model.state_dict())
    _check_tensors(path, header, expected)
    state = _read_tensors(path, list(expected))
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


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a run-folder safetensors file (training / distill state): tensors and string metadata."""
    path = Path(path)
    header = _read_header(path)
    tensors = _read_tensors(path, [t.name for t in header.tensors])
    return tensors, dict(header.metadata or {})


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
