"""`ddpmctl distill CKPT --data DATA --from-steps 1024 --to-steps 4 ...`: progressive distillation (Salimans & Ho)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from ddpmctl.choices import PrecisionRequest, StudentParam, Weighting
from ddpmctl.cli.common import (PRECISION_HELP, console, device_option, guarded, out_console, print_json,
                                resolve_checkpoint_argument, resolve_device, resolve_precision_option, usage_error)
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


def teacher_defaults(checkpoint: Path) -> dict[str, Any]:
    """What the teacher's file says about --data and --flip: the data it was trained on (when recorded) and that
    run's flips (recorded in the train lineage; older files: the training default for that data)."""
    from ddpmctl.checkpoint import read_checkpoint_info
    from ddpmctl.config import default_training

    info = read_checkpoint_info(checkpoint)
    defaults: dict[str, Any] = {"mean_type": info.config.diffusion.mean_type, "kind": info.kind}
    data = info.config.data
    if data is not None:
        defaults["data"] = data.source
    trained = next((e for e in info.lineage if isinstance(e, dict) and e.get("op") == "train"), {})
    if isinstance(trained.get("flip"), bool):
        defaults["flip"] = trained["flip"]
    elif data is not None:
        defaults["flip"] = bool(default_training(data.image_size, data.num_images, data.source)["flip"])
    return defaults


# distill_command's parameters that are not DistillConfig fields.
_NOT_FIELDS = ("device", "resume", "force", "quiet", "json_output")


