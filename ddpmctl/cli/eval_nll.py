"""`ddpmctl eval-nll CKPT`: bits/dim through the variational bound (IDDPM Table 1-2), exact or Monte-Carlo; for a
CLD checkpoint, the likelihood bound of its probability-flow ODE (ddpmctl.cld_nll, docs/cld.md "Likelihood")."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ddpmctl.choices import CldSolver, Estimator, HutchinsonProbe, PrecisionRequest, Split
from ddpmctl.cli.common import (CHECKPOINT_ARG_HELP, PRECISION_HELP, console, device_option, given, guarded,
                                only_for, out_console, print_json, resolve_checkpoint_argument, resolve_device,
                                resolve_precision_option, usage_error)

DEFAULT_MC_TERMS = 64
# The CLD estimator's defaults (ddpmctl.cld_nll's, repeated so that --help imports no torch; a test compares them).
CLD_DEFAULT_SOLVER, CLD_DEFAULT_STEPS, CLD_DEFAULT_TOLERANCE, CLD_DEFAULT_PROBE = "rk4", 50, 1e-5, "gaussian"
_CLD = "CLD checkpoints (docs/cld.md)"
_IDDPM_ONLY = ("estimator", "terms", "pilot_images")
_CLD_ONLY = ("solver", "steps", "tolerance", "probes", "probe")


def _finite(value: float) -> float | None:
    """JSON has no NaN: a standard error that does not exist (one image, one draw) is null."""
    return value if math.isfinite(value) else None


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    # The prior is often ~1e-6 bits/dim: show that it is tiny rather than a bare 0.0000.
    return f"{value:.1e}" if 0 < abs(value) < 5e-5 else f"{value:.4f}"


def _span(span: tuple[float, float] | None) -> str:
    if span is None:
        return ""
    return f"{span[0]:g}" if span[0] == span[1] else f"{span[0]:g}..{span[1]:g}"


def nll_payload(result: Any, *, checkpoint: str, data: str, split: str | None, seed: int) -> dict[str, Any]:
    """Every number the table shows, as one JSON-ready object (``--json``). A CLD bound has no chain: its
    ``num_terms``, ``mc_terms`` and ``pilot_images`` are null, ``terms_per_image`` counts network evaluations, each
    image's ``mc_stderr`` is its error over its probes, and a ``cld`` object holds the estimator's settings."""
    payload = {
        "checkpoint": checkpoint,
        "method": "cld" if result.estimator == "ode" else "iddpm",
        "data": data,
        "split": split,
        "estimator": result.estimator,
        "num_images": result.num_images,
        "num_terms": result.num_terms,
        "terms_per_image": result.terms_per_image,
        "mc_terms": result.mc_terms,
        "pilot_images": result.pilot_images,
        "seed": seed,
        "bits_per_dim": result.mean,
        "stderr": _finite(result.stderr),
        # Each image's own bits/dim and, for mc, its Monte-Carlo standard error (null when M == 1).
        "per_image": [
            {"bits_per_dim": float(bpd),
             "mc_stderr": _finite(float(result.bpd_stderr[i])) if result.bpd_stderr is not None else None}
            for i, bpd in enumerate(result.bpd.tolist())
        ],
        "breakdown": [
            {"term": name, "t_range": list(span) if span is not None else None, "bits_per_dim": mean,
             "stderr": _finite(stderr)}
            for name, span, mean, stderr in result.breakdown()
        ],
    }
    if result.estimator == "ode":
        payload["cld"] = {"solver": result.solver, "steps": result.steps, "tolerance": result.tolerance,
                          "probes": result.probes, "probe": result.probe, "t_min": result.t_min,
                          "network_evaluations_per_image": [int(n) for n in result.nfe.tolist()]}
    return payload


def result_line(result: Any, precision: str | None = None) -> str:
    """'bits/dim: 1.2345 ± 0.0123 (N images, T terms[; precision])'; for CLD the solver and probes instead of T."""
    if result.estimator == "ode":
        solver = (f"{result.solver} {result.steps} steps" if result.steps is not None
                  else f"{result.solver} tolerance {result.tolerance:g}")
        how = (f"CLD bound: probability-flow ODE, {solver}, {result.probes} {result.probe} "
               f"probe{'s' if result.probes > 1 else ''} per image")
    else:
        how = f"{result.num_terms} terms"
    if result.estimator == "mc":
        how += f"; mc, {result.mc_terms} sampled per image"
    if precision is not None:
        how += f"; {precision}"
    return f"bits/dim: {_fmt(result.mean)} ± {_fmt(result.stderr)} ({result.num_images} images, {how})"


def breakdown_table(result: Any) -> Table:
    """Prior, L_0, KL by quartile of t and the total: mean bits/dim over images, its standard error and share (CLD:
    the prior, the ODE's integral by quarter of t, the velocity entropy, the dequantisation and the total)."""
    table = Table(title=getattr(result, "title", "variational bound, bits/dim"), title_justify="left")
    table.add_column("term", style="bold")
    table.add_column("t", justify="right")
    table.add_column("bits/dim", justify="right")
    table.add_column("± s.e.", justify="right")
    table.add_column("share", justify="right")
    total = result.mean
    rows = result.breakdown()
    for index, (name, span, mean, stderr) in enumerate(rows):
        share = f"{100 * mean / total:.1f}%" if total else ""
        # A rule above the total row.
        table.add_row(name, _span(span), _fmt(mean), _fmt(stderr), share, end_section=index == len(rows) - 2)
    return table


def _resolve_data(config: Any, data: str | None, split: str | None) -> tuple[str, str | None]:
    """(source, split): --data, else the held-out split of the built-in dataset the checkpoint was trained on."""
    if data is not None:
        source = data
    elif config.data is None:
        raise usage_error("the checkpoint does not record what it was trained on: pass --data DIR (or builtin:NAME)")
    elif not config.data.source.startswith("builtin:"):
        raise usage_error(f"the checkpoint was trained on {config.data.source}, which has no held-out split: "
                          "pass --data DIR")
    else:
        source = config.data.source
    if source.startswith("builtin:"):
        return source, split or "test"
    if split is not None:
        raise usage_error("--split applies to builtin: datasets; a folder given with --data is evaluated whole")
    return source, None


def _same_source(source: str, trained_on: str | None) -> bool:
    """Whether --data names the data the checkpoint was trained on (then converted exactly as in training)."""
    return trained_on is not None and source.rstrip("/\\") == trained_on.rstrip("/\\")


def _refuse_other_methods_options(ctx: typer.Context, name: str, kind: str) -> None:
    """The IDDPM estimator's options for a CLD checkpoint, or the CLD ones for any other: one line, exit 2."""
    for option in _IDDPM_ONLY if kind == "cld" else _CLD_ONLY:
        if given(ctx, option):
            flag = next(p.opts[0] for p in ctx.command.params if p.name == option)
            raise usage_error(f"{flag} is for IDDPM checkpoints: {name} is a CLD network (its bound takes --solver, "
                              "--steps, --tolerance, --probes, --probe)" if kind == "cld" else
                              f"{flag} is for CLD checkpoints: {name} is kind {kind}")


@guarded
def eval_nll_command(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_ARG_HELP, show_default=False)],
    data: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--data", help="Image folder or builtin:NAME.",
        show_default="the held-out split of the checkpoint's built-in training set")] = None,
    split: Annotated[Optional[Split], typer.Option(  # noqa: UP007
        "--split", help="For builtin: datasets.", show_default="test")] = None,
    num: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--num", "-n", min=1, help="Evaluate the first N images.", show_default="all")] = None,
    num_images: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--num-images", min=1, hidden=True, help="Old name of --num.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1, help="(image, timestep) pairs per network call; CLD: (image, probe) "
        "trajectories integrated together.")] = 256,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the noise (and of the mc draws).")] = 0,
    estimator: Annotated[Estimator, typer.Option(
        "--estimator", help="exact: every term of the bound; mc: importance-sampled KL terms.")] = "exact",
    terms: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--terms", min=1, help="mc: KL terms sampled per image.",
        show_default=f"{DEFAULT_MC_TERMS} with mc")] = None,
    pilot_images: Annotated[int, typer.Option(
        "--pilot-images", min=1, help="mc: images evaluated exactly to choose the sampling distribution of t.")] = 4,
    solver: Annotated[Optional[CldSolver], typer.Option(  # noqa: UP007
        "--solver", help="CLD: the probability-flow ODE's solver: rk4 or heun (fixed steps), rk23 (adaptive).",
        show_default=CLD_DEFAULT_SOLVER, rich_help_panel=_CLD)] = None,
    steps: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--steps", min=1, help="CLD, rk4 or heun: steps from t_min to 1 (short near the data and for the rotation "
        "of x and v).", show_default=str(CLD_DEFAULT_STEPS), rich_help_panel=_CLD)] = None,
    tolerance: Annotated[Optional[float], typer.Option(  # noqa: UP007
        "--tolerance", min=1e-12, help="CLD, rk23: relative and absolute error tolerance per step.",
        show_default=f"{CLD_DEFAULT_TOLERANCE:g}", rich_help_panel=_CLD)] = None,
    probes: Annotated[int, typer.Option(
        "--probes", min=1, help="CLD: trajectories per image, each with its own dequantisation, v_0 and trace probe; "
        "the image's bits/dim is their mean.", rich_help_panel=_CLD)] = 1,
    probe: Annotated[HutchinsonProbe, typer.Option(
        "--probe", help="CLD: the Hutchinson trace estimator's probe vectors.", rich_help_panel=_CLD)] = CLD_DEFAULT_PROBE,
    resize: Annotated[bool, typer.Option(
        "--resize/--no-resize", help="Convert images of another size or color to what the model takes (resize, "
        "crop, gray/RGB); without it such data is refused, since its bits/dim would be of other images.",
        show_default="no; the checkpoint's own training data is converted as in training")] = False,
    precision: Annotated[PrecisionRequest, typer.Option("--precision", help=(
        "auto | fp32 | bf16. auto: fp32 on every device, the precision of the bits/dim papers report. bf16 runs the "
        "network under autocast (emulated and slower than fp32 on CPUs without AVX-512-BF16 or AMX). Either way "
        "each term of the bound is computed in fp32 from the network's outputs, and the terms are summed in "
        "fp64."))] = "auto",
    device: Annotated[str, device_option()] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notes.")] = False,
) -> None:
    """Bits/dim of held-out images through the variational bound (prior + L_0 + KL terms), with error bars; for a
    CLD checkpoint, the bound of its probability-flow ODE (prior + ODE + velocity entropy + dequantisation)."""
    if num is not None and num_images is not None:
        raise usage_error("--num-images is the old name of --num: give one of them")
    num_images = num if num is not None else num_images
    solver = solver or CLD_DEFAULT_SOLVER
    only_for(ctx, solver != "rk23", ("steps",), "the fixed-step solvers rk4 and heun (rk23 chooses its steps)")
    only_for(ctx, solver == "rk23", ("tolerance",), "--solver rk23 (the fixed-step solvers take --steps)")
    torch_device = resolve_device(device)
    # auto is fp32 here even where bf16 is native: bits/dim is compared with papers' fp32 numbers to the third decimal.
    precision = "fp32" if precision == "auto" else resolve_precision_option(precision, torch_device)

    from ddpmctl.checkpoint import load_checkpoint
    from ddpmctl.data import load_dataset_for
    from ddpmctl.nll import check_has_bound, evaluate_nll

    checkpoint = resolve_checkpoint_argument(checkpoint, quiet=quiet or json_output)
    loaded = load_checkpoint(checkpoint, device=torch_device)
    is_cld = loaded.kind == "cld"
    _refuse_other_methods_options(ctx, checkpoint.name, loaded.kind)
    if not is_cld:
        only_for(ctx, estimator == "mc", ("terms", "pilot_images"),
                 "--estimator mc (the exact estimator evaluates every term)")
        if estimator == "mc" and terms is None:
            terms = DEFAULT_MC_TERMS
        check_has_bound(loaded)  # before any data is read
    source, data_split = _resolve_data(loaded.config, data, split)

    def note(message: str) -> None:
        if not quiet:
            console.print(f"note: {message}", markup=False, highlight=False)

    trained_on = loaded.config.data.source if loaded.config.data is not None else None
    dataset = load_dataset_for(loaded.config.model, source, split=data_split or "train", on_warning=note,
                               convert=resize or _same_source(source, trained_on))
    count = len(dataset)
    if num_images is not None and num_images > count:
        note(f"--num {num_images}: {source} has {count} images, evaluating all of them")
    count = min(count, num_images or count)
    images = dataset.images[:count]
    labels = dataset.labels[:count] if dataset.labels is not None else None

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=quiet, transient=False)
    tasks: dict[str, Any] = {}

    def on_progress(event: Any) -> None:
        if event.phase not in tasks:
            label = "pilot terms" if event.phase == "pilot" else "terms"
            tasks[event.phase] = progress.add_task(label, total=event.total)
        progress.update(tasks[event.phase], completed=event.done)

    def on_cld_progress(done: int, total: int) -> None:
        if "ode" not in tasks:
            tasks["ode"] = progress.add_task("ODE trajectories" if solver == "rk23" else "ODE steps", total=total)
        progress.update(tasks["ode"], completed=done)

    with progress:
        if is_cld:
            from ddpmctl.cld_nll import evaluate_cld_nll

            result: Any = evaluate_cld_nll(
                loaded, images, seed=seed, probes=probes, probe=probe, solver=solver,  # type: ignore[arg-type]
                steps=steps or CLD_DEFAULT_STEPS, tolerance=tolerance or CLD_DEFAULT_TOLERANCE,
                batch_size=batch_size, precision=precision, callback=on_cld_progress)
        else:
            result = evaluate_nll(loaded, images, labels, batch_size=batch_size, estimator=estimator, terms=terms,
                                  seed=seed, pilot_images=pilot_images, callback=on_progress,
                                  precision=precision)  # type: ignore[arg-type]

    if json_output:
        print_json({**nll_payload(result, checkpoint=str(checkpoint), data=source, split=data_split, seed=seed),
                    "precision": precision})
        return
    out_console.print(result_line(result, precision), markup=False, highlight=False, soft_wrap=True)
    out_console.print(breakdown_table(result))
