"""`ddpmctl eval-samples SAMPLES --ref REF`: FID / FD, KID, precision and recall of samples against a reference."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ddpmctl.choices import FeatureRequest, PrecisionRequest, Split
from ddpmctl.cli.common import (PRECISION_HELP, console, device_option, guarded, option_errors, out_console, print_json,
                                resolve_checkpoint_argument, resolve_device, resolve_precision_option, usage_error)
from ddpmctl.errors import SamplerError, UnknownSamplerError

DEFAULT_NUM = 1000  # images sampled from a checkpoint
SMALL_GRAY = 16  # 1-channel images up to this size are measured with the digits network by default


def _kind(samples: Path) -> str:
    """folder | npz | checkpoint (a checkpoint is anything else; loading it names a foreign file for what it is)."""
    if samples.is_dir():
        return "folder"
    if samples.suffix.lower() == ".npz":
        return "npz"
    if samples.is_file():
        with open(samples, "rb") as handle:
            if handle.read(4) == b"PK\x03\x04":
                return "npz"
    return "checkpoint"


def _progress(quiet: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=quiet, transient=False)


def _bar(progress: Any, label: str) -> Any:
    """A progress callback (done, total) that adds its bar on the first call."""
    task: list[Any] = []

    def update(done: int, total: int) -> None:
        if not task:
            task.append(progress.add_task(label, total=total))
        progress.update(task[0], completed=done)

    return update


def _sample(path: Path, *, sampler: str | None, steps: int | None, num: int, seed: int, batch_size: int,
            options: list[str], precision: str, device: Any, progress: Any) -> tuple[Any, dict[str, Any], Any]:
    """Images drawn from a checkpoint with the existing sampling driver; (images, what was done, checkpoint)."""
    from ddpmctl.checkpoint import load_checkpoint, read_checkpoint_info
    from ddpmctl.samplers import (check_sample_counts, default_sampler, generate, get_sampler, parse_options,
                                  sampling_timesteps)

    with option_errors(SamplerError):
        check_sample_counts(num, batch_size, seed)
    if sampler is None:  # the checkpoint's own, as `ddpmctl sample` chooses it (ddim; sscs for a CLD model ...)
        sampler = default_sampler(read_checkpoint_info(path).kind)
    with option_errors(UnknownSamplerError):
        sampler_cls = get_sampler(sampler)
    with option_errors(SamplerError):
        parsed = parse_options(sampler_cls, options)
    ckpt = load_checkpoint(path, device=device)
    with option_errors(SamplerError):
        instance = sampler_cls(parsed)
        total_steps = len(sampling_timesteps(ckpt, instance, steps))
    bar = _bar(progress, "sampling")
    started = time.perf_counter()
    images, _ = generate(ckpt, instance, num=num, batch_size=batch_size, seed=seed, steps=steps, output="uint8",
                         precision=precision, callback=lambda e: bar(e.images_done, num))  # type: ignore[arg-type]
    info = {"checkpoint": str(path), "sampler": sampler, "options": parsed.model_dump(), "steps": total_steps,
            "num": num, "seed": seed, "precision": precision, "seconds": round(time.perf_counter() - started, 3)}
    return images, info, ckpt


def _default_ref(ref: str | None, ckpt: Any) -> str:
    if ref is not None:
        return ref
    data = None if ckpt is None else ckpt.config.data
    if data is not None and data.source.startswith("builtin:"):
        return data.source
    raise usage_error("--ref is needed: an image folder, builtin:NAME or a statistics file (only a checkpoint trained "
                      "on a builtin: dataset defaults to its held-out split)")


def _features(request: str, ref: str, images: Any) -> str:
    """auto: a statistics file's own network; else digits for small grayscale images, inception otherwise."""
    if request != "auto":
        return request
    if Path(ref).is_file():
        from ddpmctl.quality import load_reference_file

        return load_reference_file(ref).network_name or "inception"
    small_gray = images.shape[1] == 1 and max(images.shape[-2:]) <= SMALL_GRAY
    return "digits" if small_gray else "inception"


