"""What every command shares: the one-line error contract, consoles, ``--device``, choices and ``--json`` output.

Exit codes: 2 = the command line is wrong (an unknown option, a value of the wrong type, a choice that does not
exist, a number out of range, also a range that the named checkpoint sets, such as ``--steps`` > T, an unknown
sampler or sampler option); 1 = anything else (files, data, checkpoints, run folders, the machine); 130 = Ctrl-C.
Every error is one ``error: ...`` line on stderr.

No heavy import here (torch, numpy, pydantic): ``ddpmctl --help`` imports this module.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from ddpmctl.errors import DdpmctlError, OptionError

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=True)  # progress, tables meant for people
out_console = Console()  # stdout: tables and results



def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error line on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def usage_error(message: str) -> typer.Exit:
    """A bad option value or combination: one line, exit 2 (like typer's own parameter errors)."""
    return fail(message, code=2)


def _out_of_memory(err: BaseException) -> bool:
    """Host or GPU allocation failure (MemoryError, torch.OutOfMemoryError, the CPU allocator's RuntimeError)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def guarded(func: F) -> F:
    """Turn a library DdpmctlError into one line + exit 1, Ctrl-C into one line + exit 130.

    Out-of-memory becomes one line + exit 1 too, and so does any other unexpected exception (a bug: the line says
    how to see the traceback, ``DDPMCTL_DEBUG=1``), so a user never gets a traceback for hostile input.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OptionError as err:
            raise usage_error(_first_line(err)) from None
        except DdpmctlError as err:
            raise fail(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own exits and usage errors (exit codes already decided)
        except Exception as err:
            if os.environ.get("DDPMCTL_DEBUG"):
                raise
            if _out_of_memory(err):
                raise fail(f"out of memory ({_first_line(err)}): try a smaller --batch-size, or check that the "
                           "checkpoint's image size and network are what you expect") from None
            raise fail(f"internal error: {type(err).__name__}: {_first_line(err)} (this is a bug; rerun with "
                       "DDPMCTL_DEBUG=1 to see the traceback and please report it)") from None

    return wrapper  # type: ignore[return-value]


def resolve_device(spec: str) -> "torch.device":  # noqa: F821
    """``auto`` (CUDA when available) | ``cpu`` | ``cuda`` | ``cuda:N``."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise usage_error(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise usage_error(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    raise usage_error(f"--device must be auto, cpu, cuda or cuda:N, not {spec!r}")


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave this parameter (command line or environment), rather than it taking its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def only_for(ctx: typer.Context, applies: bool, names: tuple[str, ...], what: str) -> None:
    """Refuse options that do nothing in the chosen mode (exit 2, like a wrong value), rather than ignore them.

    ``names`` are parameter names; ``what`` says when they apply, e.g. "--estimator mc (...)"."""
    if applies:
        return
    for name in names:
        if given(ctx, name):
            flag = next((p.opts[0] for p in ctx.command.params if p.name == name), name)
            raise usage_error(f"{flag} is for {what}")


@contextlib.contextmanager
def option_errors(*kinds: type[DdpmctlError]) -> Iterator[None]:
    """Library errors of these kinds raised inside are about the command line's values: exit 2, not 1."""
    try:
        yield
    except kinds as err:
        raise usage_error(_first_line(err)) from None


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout (one JSON document)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    sys.stdout.flush()


PRECISION_HELP = ("auto | fp32 | bf16. auto: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU "
                  "with AVX-512-BF16 or AMX), else fp32; bf16 elsewhere is emulated and slower than fp32.")


def resolve_precision_option(precision: str, device: "torch.device") -> str:  # noqa: F821
    """``--precision auto|fp32|bf16`` -> the precision used on ``device`` (fp32 | bf16); exit 2 for another value.

    Where bf16 was asked for on a device that only emulates it, one warning line goes to stderr."""
    from ddpmctl.hardware import PRECISION_REQUESTS, resolve_precision

    if precision not in PRECISION_REQUESTS:
        raise usage_error(f"--precision must be one of {', '.join(PRECISION_REQUESTS)}, not {precision!r}")
    chosen, warning = resolve_precision(precision, device)
    if warning is not None:
        typer.echo(f"warning: {warning}", err=True)
    return chosen


DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto = CUDA when available)."


def device_option(help: str = DEVICE_HELP, **kwargs: Any) -> Any:
    """A fresh ``--device`` option, for ``Annotated[str, device_option()] = "auto"`` (typer mutates option objects,
    so each command needs its own)."""
    return typer.Option("--device", help=help, metavar="DEVICE", **kwargs)


CHECKPOINT_ARG_HELP = ("A ddpmctl checkpoint (.safetensors), or a run folder: a training run stands for its newest "
                       "EMA save, a distillation run for its final student.")


def resolve_checkpoint_argument(path: Path, *, quiet: bool = False) -> Path:
    """CKPT as given, or for a run folder the checkpoint it stands for (``runfolder.resolve_run_checkpoint``),
    announced on stderr as ``using FILE (newest EMA save, step N)`` unless ``quiet``.

    Every command that takes a checkpoint argument calls this first (sample, eval-nll, eval-samples, ...)."""
    if not path.is_dir():
        return path
    from ddpmctl.runfolder import resolve_run_checkpoint

    chosen = resolve_run_checkpoint(path)
    if not quiet:
        console.print(f"using {chosen.path} ({chosen.what})", markup=False, highlight=False, soft_wrap=True)
    return chosen.path


def output_file(out: str | None, source: Path, name: str, *, force: bool) -> Path:
    """Where a command that writes one file from ``source`` writes it (``--out``), checked before any work.

    An existing folder, or a path ending in a slash, means "into this folder" as ``name``; no ``--out`` means
    beside ``source``. Refused with one line (exit 1): the input file itself, an existing file without
    ``--force``, a folder that does not exist."""
    from ddpmctl.errors import CheckpointError

    if out is None:
        target = source.with_name(name)
    elif out.endswith(("/", "\\")) or Path(out).is_dir():
        target = Path(out) / name
    else:
        target = Path(out)
    if target.is_dir():
        raise CheckpointError(f"--out {target} is a folder: give a file name")
    if target.exists() and target.resolve() == source.resolve():
        raise CheckpointError(f"--out {target} is the input file: write the result elsewhere")
    if target.exists() and not force:
        raise CheckpointError(f"--out {target} exists: use --force to overwrite it")
    if not target.parent.is_dir():
        raise CheckpointError(f"cannot write --out {target}: folder {target.parent} does not exist")
    return target
