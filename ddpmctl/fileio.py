"""Files: atomic writes, safetensors files read through a checked header, JSON, SHA-256.

Atomic writes: a temporary file beside the target, never clobbering, with the mode the umask gives, fsynced and
renamed over the target once complete (checkpoints, run-folder state, images, samples.npz).
``tempfile.mkstemp`` creates files owner-only (0600), whatever the umask: images and checkpoints written through
it could not be read by the group or others even where the user's umask allows it. These files are created like
``open(path, "w")`` creates them (0666 minus the umask).

Safetensors files are untrusted: :func:`read_header` reads the 8-byte header length and the JSON header itself
(with a size cap) and checks every offset against the file size before safetensors reads any data; every problem
is one line of :class:`CheckpointError` naming the file, and a file that is something else (a PyTorch pickle, an
``.npz``, a PNG) is named for what it is. Nothing is ever unpickled. This is the only module that imports
safetensors; :mod:`ddpmctl.checkpoint` builds the checkpoint format on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ddpmctl.errors import CheckpointError

__all__ = ["FLOAT_TAGS", "MAX_HEADER_BYTES", "TAG_OF", "SafetensorsHeader", "TensorInfo", "atomic_write",
           "create_temp_beside", "file_sha256", "load_tensors", "read_header", "read_tensor_data", "save_tensors",
           "write_json_atomic"]


def create_temp_beside(path: Path) -> tuple[Path, int]:
    """Create ``.{name}.{pid}.{random}.tmp`` in ``path``'s folder; returns (its path, an fd open for writing).

    O_EXCL: never follows or overwrites something already there; mode 0o666 lets the umask decide, as open() does.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, fd


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); platforms that cannot open directories simply skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path`` (its folder must exist), which is then fsynced and
    renamed over ``path``. Whatever fails or interrupts it, no half-written file is left under either name and a
    previous ``path`` stays as it was; the error propagates."""
    tmp, fd = create_temp_beside(path)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        write(tmp)
        # A writer may re-create the file (safetensors makes it owner-only): give it the mode open() would have.
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------------------------------------------
# Safetensors files, JSON, hashes

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
FLOAT_TAGS = ("F32", "F16", "BF16")
TAG_OF = {dtype: tag for tag, (dtype, _) in _DTYPES.items()}

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


@dataclass
class SafetensorsHeader:
    """A checked safetensors header: string metadata, the tensors, their data offsets and the file size."""

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


def read_header(path: Path) -> SafetensorsHeader:
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
    return SafetensorsHeader(metadata, tensors, offsets, size)


def read_tensor_data(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
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


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a run-folder safetensors file (training / distill state): tensors and string metadata."""
    path = Path(path)
    header = read_header(path)
    tensors = read_tensor_data(path, [t.name for t in header.tensors])
    return tensors, dict(header.metadata or {})
