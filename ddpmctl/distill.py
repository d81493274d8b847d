"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512) of an IDDPM model into few-step DDIM students.

Stage 1's teacher is the trained network run as deterministic DDIM on the ``from_steps`` grid; each stage's student
(same architecture, dropout 0, a v / x / "both" head) takes one DDIM step where its teacher takes two, and becomes
the next stage's teacher (the mathematics: ``ddpmctl.progressive``). A stage is a method (``_DistillStage``) on the
training loop of ``ddpmctl.loop``, which saves, resumes and stops it as it does ``ddpmctl train``; the run-folder
checks are ``ddpmctl.runfolder``'s.

Run folder (``--out``): ``distill.json`` (settings), ``state_{N}.safetensors`` (an unfinished stage: student,
optimizer, iteration, RNG), ``student_{N}.safetensors`` (finished stages), ``report.json`` (the quality report).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ddpmctl import runfiles, runfolder
from ddpmctl.batches import ImageBatches
from ddpmctl.build import build_diffusion, build_model
from ddpmctl.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from ddpmctl.choices import StudentParam
from ddpmctl.config import CheckpointConfig, DiffusionConfig, DistillConfig, StudentConfig
from ddpmctl.data import ImageDataset, load_dataset_for
from ddpmctl.distributed import DistInfo
from ddpmctl.errors import CheckpointError, ConfigError
from ddpmctl.fileio import file_sha256, load_tensors, save_tensors, write_json_atomic
from ddpmctl.hardware import resolve_precision
from ddpmctl.loop import LoopEvent, LoopSettings, Save, StopSignals, TrainingLoop
from ddpmctl.method import Method, Runtime, StepOutput
from ddpmctl.optim import clip_gradients, dotted_keys, load_optimizer_state, optimizer_state_tensors
from ddpmctl.progressive import (
    GridDenoiser,
    ddim_on_grid,
    head_of,
    loss_weight,
    plan_stages,
    stage_times,
    student_grid,
    student_predict_xstart,
    teacher_target,
)
from ddpmctl.seeds import DISTILL_REPORT, DISTILL_STAGE, derive_seed

__all__ = ["DistillConfig", "DistillResult", "StageReport", "distill", "zero_extra_head"]


# ----------------------------------------------------------------------------------------------------------------
# Events and results


@dataclass
class StageReport:
    """One finished stage: its student and how close its samples are to the original teacher's."""

    stage: int
    steps: int
    teacher_steps: int
    iters: int
    loss: float | None  # mean training loss over the stage's last iterations (None when resumed from a finished file)
    seconds: float
    student: str
    student_distance: float | None  # MSE(student N-step samples, teacher from_steps DDIM), [-1, 1] units
    ddim_distance: float | None  # MSE(teacher N-step DDIM on the student's grid, teacher from_steps DDIM)

    @property
    def ratio(self) -> float | None:
        if self.student_distance is None or not self.ddim_distance:
            return None
        return self.student_distance / self.ddim_distance


@dataclass
class DistillResult:
    """The run folder, the per-stage reports and whether it stopped early (state saved, resume with --resume)."""

    out: Path
    from_steps: int
    to_steps: int
    param: str
    stages: list[StageReport] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "from_steps": self.from_steps, "to_steps": self.to_steps, "param": self.param,
                "interrupted": self.interrupted, "stages": [dict(asdict(s), ratio=s.ratio) for s in self.stages]}


# ----------------------------------------------------------------------------------------------------------------
# The student's head


def zero_extra_head(model: torch.nn.Module, channels: int, out_channels: int) -> None:
    """Zero the output conv's channels C..2C (the teacher's variance channels), the "both" student's x-head."""
    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.out_channels == out_channels:
            last = module
    if last is None:
        raise ConfigError("cannot find the network's output convolution to initialise the x-head of --param both")
    with torch.no_grad():
        last.weight[channels:].zero_()
        if last.bias is not None:
            last.bias[channels:].zero_()


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """What every stage of one run shares."""

    config: DistillConfig
    device: torch.device
    parent: LoadedCheckpoint
    data: ImageDataset
    out: Path
    param: StudentParam
    from_steps: int
    stage_steps: list[int]
    full_chain: DiffusionConfig
    alphas_cumprod: torch.Tensor
    continuing: bool
    previous_reports: dict[int, dict[str, Any]]
    emit: Callable[[LoopEvent], None]
    stop: Callable[[], bool]
    on_signal: Callable[[int], None]
    precision: str  # --precision as resolved for the device


