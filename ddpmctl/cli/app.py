"""The ``ddpmctl`` Typer app: registers one thin module per command.

Importing this module must stay cheap (``ddpmctl --version`` and ``--help`` in well under half a second): the command
modules import torch, numpy, pydantic, safetensors and PIL inside the command functions, never at module level
(tests/test_cli_startup.py checks this; benchmarks/bench_startup.py times it).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from ddpmctl import __version__
from ddpmctl.cli import convert, distill, eval_nll, eval_samples, info, plot, respace, sample, samplers, train
from ddpmctl.errors import range_wording

try:  # typer >= 0.26 ships its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses the click package
    from click.exceptions import ClickException  # type: ignore[no-redef]


_BAD_VALUE = re.compile(r"^Invalid value for '([^']+)'(?: / '[^']+')*: (.*)$")


def usage_line(err: Any) -> str:
    """A click usage error as one line: 'error: <command>: <problem> (see `<command> --help`)'."""
    message = " ".join(line.strip() for line in err.format_message().splitlines() if line.strip())
    message = message.replace("Value error, ", "").rstrip(".")  # typer's validator wording, one style of line
    bad_value = _BAD_VALUE.match(message)
    if bad_value is not None and (ranged := range_wording(bad_value.group(2))) is not None:
        message = f"{bad_value.group(1)} {ranged}"  # the wording of every other range check
    ctx = getattr(err, "ctx", None)
    if ctx is None:
        return f"error: {message}"
    return f"error: {ctx.command_path}: {message} (see `{ctx.command_path} --help`)"


def _plain_flags(command: Any, ctx: Any) -> None:
    """Show flags (``--resume``, ``--flip/--no-flip``, ``--help``) without a value placeholder: they take none.

    Recent typer labels every option with its type, ``--resume <bool>``, which reads as if ``--resume true`` worked.
    """
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


def _fold_long_option_names() -> None:
    """Show long option names whole in narrow terminals: folded onto a second line, never cut to ``--no-skip-bad-i…``.

    Typer's help table cuts a cell that does not fit with an ellipsis; a name is what the user has to type."""
    from rich.text import Text
    from typer import rich_utils

    if not getattr(rich_utils._get_parameter_help, "folds", False):  # the help column: "[default: ...]" too
        parameter_help = rich_utils._get_parameter_help

        def folded_help(**kwargs: Any) -> Any:
            columns = parameter_help(**kwargs)
            for item in columns.renderables:
                if isinstance(item, Text):
                    item.overflow = "fold"
            return columns

        folded_help.folds = True  # type: ignore[attr-defined]
        rich_utils._get_parameter_help = folded_help
    for name in ("highlighter", "negative_highlighter"):
        original = getattr(rich_utils, name)
        if getattr(original, "folds", False):
            continue

        class Folding(type(original)):  # type: ignore[misc]
            folds = True

            def __call__(self, text: Any) -> Any:
                rendered = super().__call__(text)
                rendered.overflow = "fold"
                return rendered

        setattr(rich_utils, name, Folding())


class OneLineErrorGroup(TyperGroup):
    """Typer's group, but a usage error is one line on stderr (exit 2) like every other ddpmctl error.

    Typer draws its own errors as a multi-line rich box; everything ddpmctl reports itself is a single
    ``error: ...`` line, so scripts can grep one format.
    """

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command, ctx)
            _fold_long_option_names()
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_flags(self, ctx)
        _fold_long_option_names()
        super().format_help(ctx, formatter)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as err:
            typer.echo(usage_line(err), err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # Without standalone mode a command's typer.Exit(code) comes back as its return value.
        sys.exit(code if isinstance(code, int) else 0)


def _hyphenated(token: str) -> str:
    return token.replace("_", "-")


app = typer.Typer(
    name="ddpmctl",
    cls=OneLineErrorGroup,
    help="Train, sample, evaluate and distill Improved-DDPM diffusion models on image folders.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # One spelling per name, both accepted: a choice or option name typed with underscores (learned_range, as
    # config files and the reference write it) means the hyphenated one the command line shows (learned-range).
    context_settings={"help_option_names": ["-h", "--help"], "token_normalize_func": _hyphenated},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddpmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        None, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, sample, evaluate and distill Improved-DDPM diffusion models on image folders."""


app.command("train")(train.train_command)
app.command("sample")(sample.sample_command)
app.command("eval-nll")(eval_nll.eval_nll_command)
app.command("eval-samples")(eval_samples.eval_samples_command)
app.command("respace")(respace.respace_command)
app.command("distill")(distill.distill_command)
app.command("samplers")(samplers.samplers_command)
app.command("info")(info.info_command)
app.command("convert")(convert.convert_command)
app.command("plot")(plot.plot_command)


def main() -> None:
    """The console script (and ``python -m ddpmctl``, torchrun's ``-m ddpmctl``)."""
    from ddpmctl.allocator import tune_malloc
    from ddpmctl.cpuclass import CpuClassError, lower_kernels_to_cpu_class

    tune_malloc()
    try:
        # Before torch runs anything: a simulated lower CPU class runs that class's kernels too.
        lower_kernels_to_cpu_class()
    except CpuClassError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    app()
