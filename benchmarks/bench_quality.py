"""Few-step sample quality by FD (the table in benchmarks/README.md, "Few-step sample quality").

For each trained digits model: strided (ancestral on K respaced steps), ddim and dpmpp-2m at K network calls, and
the distilled students of a progressive-distillation run at their own N; each sampled with several seeds, each
seed a fresh set of images scored against the held-out digits (``ddpmctl.quality``: the shipped digits feature
network, FD, precision and recall with k = 3), as mean ± sd over the seeds, with the wall time of the sampling.
A row of real training images (random subsets of the same size) gives the floor that sampling noise and the small
reference set leave.

    OMP_NUM_THREADS=1 python benchmarks/bench_quality.py --model eps=runs/eps/ema_0.9999_002000.safetensors \\
        --model v=runs/v/ema_0.9999_001200.safetensors --students v=runs/students-v [--num 300] [--seeds 0,1,2]
        [--calls 1,2,4,8,10,20,50] [--out bench_quality.json]

``--model NAME=CKPT`` (repeatable) and ``--students NAME=DIR`` (the ``--out`` of ``ddpmctl distill``; its
student_N.safetensors for N in --calls) name the rows. Wall times are of ``generate`` alone (feature extraction
and metrics excluded), seconds per image set, median over the seeds; compare them only within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpmctl.checkpoint import LoadedCheckpoint, load_checkpoint
from ddpmctl.data import load_dataset
from ddpmctl.hardware import cpu_capability
from ddpmctl.quality import evaluate_images, load_feature_extractor, reference_for_dataset
from ddpmctl.samplers import generate, get_sampler

SAMPLERS = ["strided", "ddim", "dpmpp-2m"]
CALLS = (1, 2, 4, 8, 10, 20, 50)


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def score_runs(make_images: Callable[[int], tuple[torch.Tensor, float]], seeds: list[int],
               score: Callable[[torch.Tensor], Any]) -> dict[str, Any]:
    """FD, precision and recall (mean ± sd over ``seeds``) of the image sets ``make_images(seed)`` returns with
    their wall time."""
    fd, precision, recall, seconds = [], [], [], []
    for seed in seeds:
        images, wall = make_images(seed)
        report = score(images)
        fd.append(report.fd)
        precision.append(report.precision)
        recall.append(report.recall)
        seconds.append(wall)
    return {"fd": _summary(fd), "precision": _summary(precision), "recall": _summary(recall),
            "seconds": statistics.median(seconds), "per_seed_fd": fd}


def sampler_images(ckpt: LoadedCheckpoint, name: str, calls: int, num: int) -> Callable[[int], tuple[torch.Tensor, float]]:
    """``num`` uint8 images of ``ckpt`` by sampler ``name`` at ``calls`` network calls, per seed, timed."""
    sampler = get_sampler(name)()

    def make(seed: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images, _ = generate(ckpt, sampler, num=num, batch_size=num, seed=seed, steps=calls, output="uint8")
        return images, time.perf_counter() - start

    return make


def real_images(num: int) -> Callable[[int], tuple[torch.Tensor, float]]:
    """Random subsets of ``num`` training images: what the metrics give data itself against the held-out split."""
    train = load_dataset("builtin:digits", split="train").images

    def make(seed: int) -> tuple[torch.Tensor, float]:
        pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[:num]
        images = train[pick]
        if images.dtype != torch.uint8:
            images = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return images, 0.0

    return make


def model_rows(label: str, ckpt: LoadedCheckpoint, students: Path | None, args: argparse.Namespace,
               score: Callable[[torch.Tensor], Any]) -> dict[str, dict[str, Any]]:
    """{"sampler@calls": result} for one model: every sampler at every call count, then its students."""
    rows: dict[str, dict[str, Any]] = {}
    for calls in args.calls:
        for name in args.samplers:
            rows[f"{name}@{calls}"] = score_runs(sampler_images(ckpt, name, calls, args.num), args.seeds, score)
            print(f"{label:4s} {name:9s} {calls:3d} calls: {_line(rows[f'{name}@{calls}'])}", flush=True)
        student = students / f"student_{calls}.safetensors" if students is not None else None
        if student is not None and student.exists():
            rows[f"student@{calls}"] = score_runs(
                sampler_images(load_checkpoint(student), "student", calls, args.num), args.seeds, score)
            print(f"{label:4s} student   {calls:3d} calls: {_line(rows[f'student@{calls}'])}", flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    fd, p, r = row["fd"], row["precision"], row["recall"]
    return (f"FD {fd['mean']:.2f} ± {fd['sd']:.2f}, precision {p['mean']:.3f} ± {p['sd']:.3f}, "
            f"recall {r['mean']:.3f} ± {r['sd']:.3f}, {row['seconds']:.1f} s")


def markdown(label: str, rows: dict[str, dict[str, Any]], calls: list[int]) -> str:
    """One table per model: a row per sampler, a column per call count, cells 'FD ± sd (P / R)'."""
    names = [n for n in (*SAMPLERS, "student") if any(f"{n}@{c}" in rows for c in calls)]
    names += sorted({key.split("@")[0] for key in rows} - set(names))
    lines = [f"{label}: FD ± sd (precision / recall)", "",
             "| sampler | " + " | ".join(f"{c} calls" for c in calls) + " |",
             "|---|" + "---:|" * len(calls)]
    for name in names:
        cells = []
        for c in calls:
            row = rows.get(f"{name}@{c}")
            cells.append("" if row is None else f"{row['fd']['mean']:.2f} ± {row['fd']['sd']:.2f} "
                         f"({row['precision']['mean']:.2f} / {row['recall']['mean']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            sys.exit(f"error: {what} must be NAME=PATH, not {value!r}")
        out[name] = path
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=CKPT (repeatable)")
    parser.add_argument("--students", action="append", default=[], help="NAME=DIR of a distill run")
    parser.add_argument("--num", type=int, default=300, help="images per seed")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--calls", type=lambda s: [int(x) for x in s.split(",")], default=list(CALLS))
    parser.add_argument("--samplers", type=lambda s: [x for x in s.split(",") if x], default=SAMPLERS,
                        help="comma-separated (empty: students only)")
    parser.add_argument("--out", type=Path, default=Path("bench_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    models, students = _pairs(args.model, "--model"), _pairs(args.students, "--students")
    extractor = load_feature_extractor("digits")
    reference = reference_for_dataset("builtin:digits", extractor)

    def score(images: torch.Tensor) -> Any:
        return evaluate_images(images, reference, extractor)

    result: dict[str, Any] = {"cpu": cpu_capability(), "num": args.num, "seeds": args.seeds, "calls": args.calls,
                              "reference": reference.source, "real": score_runs(real_images(args.num), args.seeds,
                                                                                  score), "models": {}}
    print(f"real training images: {_line(result['real'])}", flush=True)
    for label, path in models.items():
        ckpt = load_checkpoint(path)
        rows = model_rows(label, ckpt, Path(students[label]) if label in students else None, args, score)
        result["models"][label] = {"checkpoint": path, "mean_type": ckpt.config.diffusion.mean_type, "rows": rows}
        print(markdown(label, rows, args.calls), flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