def _reference(ref: str, split: Split, extractor: Any, images: Any, *, cache: bool, batch_size: int,
               note: Any, progress: Any) -> Any:
    from ddpmctl.errors import DataError
    from ddpmctl.quality import load_reference_file, reference_for_dataset

    if ref.startswith("builtin:") or Path(ref).is_dir():
        return reference_for_dataset(ref, extractor, split=split, image_size=int(images.shape[-1]),
                                     channels=int(images.shape[1]), cache=cache, batch_size=batch_size,
                                     on_warning=lambda m: note(f"reference: {m}"),
                                     callback=_bar(progress, "reference features"))
    if not Path(ref).exists():
        raise DataError(f"--ref {ref} does not exist (an image folder, builtin:NAME or a statistics file)")
    return load_reference_file(ref)


def _table(payload: dict[str, Any]) -> Any:
    from rich.table import Table

    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    name = "FID" if payload["features"] == "inception" else "FD"
    kid = "n/a" if payload["kid"] is None else f"{payload['kid']:.4g} ± {payload['kid_std']:.2g}"
    table = Table(title=f"sample quality ({payload['features']} features)", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row(name, f"{payload['fd']:.4f}")
    table.add_row("KID ± s.d. over subsets", kid)
    table.add_row("precision (k=3)", num(payload["precision"], ".4f"))
    table.add_row("recall (k=3)", num(payload["recall"], ".4f"))
    table.add_row("samples", str(payload["num_samples"]))
    table.add_row("reference", f"{payload['num_reference'] or '?'} ({payload['reference']})")
    return table


@guarded
def eval_samples_command(
    samples: Annotated[Path, typer.Argument(help="samples.npz (as `ddpmctl sample` writes it), an image folder, or a "
                                                 "checkpoint to sample from.", show_default=False)],
    ref: Annotated[Optional[str], typer.Option(  # noqa: UP007 - typer needs Optional on 3.10
        "--ref", help="Reference: an image folder, builtin:NAME, ddpmctl's statistics file, or a pytorch-fid "
                      "mu/sigma .npz (FID only).",
        show_default="a checkpoint's built-in training set")] = None,
    ref_split: Annotated[Split, typer.Option("--ref-split", help="Split of a builtin: reference.")] = "test",
    features: Annotated[FeatureRequest, typer.Option(
        "--features", help="Feature network. auto: digits for grayscale images up to 16 px, else inception (a "
                           "statistics file: its own).")] = "auto",
    features_weights: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        "--features-weights", help="Weights file of the feature network (inception: torch-fidelity's or "
                                   "pytorch-fid's .pth, or a safetensors copy).",
        show_default="$DDPMCTL_INCEPTION_WEIGHTS; digits: the packaged network")] = None,
    sampler: Annotated[Optional[str], typer.Option(  # noqa: UP007
        "--sampler", "-s", help="Checkpoint only: sampler plugin.",
        show_default="from the checkpoint's kind, as for `ddpmctl sample`")] = None,
    steps: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--steps", min=1, help="Checkpoint only: network steps.", show_default="the sampler's own")] = None,
    num: Annotated[Optional[int], typer.Option(  # noqa: UP007
        "--num", "-n", min=2, help="Images to sample from a checkpoint, or the first N of SAMPLES.",
        show_default=f"{DEFAULT_NUM} from a checkpoint, else all")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Checkpoint only: image i depends only on (seed, i).")] = 0,
    option: Annotated[Optional[list[str]], typer.Option(  # noqa: UP007
        "--opt", "-O", metavar="KEY=VALUE", help="Checkpoint only: sampler option (repeatable).",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", min=1, help="Images per batch (sampling and features; never changes a number beyond "
                                          "float rounding).")] = 64,
    save_ref: Annotated[Optional[Path], typer.Option(  # noqa: UP007
        "--save-ref", help="Also write the reference statistics to this file (reusable as --ref).",
        show_default=False)] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse reference statistics cached in "
                                                                   "$DDPMCTL_CACHE_DIR (~/.cache/ddpmctl).")] = True,
    precision: Annotated[PrecisionRequest, typer.Option(
        "--precision", help=PRECISION_HELP + " Sampling only: the feature networks always run in fp32.")] = "auto",
    device: Annotated[str, device_option()] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or notes.")] = False,
) -> None:
    """Sample quality: Frechet distance (FID with Inception features, FD with the digits network), KID, and
    precision/recall (k = 3) of samples against reference images or statistics."""
    if samples.is_dir() and any((samples / name).is_file() for name in ("config.json", "distill.json")):
        # A run folder stands for its newest EMA save (a distillation run: its final student), not for images.
        samples = resolve_checkpoint_argument(samples, quiet=quiet or json_output)
    kind = _kind(samples)
    sampling_flags = steps is not None or option or sampler is not None or seed != 0
    if kind != "checkpoint" and sampling_flags:
        raise usage_error("--sampler, --steps, --seed and --opt are for a checkpoint; SAMPLES is an "
                          f"{'image folder' if kind == 'folder' else '.npz'}")
    torch_device = resolve_device(device)
    notes: list[str] = []
    with _progress(quiet or json_output) as progress:
        run = _run(samples, kind, ref=ref, ref_split=ref_split, features=features, weights=features_weights,
                   sampler=sampler, steps=steps, num=num, seed=seed, options=option or [], batch_size=batch_size,
                   cache=cache, precision=precision, device=torch_device, notes=notes, progress=progress)
    report, reference, extractor, payload = run
    if save_ref is not None:
        from ddpmctl.refstats import save_reference

        save_reference(save_ref, reference)
        payload["saved_reference"] = str(save_ref)
    if json_output:
        print_json(payload)
        return
    if not quiet:
        for line in payload["notes"]:
            console.print(f"note: {line}", markup=False, highlight=False)
    out_console.print(_table(payload))