@dataclass
class _Teacher:
    """A stage's teacher: its x_hat predictor, the file it came from and the lineage up to it."""

    denoiser: GridDenoiser
    name: str
    sha256: str
    lineage: list[dict[str, Any]]


def distill(config: DistillConfig, *, device: torch.device | str = "cpu", resume: bool = False, force: bool = False,
            callback: Callable[[LoopEvent], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> DistillResult:
    """Progressive distillation from ``config.from_steps`` to ``config.to_steps`` (Salimans & Ho Alg. 2).

    Every stage halves the steps, writes ``student_{N}.safetensors`` and a report entry. SIGINT / SIGTERM, or
    ``should_stop`` (polled every iteration), save the stage state and return the result with interrupted=True.
    """
    emit = callback or (lambda event: None)

    def stopping(signum: int) -> None:
        emit(LoopEvent.note("stopping", "stopping after this iteration (Ctrl-C again to abort without saving)"))

    with StopSignals(on_first=stopping) as signals:
        run = _open_run(config, torch.device(device), resume=resume, force=force, emit=emit,
                        stop=lambda: signals.requested or (should_stop is not None and should_stop()))
        run.on_signal = stopping
        from_steps = run.from_steps
        result = DistillResult(out=run.out, from_steps=from_steps, to_steps=config.to_steps, param=run.param)
        stages = len(run.stage_steps)
        emit(LoopEvent.note("info", f"{from_steps} -> {config.to_steps} steps in {stages} stage"
                                    f"{'' if stages == 1 else 's'}, param {run.param}"))
        original = GridDenoiser(run.parent.model, head_of(run.parent), run.alphas_cumprod)
        reference = _reference_samples(run, original, from_steps)
        teacher = _Teacher(original, run.parent.path.name, run.parent.sha256, list(run.parent.lineage))
        for stage, steps in enumerate(run.stage_steps, start=1):
            report, student = _run_stage(run, stage, steps, teacher)
            if report is None:
                result.interrupted = True
                return result
            if reference is not None and report.student_distance is None:
                report.student_distance, report.ddim_distance = _distances(run, reference, student, original, steps)
            result.stages.append(report)
            write_json_atomic(run.out / "report.json", {
                **result.to_json(), "parent": str(config.checkpoint),
                "reference": {"steps": from_steps, "samples": config.report_samples, "seed": config.seed}})
            student_path = run.out / report.student
            teacher = _Teacher(student, student_path.name, file_sha256(student_path),
                               teacher.lineage + [_lineage_entry(run, stage, steps, teacher)])
    return result


def _open_run(config: DistillConfig, device: torch.device, *, resume: bool, force: bool,
              emit: Callable[[LoopEvent], None], stop: Callable[[], bool]) -> _Run:
    """Load the teacher and the data, check the plan and the run folder (as ``train`` does), write the settings."""
    parent = load_checkpoint(config.checkpoint, device=device)
    from_steps, param, stage_steps = plan_stages(config, parent)
    data = load_dataset_for(parent.config.model, config.data,  # converted images: said, as a warning
                            on_warning=lambda message: emit(LoopEvent.note("warning", message)))
    full_chain = parent.config.diffusion.model_copy(update={"use_timesteps": None})
    out, layout = Path(config.out), runfolder.DISTILLATION
    saved = runfolder.check_run_dir(out, layout, config, resume=resume, force=force)
    if saved is not None and saved.get("parent_sha256") != parent.sha256:
        raise ConfigError(f"--resume: {config.checkpoint} is not the checkpoint {out} was distilled from")
    if force and runfolder.holds_run(out, layout):
        runfolder.clear_run(out, layout)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror or err}") from None
    runfolder.remove_temp_files(out, layout)
    precision = resolve_precision(config.precision, device)[0]
    if saved is not None and saved.get("precision", precision) != precision:
        # --precision auto resolves on each machine (docs/design.md, "CPU classes"): resuming elsewhere works, but
        # only a resume in the same precision repeats the uninterrupted run bit for bit.
        emit(LoopEvent.note("warning", f"resuming in {precision}: the run so far trained in {saved['precision']} "
                                       f"(--precision {config.precision} on this device), so it continues, but not "
                                       "bit-identically to an uninterrupted run"))
    runfolder.write_run_config(out, {"config": config.model_dump(mode="json"), "parent_sha256": parent.sha256,
                                     "from_steps": from_steps, "to_steps": config.to_steps, "param": param,
                                     "stages": stage_steps, "precision": precision}, layout)
    report_path = out / "report.json"
    previous: dict[int, Any] = {}
    if saved is not None and report_path.exists():
        previous = runfiles.check_distill_report(runfolder.read_json(report_path), report_path, stage_steps)
    parent.model.eval().requires_grad_(False)
    return _Run(config=config, device=device, parent=parent, data=data, out=out, param=param,
                from_steps=from_steps, stage_steps=stage_steps, full_chain=full_chain,
                alphas_cumprod=build_diffusion(full_chain).alphas_cumprod, continuing=saved is not None,
                previous_reports={steps: record.model_dump() for steps, record in previous.items()}, emit=emit,
                stop=stop,
                on_signal=lambda signum: None, precision=precision)


def _run_stage(run: _Run, stage: int, steps: int, teacher: _Teacher) -> tuple[StageReport | None, GridDenoiser]:
    """One halving: train (or, resuming past it, reload) the ``steps``-step student of ``teacher``.

    Returns its report (None when stopped, the stage state saved) and the student as the next teacher.
    """
    config, grid = run.config, student_grid(run.alphas_cumprod.numel(), steps)
    student_path = run.out / f"student_{steps}.safetensors"
    checkpoint_config = CheckpointConfig(
        model=run.parent.config.model.model_copy(update={"dropout": 0.0}), diffusion=run.full_chain,
        data=run.parent.config.data,
        student=StudentConfig(param=run.param, steps=tuple(grid), teacher_steps=2 * steps))
    student = build_model(checkpoint_config).to(run.device)
    report: StageReport | None
    if run.continuing and student_path.exists():
        # A finished stage: its file is the next teacher.
        student.load_state_dict(load_checkpoint(student_path, device=run.device).model.state_dict())
        old = run.previous_reports.get(steps, {})
        report = StageReport(stage=stage, steps=steps, teacher_steps=2 * steps, iters=config.iters_per_stage,
                             loss=old.get("loss"), seconds=float(old.get("seconds", 0.0)), student=student_path.name,
                             student_distance=old.get("student_distance"), ddim_distance=old.get("ddim_distance"))
    else:
        student.load_state_dict(teacher.denoiser.model.state_dict())
        if stage == 1 and run.parent.kind != "student" and run.param == "both":
            zero_extra_head(student, checkpoint_config.model.in_channels, checkpoint_config.out_channels)
        state_path = run.out / f"state_{steps}.safetensors"
        report = _train_stage(run, stage=stage, steps=steps, teacher=teacher.denoiser, student=student,
                              state_path=state_path)
        if report is not None:
            report.student = student_path.name
            save_checkpoint(student_path, student.state_dict(), checkpoint_config, kind="student",
                            lineage=teacher.lineage + [_lineage_entry(run, stage, steps, teacher)])
            state_path.unlink(missing_ok=True)
    student.eval().requires_grad_(False)
    return report, GridDenoiser(student, run.param, run.alphas_cumprod)


def _lineage_entry(run: _Run, stage: int, steps: int, teacher: _Teacher) -> dict[str, Any]:
    return {"op": "distill", "stage": stage, "steps": steps, "teacher_steps": 2 * steps, "param": run.param,
            "teacher_clip": teacher_clips(run), "iters": run.config.iters_per_stage, "parent": teacher.name,
            "parent_sha256": teacher.sha256}


def _reference_samples(run: _Run, original: GridDenoiser, from_steps: int) -> torch.Tensor | None:
    """The original teacher's ``from_steps``-step DDIM samples of the report's noises (None: no report)."""
    if not run.config.report_samples:
        return None
    run.emit(LoopEvent.note("info", f"teacher reference: {run.config.report_samples} samples, {from_steps} DDIM "
                                    "steps"))
    return _sample_in_batches(run, original, student_grid(run.alphas_cumprod.numel(), from_steps))


def _distances(run: _Run, reference: torch.Tensor, student: GridDenoiser, original: GridDenoiser,
               steps: int) -> tuple[float, float]:
    """MSE to the reference of the student's samples and of the original teacher's DDIM on the student's grid."""
    grid = student_grid(run.alphas_cumprod.numel(), steps)
    return (_distance(_sample_in_batches(run, student, grid), reference),
            _distance(_sample_in_batches(run, original, grid), reference))


def _sample_in_batches(run: _Run, denoiser: GridDenoiser, grid: list[int]) -> torch.Tensor:
    """DDIM samples on ``grid`` of the report's noises (the same ones every call: seeded from --seed)."""
    config, model = run.config, run.parent.config.model
    generator = torch.Generator().manual_seed(derive_seed(config.seed, DISTILL_REPORT))
    noise = torch.randn((config.report_samples, model.in_channels, model.image_size, model.image_size),
                        generator=generator)
    labels = None if model.num_classes is None else torch.arange(config.report_samples) % model.num_classes
    out = []
    with torch.no_grad():
        for start in range(0, noise.shape[0], config.batch_size):
            kwargs = None if labels is None else {"y": labels[start:start + config.batch_size].to(run.device)}
            out.append(ddim_on_grid(denoiser, noise[start:start + config.batch_size].to(run.device), grid,
                                    model_kwargs=kwargs).float().cpu())
    return torch.cat(out)


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


class _StageSaves:
    """Where an unfinished stage saves: one ``state_{N}.safetensors`` (student, optimizer, generator, iteration),
    replaced at each save; the finished student is written by :func:`_run_stage`, not here."""

    def __init__(self, path: Path, resumable: bool, *, iters: int, batch_size: int, num_images: int) -> None:
        self.path = path
        self.exists = resumable and path.exists()
        # What a saved state is checked against: the stage's length and where its batches leave the data.
        self.iters, self.batch_size, self.num_images = iters, batch_size, num_images

    def latest(self) -> int | None:
        return 0 if self.exists else None  # (one file: read() ignores the step and returns the saved iteration)

    def checkpoint_path(self, step: int) -> Path:
        return self.path

    def state_path(self, step: int) -> Path:
        return self.path

    def log(self, record: dict[str, Any]) -> None:
        pass  # a stage's progress reaches the caller as events; report.json keeps the result

    def write(self, save: Save) -> Path:
        tensors = {f"model.{k}": v for k, v in save.weights["model"].items()}
        tensors.update(save.tensors)
        save_tensors(self.path, tensors, {"format": runfolder.DISTILLATION.format, "iteration": str(save.step),
                                          "seconds": repr(save.meta["elapsed"]), "values": json.dumps(save.meta)},
                     what="stage state")
        return self.path

    def read(self, step: int) -> Save:
        tensors, meta = load_tensors(self.path)
        tensors = dotted_keys(tensors)  # ddpmctl 0.1 wrote model/..., optim/{i}/{k}, rng/generator
        weights = {k[len("model."):]: tensors.pop(k) for k in [k for k in tensors if k.startswith("model.")]}
        # (States of ddpmctl before 0.2 kept only the iteration, the seconds and the recent losses.)
        iteration, values = runfiles.check_stage_state(meta, self.path, iters=self.iters, batch_size=self.batch_size,
                                                       num_images=self.num_images, error=CheckpointError)
        return Save(step=iteration, weights={"model": weights}, ema={}, tensors=tensors, meta=values)


class _DistillStage(Method):
    """One stage as a training method: Adam with linear decay to 0, grad clip, no EMA; the loss of
    :func:`_stage_loss` on the next batch (epoch permutations, as training draws them) from the stage's own
    generator."""

    syncs_every_step = True  # the recent-loss window reads every step's loss
    nan_advice = "try a lower --lr"

    def __init__(self, run: _Run, stage: int, steps: int, teacher: GridDenoiser, student: torch.nn.Module) -> None:
        self.run, self.stage, self.steps, self.student = run, stage, steps, student
        self.iters = run.config.iters_per_stage
        self.optimizer = torch.optim.Adam(student.parameters(), lr=run.config.lr)
        self.generator = torch.Generator().manual_seed(derive_seed(run.config.seed, DISTILL_STAGE, steps))
        self.data = ImageBatches(run.data, self.generator, batch_size=run.config.batch_size, flip=run.config.flip,
                                 labels=run.data.labels is not None, device=run.device)
        self.teacher = teacher
        self.recent: list[float] = []
        self.lr = run.config.lr
        self.window = max(1, min(100, self.iters // 10))

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"model": self.student}

    def prepare(self, runtime: Runtime) -> None:
        self.batch_loss = _stage_loss(self.run, self.steps, self.teacher, self.data, runtime.wrap(self.student))

    def forward_backward(self, step: int) -> StepOutput:
        self.lr = self.run.config.lr * (1.0 - step / self.iters)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        loss = self.batch_loss(self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return StepOutput(loss=loss, grad_norm=clip_gradients(self.student.parameters(), self.run.config.grad_clip))

    def apply(self, out: StepOutput) -> None:
        self.optimizer.step()
        self.recent = (self.recent + [out.loss.item()])[-self.window:]

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def log_record(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        return {"loss": self.recent[-1] if self.recent else None, "lr": self.lr}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**optimizer_state_tensors(self.optimizer), **self.data.stream.state()[0],
                "rng.generator": self.generator.get_state()}

    def state_meta(self) -> dict[str, Any]:
        return {**self.data.stream.state()[1], "recent_losses": self.recent}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if "data.perm" not in tensors:
            raise ValueError("a stage state of ddpmctl before 0.2, whose batches were drawn another way: delete it "
                             "to restart this stage")
        load_optimizer_state(self.optimizer, tensors)
        self.generator.set_state(tensors["rng.generator"])
        self.data.stream.load(tensors, meta)
        self.recent = [float(v) for v in meta["recent_losses"]]

    def describe_step(self, step: int) -> str:
        return f"stage {self.stage} ({self.steps} steps) iteration {step}"


def _train_stage(run: _Run, *, stage: int, steps: int, teacher: GridDenoiser, student: torch.nn.Module,
                 state_path: Path) -> StageReport | None:
    """One stage on the training loop. None when stopped (state saved)."""
    config, iters = run.config, run.config.iters_per_stage
    method = _DistillStage(run, stage, steps, teacher, student)

    def on_event(event: LoopEvent) -> None:
        run.emit(replace(event, stage=stage, stages=len(run.stage_steps), label=f"{2 * steps}->{steps}"))

    # A log record every iteration: the progress shows each iteration's loss (which the method reads anyway).
    settings = LoopSettings(max_steps=iters, save_every=config.save_every, log_every=1, save_at_end=False,
                            batch_size=config.batch_size)
    loop = TrainingLoop(method, _StageSaves(state_path, run.continuing, iters=iters, batch_size=config.batch_size,
                                                      num_images=len(run.data.images)), settings,
                        dist=DistInfo(rank=0, world_size=1, device=run.device), precision=run.precision,
                        callback=on_event, should_stop=run.stop, on_first_signal=run.on_signal)
    loop.resume()
    if run.stop():
        return None  # stopped before the stage began: nothing of it to save
    done = loop.run()
    if done.stop_reason != "max_steps":
        run.emit(LoopEvent.note("info", f"interrupted: stage state saved to {state_path}"))
        return None
    recent = method.recent
    return StageReport(stage=stage, steps=steps, teacher_steps=2 * steps, iters=iters,
                       loss=sum(recent) / len(recent) if recent else None,
                       seconds=loop.elapsed_before + done.elapsed, student="", student_distance=None,
                       ddim_distance=None)


def teacher_clips(run: _Run) -> bool:
    """Whether the teacher's x_hat is clamped to [-1, 1] in its DDIM steps (``--teacher-clip``; default: only in an
    eps model's lineage). An eps network's x_hat = (z - sigma eps) / alpha multiplies its error by sigma / alpha, far
    outside [-1, 1] at high noise; a v or x0 network's stays near the data, and the official progressive
    distillation code leaves it unclipped (measured for digits students: benchmarks/README.md)."""
    if run.config.teacher_clip is not None:
        return run.config.teacher_clip
    return run.parent.config.diffusion.mean_type == "eps"


def _stage_loss(run: _Run, steps: int, teacher: GridDenoiser, batches: ImageBatches,
                network: Callable[..., torch.Tensor]) -> Callable[[torch.Generator], torch.Tensor]:
    """The stage's loss on a fresh random batch: the student's weighted x_hat error against the two-step target.

    Student step i (1..N) goes k_i -> k_{i-1}; the teacher passes through the midpoint k'_i on its own grid. The
    teacher runs in fp32; ``network``, the student, in ``--precision`` (its output, and the loss, in fp32).
    """
    config, device = run.config, run.device
    clip = teacher_clips(run)
    starts, mids, ends = (torch.tensor(v, dtype=torch.int64) for v in stage_times(run.alphas_cumprod.numel(), steps))

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        x_start, kwargs = batches.next()
        i = torch.randint(steps, (config.batch_size,), generator=generator)
        noise = torch.randn(x_start.shape, generator=generator).to(device)
        t, t_mid, t_prev = starts[i], mids[i], ends[i]
        alpha, sigma = teacher.alpha_sigma(t, x_start)
        z_t = alpha * x_start + sigma * noise
        with torch.no_grad():
            target = teacher_target(teacher, z_t, t, t_mid, t_prev, clip=clip, model_kwargs=kwargs).float()
        pred = student_predict_xstart(network(z_t, t.to(device), **kwargs), z_t, alpha, sigma, run.param)
        weight = loss_weight(alpha, sigma, config.weighting).view(-1)
        return (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()

    return batch_loss