def _settings(ctx: typer.Context, out: Path, *, resume: bool, quiet: bool) -> dict[str, Any]:
    """The DistillConfig values: the saved run's (with --resume), then the teacher's defaults for --data and
    --flip, then the command line's given options, then the rest of the command line's defaults."""
    from ddpmctl.runfolder import DISTILLATION, read_run_config

    given = {name: value for name, value in ctx.params.items() if name not in _NOT_FIELDS and _given(ctx, name)}
    defaults = {name: value for name, value in ctx.params.items() if name not in _NOT_FIELDS and name not in given}
    saved = dict(read_run_config(out, DISTILLATION)["config"]) if resume else {}
    values = {**defaults, **saved, **given}
    if values.get("checkpoint") is None:
        raise usage_error("missing CHECKPOINT: the teacher to distill (optional with --resume)")
    values["checkpoint"] = str(values["checkpoint"])
    if not resume:  # a run folder stands for its newest EMA save (a distillation run: its final student)
        values["checkpoint"] = str(resolve_checkpoint_argument(Path(values["checkpoint"]), quiet=quiet))
        teacher = teacher_defaults(Path(values["checkpoint"]))
        for field in ("data", "flip"):
            if field not in given and field in teacher:
                values[field] = teacher[field]
    if values.get("data") is None:
        raise usage_error(f"--data is needed: {Path(values['checkpoint']).name} does not record what it was trained "
                          "on")
    if values.get("iters_per_stage") is None:
        raise usage_error("--iters-per-stage is needed (the paper: 50k; the README's example: 150)")
    values["out"] = str(out)
    return values


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@guarded
def distill_command(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Argument(  # noqa: UP007 - typer needs Optional on 3.10
        help="The teacher: a trained model (EMA) or a student to distill further, or its run folder (optional with "
             "--resume).",
        show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: student_{N}.safetensors, report.json, "
                                                          "resumable state.", show_default=False)] = ...,
    data: Annotated[Optional[str], typer.Option(  # noqa: UP007
        "--data", help="Training images: a folder or builtin:digits.",
        show_default="what the teacher was trained on")] = None,
    iters_per_stage: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--iters-per-stage", min=1, help="Updates per halving (the paper: 50k); needed unless --resume.",
        show_default=False)] = None,
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
    teacher_clip: Annotated[Optional[bool], typer.Option(  # noqa: UP007
        "--teacher-clip/--no-teacher-clip", help="Clamp the teacher's predicted x_0 to [-1, 1] in its DDIM steps.",
        show_default="on for an eps model's lineage, off for v and x0 (as the official code)")] = None,
    precision: Annotated[PrecisionRequest, typer.Option("--precision", help=PRECISION_HELP + (
        " It sets the student's forward pass (the teacher's targets stay fp32)."))] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, same machine: the same students.")] = 0,
    report_samples: Annotated[int, typer.Option("--report-samples", min=0, help="Noises for the quality report "
                                                "(0: no report).")] = 64,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Save the stage state every N updates.")
                          ] = 200,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Flip training images horizontally at random.",
                                       show_default="as the teacher was trained (no flips for builtin:digits)")
                    ] = True,
    device: Annotated[str, device_option()] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out with its saved settings "
                                                          "(finished stages are kept); options given must match.")
                      ] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over, replacing a run in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Distill a model into a few-step student by repeatedly halving its DDIM steps (progressive distillation)."""
    from pydantic import ValidationError

    from ddpmctl.distill import DistillConfig

    if resume and force:
        raise usage_error("--resume and --force contradict each other: pick one")
    torch_device = resolve_device(device)
    values = _settings(ctx, out, resume=resume, quiet=quiet or json_output)
    resolved = resolve_precision_option(values["precision"], torch_device)
    try:
        config = DistillConfig(**values)  # the request is stored: --resume on another CPU resolves auto there
    except ValidationError as err:
        raise usage_error(validation_problem(err, lambda loc: "--" + "-".join(map(str, loc)).replace("_", "-"))) \
            from None
    note = None
    teacher = teacher_defaults(Path(config.checkpoint))
    if not resume and teacher["mean_type"] == "eps" and teacher["kind"] != "student":
        note = (f"note: {Path(config.checkpoint).name} predicts eps: its first student learns a new output head, which "
                "takes far more updates than distilling a v teacher (whose student starts as its exact copy; README: "
                "Distillation)")
    result = _distill_with_progress(config, torch_device, resume=resume, force=force, quiet=quiet, note=note,
                                    resolved=resolved)
    if json_output:
        print_json({**result.to_json(), "precision": resolved})
    elif result.stages:
        out_console.print(report_table(result))
    if result.interrupted:
        console.print(Text(f"interrupted: continue with `ddpmctl distill --out {result.out} --resume` (state in "
                           f"{result.out})"))
        raise typer.Exit(130)


def _distill_with_progress(config: Any, device: Any, *, resume: bool, force: bool, quiet: bool,
                           note: str | None, resolved: str) -> Any:
    """ddpmctl.distill.distill with one progress bar per stage (none with ``quiet``) and its messages on stderr;
    ``note`` follows the plan (once set-up has succeeded, so that a set-up error prints alone); ``resolved`` is the
    precision --precision stands for on this device."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from ddpmctl.distill import distill

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} it/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet,
                        transient=False)
    tasks: dict[int, Any] = {}
    noted: list[bool] = []

    def on_event(event: Any) -> None:
        if event.kind == "stopping":
            console.print(Text(event.message, style="yellow"))
        elif event.kind == "warning":
            console.print(Text(f"warning: {event.message}"), soft_wrap=True)
        elif event.kind == "info" and not quiet:
            console.print(Text(event.message))
            if note is not None and not noted:  # after the plan, the first info line
                console.print(Text(note))
                noted.append(True)
        elif event.kind == "start" and event.stage is not None:
            if not tasks:  # the bars appear once set-up has succeeded, so a set-up error prints alone
                if resume and not quiet:
                    console.print(Text(f"resuming {config.out} at stage {event.stage} of {event.stages} "
                                       f"({event.label} steps), iteration {event.step}"))
                progress.start()
            tasks[event.stage] = progress.add_task(f"stage {event.stage}/{event.stages} {event.label} {resolved}",
                                                   total=event.max_steps, completed=event.step, loss="-", speed="-")
        elif event.kind == "log" and event.stage in tasks and event.metrics:
            task = tasks[event.stage]
            progress.update(task, completed=event.step, loss=_fmt(event.metrics.get("loss"), ".3g"))
            speed = progress.tasks[task].speed
            progress.update(task, speed="-" if not speed else f"{speed:.1f}")

    try:  # Ctrl-C: distill() saves the stage state and returns (a second one aborts)
        return distill(config, device=device, resume=resume, force=force, callback=on_event)
    finally:
        if tasks:
            progress.stop()
