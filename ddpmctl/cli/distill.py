"""`ddpmctl distill CKPT --data DATA --from-steps 1024 --to-steps 4 ...`: progressive distillation (Salimans & Ho)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from ddpmctl.choices import PrecisionRequest, StudentParam, Weighting
from ddpmctl.cli.common import (PRECISION_HELP, console, device_option, guarded, out_console, print_json,
                                resolve_device, resolve_precision_option, usage_error)
from ddpmctl.errors import validation_problem


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def report_table(result: Any) -> Table:
    """One row per stage: steps, iterations, loss, time, distance to the teacher vs plain DDIM's."""
    table = Table(title=Text(f"distillation {result.from_steps} -> {result.to_steps} steps (param {result.param}); "
                             f"distance = mean squared pixel distance to the teacher's {result.from_steps}-step DDIM"),
                  title_justify="left", caption=Text(f"students in {result.out}: student_{{N}}.safetensors; "
                                                     "ratio = student / DDIM (below 1: distillation helps)"),
                  caption_justify="left")
    for name in ("stage", "steps", "iters", "loss", "time", "student dist", "DDIM dist", "ratio"):
        table.add_column(name, justify="right")
    for s in result.stages:
        table.add_row(str(s.stage), f"{s.teacher_steps}->{s.steps}", str(s.iters), _fmt(s.loss, ".3g"),
                      f"{s.seconds:.0f}s", _fmt(s.student_distance, ".3g"), _fmt(s.ddim_distance, ".3g"),
                      _fmt(s.ratio, ".3f"))
    return table


@guarded
def distill_command(
    checkpoint: Annotated[Path, typer.Argument(help="The teacher: a trained model (EMA) or a student to distill "
                                                    "further.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Training images: a folder or builtin:digits.",
                                      show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: student_{N}.safetensors, report.json, "
                                                          "resumable state.", show_default=False)],
    iters_per_stage: Annotated[int, typer.Option("--iters-per-stage", min=1, help="Updates per halving (the paper: "
                                                 "50k).", show_default=False)],
    from_steps: Annotated[Optional[int], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--from-steps", min=1, help="The teacher's DDIM steps, a power of two <= T.",
        show_default="1024 or T's largest power of two; a student's own N")] = None,
    to_steps: Annotated[int, typer.Option("--to-steps", min=1, help="The final student's steps (a power of two).")
                        ] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Training images per update.")] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate, decayed linearly to "
                                      "0 in each stage.")] = 5e-5,
    param: Annotated[Optional[StudentParam], typer.Option(  # noqa: UP007
        "--param", help="Student head.",
        show_default="the teacher's own head for a v or x0 model; for eps: both with learned-variance channels, "
                     "else v")] = None,
    weighting: Annotated[Weighting, typer.Option("--weighting", help="Loss weight over t: truncated-snr = "
                                                 "max(SNR, 1), snr+1 = SNR + 1.")] = "truncated-snr",
    precision: Annotated[PrecisionRequest, typer.Option("--precision", help=PRECISION_HELP + (
        " It sets the student's forward pass (the teacher's targets stay fp32)."))] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, same machine: the same students.")] = 0,
    report_samples: Annotated[int, typer.Option("--report-samples", min=0, help="Noises for the quality report "
                                                "(0: no report).")] = 64,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Save the stage state every N updates.")
                          ] = 200,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Flip training images horizontally at random.")
                    ] = True,
    device: Annotated[str, device_option()] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out (finished stages are "
                                                          "kept).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over, replacing a run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Distill a model into a few-step student by repeatedly halving its DDIM steps (progressive distillation)."""
    from pydantic import ValidationError
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from ddpmctl.distill import DistillConfig, distill

    if resume and force:
        raise usage_error("--resume and --force contradict each other: pick one")
    torch_device = resolve_device(device)
    resolved = resolve_precision_option(precision, torch_device)
    try:
        config = DistillConfig(  # the request is stored: --resume on another CPU resolves auto there
            checkpoint=str(checkpoint), data=data, out=str(out), from_steps=from_steps, to_steps=to_steps,
            iters_per_stage=iters_per_stage, batch_size=batch_size, lr=lr, param=param, weighting=weighting,
            precision=precision, seed=seed, report_samples=report_samples, save_every=save_every,
            flip=flip)
    except ValidationError as err:
        raise usage_error(validation_problem(err, lambda loc: "--" + "-".join(map(str, loc)).replace("_", "-"))) \
            from None

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} it/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet,
                        transient=False)
    tasks: dict[int, Any] = {}

    def on_event(event: Any) -> None:
        if event.kind == "stopping":
            console.print(Text(event.message, style="yellow"))
        elif event.kind == "warning":
            console.print(Text(f"warning: {event.message}"), soft_wrap=True)
        elif event.kind == "info" and not quiet:
            console.print(Text(event.message))
        elif event.kind == "start" and event.stage is not None:
            if not tasks:  # the bars appear once set-up has succeeded, so a set-up error prints alone
                progress.start()
            tasks[event.stage] = progress.add_task(f"stage {event.stage}/{event.stages} {event.label} {resolved}",
                                                   total=event.max_steps, completed=event.step, loss="-", speed="-")
        elif event.kind == "log" and event.stage in tasks and event.metrics:
            task = tasks[event.stage]
            progress.update(task, completed=event.step, loss=_fmt(event.metrics.get("loss"), ".3g"))
            speed = progress.tasks[task].speed
            progress.update(task, speed="-" if not speed else f"{speed:.1f}")

    try:  # Ctrl-C: distill() saves the stage state and returns (a second one aborts)
        result = distill(config, device=torch_device, resume=resume, force=force, callback=on_event)
    finally:
        if tasks:
            progress.stop()
    if json_output:
        print_json({**result.to_json(), "precision": resolved})
    elif result.stages:
        out_console.print(report_table(result))
    if result.interrupted:
        console.print(Text(f"interrupted: continue with the same command and --resume (state in {result.out})"))
        raise typer.Exit(130)
