"""`ddpmctl sample CKPT`: generate images with a sampler plugin; writes 000000.png ..., grid.png, samples.npz."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ddpmctl.choices import PrecisionRequest
from ddpmctl.cli.common import (CHECKPOINT_ARG_HELP, PRECISION_HELP, console, device_option, guarded, option_errors,
                                out_console, print_json, resolve_checkpoint_argument, resolve_device,
                                resolve_precision_option, usage_error)
from ddpmctl.errors import SamplerError, UnknownSamplerError

_SAMPLE_FILE = re.compile(r"^\d{6}\.png$")
MAX_IMAGES = 999_999  # the file names have six digits


def resolve_class(label: str, num_classes: int | None, class_names: tuple[str, ...] | None, ckpt_name: str) -> int:
    """``--class`` as a class name (from the training data's folders) or an index."""
    if num_classes is None:
        raise SamplerError(f"{ckpt_name} is not class-conditional: drop --class")
    if class_names and label in class_names:
        return class_names.index(label)
    if label.strip().lstrip("-").isdigit():
        index = int(label)
        if not 0 <= index < num_classes:
            raise SamplerError(f"--class {index} is out of range: the model has classes 0..{num_classes - 1}")
        return index
    names = ", ".join(class_names) if class_names else f"indices 0..{num_classes - 1}"
    raise SamplerError(f"--class {label!r} is not a class of {ckpt_name} (classes: {names})")


def prepare_out_dir(out: Path, *, force: bool) -> bool:
    """Create ``out`` (a folder) and make sure it is writable and holds no earlier samples unless ``force``.

    Returns whether the folder was created here (so a failed run can remove it again).
    """
    created = not out.exists()
    if out.exists() and not out.is_dir():
        raise SamplerError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SamplerError(f"cannot create --out {out}: {err.strerror or err}") from None
    probe = out / ".ddpmctl-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SamplerError(f"--out {out} is not writable: {err.strerror or err}") from None
    old = sorted(p.name for p in out.iterdir() if _SAMPLE_FILE.match(p.name) or p.name in ("grid.png", "samples.npz"))
    if old and not force:
        shown = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
        raise SamplerError(f"--out {out} already holds samples ({shown}): use --force to replace them")
    for name in old:  # --force: no stale images from an earlier, larger run may remain
        (out / name).unlink()
    return created


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _generate(ckpt: Any, sampler: Any, settings: dict[str, Any], *, total_steps: int,
              quiet: bool) -> tuple[Any, Any]:
    """samplers.generate with ``settings`` (uint8 output), under a progress bar unless ``quiet``."""
    from ddpmctl.samplers import SampleProgress, generate

    if quiet:
        return generate(ckpt, sampler, output="uint8", **settings)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        image_task = progress.add_task("images", total=settings["num"])
        step_task = progress.add_task("steps ", total=total_steps)

        def on_progress(event: SampleProgress) -> None:
            progress.update(image_task, completed=event.images_done)
            progress.update(step_task, completed=event.step if event.batch_size else total_steps)

        return generate(ckpt, sampler, output="uint8", callback=on_progress, **settings)


def complete_sampler(incomplete: str) -> list[str]:
    """Shell completion of --sampler: the installed, usable sampler names."""
    from ddpmctl.samplers import available_samplers

    return [name for name, entry in available_samplers().items() if entry.ok and name.startswith(incomplete)]


def complete_sampler_option(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of -O: ``key=`` of the chosen sampler's options (of every sampler when none is chosen yet),
    then the choices of a Literal option (``spacing=even`` ...)."""
    from ddpmctl.samplers import available_samplers, describe_options

    chosen = ctx.params.get("sampler")
    entries = [e for n, e in available_samplers().items() if e.ok and (chosen is None or n == chosen)]
    words: set[str] = set()
    for entry in entries:
        for row in describe_options(entry.cls):  # type: ignore[arg-type]
            words.add(f"{row['name']}=")
            if "|" in row["type"] and " " not in row["type"]:  # a Literal's choices: even|ddim|logsnr
                words.update(f"{row['name']}={choice}" for choice in row["type"].split("|"))
    return sorted(w for w in words if w.startswith(incomplete))


@guarded
def sample_command(
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_ARG_HELP, show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for 000000.png ..., grid.png (first 256) and "
                                      "samples.npz.", show_default=False)],
    sampler: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--sampler", "-s", help="Sampler plugin (see `ddpmctl samplers`).", autocompletion=complete_sampler,
        show_default="from the checkpoint's kind: student for a distilled student, else ddim")] = None,
    steps: Annotated[Optional[int], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--steps", min=1, help="Network steps, at most the checkpoint's chain.",
        show_default="the sampler's own: ddim and strided 50, dpmpp-2m 20, or the whole chain if shorter; "
                     "ancestral the whole chain")] = None,
    # (--num, --batch-size and --seed are checked by the library: samplers.check_sample_counts.)
    num: Annotated[int, typer.Option("--num", "-n", max=MAX_IMAGES, help="Number of images.")] = 64,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", help="Images per batch (never changes an image).")] = 64,
    start_index: Annotated[int, typer.Option(
        "--start-index", metavar="I", help="Index of the first image (a shard of a larger set: images I..I+num-1, "
        "named by index; shards concatenate to the set one run writes).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Image i depends only on (seed, i).")] = 0,
    option: Annotated[Optional[list[str]], typer.Option(  # noqa: UP007
        "--opt", "-O", metavar="KEY=VALUE", help="Sampler option (repeatable), e.g. -O eta=0.5; `ddpmctl samplers` "
                                                 "lists each sampler's options.", show_default=False,
        autocompletion=complete_sampler_option)] = None,
    class_label: Annotated[Optional[str], typer.Option(  # noqa: UP007
        "--class", help="Class name or index for a class-conditional model.",
        show_default="drawn per image")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace samples already in --out.")] = False,
    precision: Annotated[PrecisionRequest, typer.Option(
        "--precision", help=PRECISION_HELP + " bf16 runs the network under autocast (about 1.7x faster on CPUs with "
                            "AVX-512 BF16); the sampler's arithmetic stays fp32.")] = "auto",
    device: Annotated[str, device_option()] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate images from a checkpoint: PNGs, a grid and samples.npz (arr_0: uint8 NHWC, arr_1: the labels of a
    class-conditional model)."""
    from ddpmctl.checkpoint import load_checkpoint, read_checkpoint_info
    from ddpmctl.images import save_grid, save_npz, save_png
    from ddpmctl.samplers import check_sample_counts, default_sampler, get_sampler, parse_options, sampling_timesteps

    with option_errors(SamplerError):  # a bad count: the command line is wrong
        check_sample_counts(num, batch_size, seed, start_index)
    if start_index + num > MAX_IMAGES + 1:
        raise usage_error(f"--start-index {start_index} + --num {num} goes past image {MAX_IMAGES} (file names have "
                          "six digits)")
    checkpoint = resolve_checkpoint_argument(checkpoint, quiet=quiet or json_output)
    if sampler is None:  # the header alone says the kind: a foreign or broken file fails here in one line
        sampler = default_sampler(read_checkpoint_info(checkpoint).kind)
    with option_errors(UnknownSamplerError):  # an unknown name is a bad command line; a broken plugin is not
        sampler_cls = get_sampler(sampler)
    with option_errors(SamplerError):  # a bad -O option
        options = parse_options(sampler_cls, option or [])
    torch_device = resolve_device(device)
    precision = resolve_precision_option(precision, torch_device)
    ckpt = load_checkpoint(checkpoint, device=torch_device)
    label = None
    with option_errors(SamplerError):  # --class or --steps out of what the checkpoint allows
        if class_label is not None:
            data = ckpt.config.data
            label = resolve_class(class_label, ckpt.config.model.num_classes,
                                  data.class_names if data is not None else None, checkpoint.name)
        instance = sampler_cls(options)
        # Chosen once for the run (a bad --steps fails before --out is touched); generate() takes them as they are.
        run_steps = sampling_timesteps(ckpt, instance, steps)
        total_steps = len(run_steps)
    created = prepare_out_dir(out, force=force)
    try:
        started = time.perf_counter()
        images, labels = _generate(ckpt, instance, dict(num=num, batch_size=batch_size, seed=seed, steps=None,
                                                        timesteps=run_steps, class_label=label, precision=precision,
                                                        start_index=start_index),
                                   total_steps=total_steps, quiet=quiet)
        seconds = time.perf_counter() - started
        for i in range(num):
            save_png(out / f"{start_index + i:06d}.png", images[i])
        save_grid(out / "grid.png", images[:256])
        save_npz(out / "samples.npz", images, labels)
    except BaseException:
        if created:  # a run that fails (or is interrupted) before writing leaves no empty --out behind
            _remove_if_empty(out)
        raise

    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint), "out": str(out), "sampler": sampler, "options": options.model_dump(),
        "steps": total_steps, "num": num, "start_index": start_index, "batch_size": batch_size, "seed": seed,
        "class": label, "precision": precision, "device": str(torch_device), "seconds": round(seconds, 3),
        "files": {"images": f"{start_index:06d}.png..{start_index + num - 1:06d}.png", "grid": "grid.png",
                  "npz": "samples.npz"},
    }
    if json_output:
        print_json(summary)
    elif not quiet:
        out_console.print(f"wrote {num} images ({sampler}, {total_steps} steps, {precision}) to {out}/ "
                          f"with grid.png and samples.npz in {seconds:.1f}s", highlight=False, soft_wrap=True)