def _run(samples: Path, kind: str, *, ref: str | None, ref_split: Split, features: str, weights: Path | None,
         sampler: str | None, steps: int | None, num: int | None, seed: int, options: list[str], batch_size: int,
         cache: bool, precision: str, device: Any, notes: list[str], progress: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Samples -> reference -> features -> metrics; the JSON payload."""
    note = notes.append
    from ddpmctl.quality import evaluate_images, load_feature_extractor, load_sample_images

    sampling = ckpt = None
    if kind == "checkpoint":
        chosen = resolve_precision_option(precision, device)
        images, sampling, ckpt = _sample(samples, sampler=sampler, steps=steps, num=num or DEFAULT_NUM, seed=seed,
                                         batch_size=batch_size, options=options, precision=chosen, device=device,
                                         progress=progress)
    else:
        images = load_sample_images(samples, on_warning=lambda m: note(f"samples: {m}"))
        if num is not None:
            images = images[:num]
    ref = _default_ref(ref, ckpt)
    name = _features(features, ref, images)
    extractor = load_feature_extractor(name, weights=weights, device=device)  # type: ignore[arg-type]
    reference = _reference(ref, ref_split, extractor, images, cache=cache, batch_size=batch_size, note=note,
                           progress=progress)
    report = evaluate_images(images, reference, extractor, batch_size=batch_size,
                             callback=_bar(progress, "sample features"))
    payload: dict[str, Any] = {"samples": str(samples), "reference": reference.source or ref,
                               "feature_network": extractor.identity, **report.to_dict()}
    payload["notes"] = [*notes, *report.notes]
    if name == "inception":
        payload["fid"] = report.fd
    if sampling is not None:
        payload["sampling"] = sampling
    return report, reference, extractor, payload
