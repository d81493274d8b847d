"""The ``ddpmctl`` Typer app: registers one thin module per command."""

from __future__ import annotations

from typing import Optional

import typer

from ddpmctl import __version__
from ddpmctl.cli import distill, eval_nll, info, respace, sample, samplers, train

app = typer.Typer(
    name="ddpmctl",
    help="Train, sample, evaluate and distill Improved-DDPM diffusion models on image folders.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
app.command("respace")(respace.respace_command)
app.command("distill")(distill.distill_command)
app.command("samplers")(samplers.samplers_command)
app.command("info")(info.info_command)


def main() -> None:
    """The console script (and ``python -m ddpmctl``, torchrun's ``-m ddpmctl``)."""
    from ddpmctl.allocator import tune_malloc

    tune_malloc()
    app()
