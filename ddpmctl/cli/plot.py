"""`ddpmctl plot RUN`: the run's training curves (metrics.jsonl) as one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddpmctl.cli.common import guarded, out_console, output_file, print_json


@guarded
def plot_command(
    run: Annotated[Path, typer.Argument(help="A training run folder (its metrics.jsonl).", show_default=False)],
    out: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--out", "-o", metavar="FILE|DIR", help="The PNG to write (a folder: metrics.png in it).",
        show_default="RUN/metrics.png, redrawn each time")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on success.")] = False,
) -> None:
    """Plot loss, mse, vb, loss by quartile of t, gradient norm, lr, img/s (and held-out loss, FD/FID when logged)
    against the step; needs matplotlib (pip install 'ddpmctl[plot]')."""
    from ddpmctl.errors import DataError
    from ddpmctl.plot import METRICS_FILE, PLOT_FILE, curves, plot_run, read_metrics

    if not run.is_dir():
        raise DataError(f"{run} is not a run folder" + (" (it is a file)" if run.exists() else " (no such folder)"))
    metrics = run / METRICS_FILE
    target = run / PLOT_FILE if out is None else output_file(out, metrics, PLOT_FILE, force=force)
    written = plot_run(run, target)
    if json_output:
        panels = curves(read_metrics(metrics))
        print_json({"out": str(written), "run": str(run),
                    "panels": {panel.title: sorted(series) for panel, series in panels}})
    elif not quiet:
        out_console.print(f"wrote {written}", highlight=False, soft_wrap=True)
