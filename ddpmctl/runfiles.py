"""The small files that describe a run, read as untrusted input: safe reads and one schema per file.

Every file ddpmctl reads besides images and checkpoints is small text: ``--config`` (TOML or JSON), a training run's
``config.json`` and ``state_{N}.json``, a distillation run's ``distill.json`` and ``report.json``, and the string
metadata of a distillation stage's state. They are read only when they are regular files of at most
:data:`MAX_TEXT_BYTES` (a named pipe would block, ``/dev/zero`` would never end), parsed, and validated with a
strict pydantic model (an int is an int, not ``true`` or ``"60"``; every choice and range as on the command line)
plus the rules that tie the fields together and to the run (the step in a state file is the step in its name, the
data position lies inside the data, counts are no larger than the step). A violation is one line naming the file
and the field, raised as the error kind the caller passes (exit 1 in the CLI). docs/design.md "Run files" lists
the rules.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddpmctl.choices import EmaWarmup, Precision, StudentParam, TimestepSamplerName
from ddpmctl.config import (CLD_DIFFUSION, DATA_DEFAULT_FIELDS, NETWORK_SHAPE_FIELDS, DataInfo, DiffusionConfig, DistillConfig, ModelConfig,
                            TrainConfig)
from ddpmctl.errors import ConfigError, DdpmctlError, validation_problem

__all__ = [
    "MAX_TEXT_BYTES", "TRAIN_STATE_FORMAT", "check_distill_report", "check_distill_run", "check_stage_state",
    "check_train_run", "check_train_state", "not_regular", "parse_json", "read_json_file", "read_small_text",
    "run_settings",
]

# A settings or state file is a few kilobytes; 1 MiB leaves room for hand-written ones and refuses anything else.
MAX_TEXT_BYTES = 1 << 20
TRAIN_STATE_FORMAT = "ddpmctl-train-state/1"
TRAIN_RUN_FORMAT = "ddpmctl-run/1"
DISTILL_RUN_FORMAT = "ddpmctl-distill/1"

_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def not_regular(mode: int) -> str | None:
    """What a file that is not a regular file is ("a named pipe", ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def read_small_text(path: Path, *, error: type[DdpmctlError] = ConfigError, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, a regular file of at most ``limit`` bytes; else ``error`` with one line.

    The file is opened non-blocking and checked on the open descriptor, so a named pipe that appears between the
    check and the open cannot make the read wait, and a device is never read from.
    """
    try:
        kind = not_regular(os.stat(path).st_mode)
        if kind is not None:
            raise error(f"{path} is {kind}, not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        kind = not_regular(info.st_mode)
        if kind is not None:
            raise error(f"{path} is {kind}, not a regular file")
        if info.st_size > limit:
            raise error(f"{path} is {info.st_size:,} bytes, more than the {limit:,} a ddpmctl settings or state "
                        "file can have")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we looked
        raise error(f"{path} is more than the {limit:,} bytes a ddpmctl settings or state file can have")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start})") from None


def parse_json(text: str, path: Path, *, error: type[DdpmctlError] = ConfigError) -> Any:
    """JSON text -> value; ``error`` with one line for invalid or absurdly nested JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{path} is not valid JSON (nested too deeply)") from None
    except ValueError as err:
        raise error(f"{path} is not valid JSON ({err})") from None


def read_json_file(path: Path, *, error: type[DdpmctlError] = ConfigError) -> Any:
    """A small JSON file, read safely (:func:`read_small_text`)."""
    return parse_json(read_small_text(path, error=error), path, error=error)


def _invalid(path: Path, err: ValidationError, error: type[DdpmctlError], prefix: tuple[str, ...] = ()) -> DdpmctlError:
    """One line "PATH: field F: problem (got V)" for the first problem pydantic found."""
    def where(loc: tuple[str | int, ...]) -> str:
        names = ".".join(str(part) for part in (*prefix, *loc))
        return f"field {names}" if names else ""

    return error(f"{path}: {validation_problem(err, where, show_input=True)}")


def _validate(model: type[BaseModel], payload: Any, path: Path, error: type[DdpmctlError]) -> Any:
    """``payload`` (parsed JSON) validated strictly as ``model``: JSON's own types, no coercion."""
    if not isinstance(payload, dict):
        raise error(f"{path}: expected a JSON object, found {type(payload).__name__}")
    try:
        return model.model_validate_json(json.dumps(payload), strict=True)
    except ValidationError as err:
        raise _invalid(path, err, error) from None
    except (ValueError, RecursionError):  # NaN, Infinity or deep nesting that json.dumps refuses
        raise error(f"{path}: not a plain JSON object") from None


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True,
                              protected_namespaces=())


def _bad(path: Path, error: type[DdpmctlError], field: str, message: str) -> DdpmctlError:
    return error(f"{path}: field {field}: {message}")


# --------------------------------------------------------------------------------------------------------------
# Training: state_{N}.json and config.json

class _SaveFiles(_Schema):
    ema: str
    model: str
    state: str


class LoopState(_Schema):
    """What the training loop saves beside a step's tensors (``state_{N}.json``, a distillation stage's
    ``values``): its counters and, for a method that draws epoch permutations, where its data stream stands.

    Keys of another training method are allowed (its ``load_state`` reads them); every key known here is checked.
    """

    model_config = ConfigDict(extra="allow")
    format: Literal["ddpmctl-train-state/1"] | None = None
    step: int | None = Field(None, ge=0, le=10**12)
    epoch: int | None = Field(None, ge=0)
    data_position: int | None = Field(None, ge=0)
    nan_skips: int = Field(0, ge=0)
    elapsed: float = Field(0.0, ge=0.0)
    images_seen: int | None = Field(None, ge=0)
    world_size: int = Field(1, ge=1, le=1_000_000)
    timestep_sampler: TimestepSamplerName | None = None
    ema_rate: float | None = Field(None, ge=0.0, lt=1.0)
    ema_warmup: EmaWarmup | None = None
    # Absent in states written before it existed: every step that was not skipped updated the EMA.
    ema_updates: int | None = Field(None, ge=0)
    precision: Precision | None = None
    recent_losses: tuple[float, ...] | None = Field(None, max_length=10_000)
    files: _SaveFiles | None = None
    rank_param_sha256: tuple[str, ...] | None = None
    # The run's settings when it saved (config.json's train section, less what may change on --resume).
    settings: dict[str, Any] | None = None


def _check_counts(state: LoopState, path: Path, error: type[DdpmctlError], *, step: int, batch_size: int,
                  num_images: int | None, ema: bool) -> None:
    """Counts no larger than the step; the data stream where ``step`` batches leave it (when the number of images
    is known)."""
    if state.nan_skips > step:
        raise _bad(path, error, "nan_skips", f"{state.nan_skips} skipped steps exceed the step ({step})")
    if ema and state.ema_updates is not None and state.ema_updates != step - state.nan_skips:
        raise _bad(path, error, "ema_updates", f"{state.ema_updates}, but step {step} with {state.nan_skips} "
                   f"skipped step(s) makes {step - state.nan_skips} EMA updates")
    drawn = step * batch_size
    if state.images_seen is not None and state.images_seen != drawn:
        raise _bad(path, error, "images_seen", f"{state.images_seen}, but {step} steps of batch {batch_size} drew "
                   f"{drawn}")
    if state.rank_param_sha256 is not None and (len(state.rank_param_sha256) != state.world_size or not all(
            re.fullmatch(r"[0-9a-f]{64}", digest) for digest in state.rank_param_sha256)):
        raise _bad(path, error, "rank_param_sha256", f"is not {state.world_size} SHA-256 digest(s)")
    if num_images is None or (state.epoch is None and state.data_position is None):
        return  # (a method without an epoch stream)
    if state.epoch is None or state.data_position is None:
        missing = "epoch" if state.epoch is None else "data_position"
        raise _bad(path, error, missing, "is missing (the data stream's place needs epoch and data_position)")
    # The stream hands out consecutive permutations of the data: after `drawn` images (none yet: epoch 0) it is in
    # permutation `epoch` (from 1) at position 1..num_images.
    where = (state.epoch - 1) * num_images + state.data_position if state.epoch else state.data_position
    if state.data_position > num_images or (drawn and not state.data_position) or where != drawn:
        raise _bad(path, error, "data_position", f"{state.data_position} in epoch {state.epoch} over {num_images} "
                   f"images does not match the {drawn} images {step} steps drew")


def run_settings(config: TrainConfig, resumable: frozenset[str]) -> dict[str, Any]:
    """The settings a save records: the resolved options, less those that may change on --resume, as JSON."""
    dumped = config.model_dump(mode="json")
    return {field: value for field, value in dumped.items() if field not in resumable}


def check_train_state(payload: Any, path: Path, *, step: int, config: TrainConfig, num_images: int | None,
                      files: dict[str, str], resumable: frozenset[str],
                      error: type[DdpmctlError], settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a training state read from ``path`` (named for ``step``) against the run it resumes.

    ``config`` is the resolved run (batch size, EMA, timestep sampler, and its settings, which must be those the
    save recorded except the ``resumable`` ones), ``num_images`` the training set's size and ``files`` the names of
    the save's other files; ``settings``, where given, the run's settings as a save of it records them (default:
    ``config``'s). Returns the state with ``ema_updates`` filled in.
    """
    state: LoopState = _validate(LoopState, payload, path, error)
    if state.format is None or state.step is None:
        raise _bad(path, error, "format" if state.format is None else "step", "is missing")
    if state.step != step:
        raise _bad(path, error, "step", f"{state.step} differs from the step in the file name ({step})")
    _check_counts(state, path, error, step=step, batch_size=config.batch_size or 0, num_images=num_images,
                  ema=True)
    for field, value, expected in (("timestep_sampler", state.timestep_sampler, config.timestep_sampler),
                                   ("ema_rate", state.ema_rate, config.ema),
                                   ("ema_warmup", state.ema_warmup, config.ema_warmup)):
        if value is not None and value != expected:
            raise _bad(path, error, field, f"{value!r} differs from {expected!r} in the run's config.json")
    if state.settings is not None:
        now = settings if settings is not None else run_settings(config, resumable)
        for field in sorted(set(now) | set(state.settings)):
            if state.settings.get(field) != now.get(field):
                raise _bad(path, error, f"settings.{field}", f"the run saved with {_show(state.settings.get(field))}"
                           f" but its config.json now says {_show(now.get(field))}; only "
                           f"{', '.join(sorted(resumable))} may change on --resume")
    if state.files is not None and state.files.model_dump() != files:
        raise _bad(path, error, "files", f"names other files than this save's ({', '.join(files.values())})")
    checked = json.loads(json.dumps(payload))  # the file's own values, now known to be valid
    checked["ema_updates"] = step - state.nan_skips
    return checked


class TrainRun(_Schema):
    """A training run's ``config.json``: the resolved options and what they built."""

    format: Literal["ddpmctl-run/1"] = "ddpmctl-run/1"
    train: TrainConfig
    model: ModelConfig | None = None
    diffusion: DiffusionConfig | None = None
    data: DataInfo | None = None
    # The options train chose from the data (TrainConfig field names; `ddpmctl info RUN` marks them).
    chosen_from_data: tuple[Literal[DATA_DEFAULT_FIELDS + NETWORK_SHAPE_FIELDS], ...] = ()  # type: ignore[valid-type]
    num_parameters: int | None = Field(None, ge=0)
    world_size: int | None = Field(None, ge=1)
    created_with: str | None = Field(None, max_length=100)
    # --init-from: the parent checkpoint's lineage and the init entry, carried into every checkpoint of the run.
    init_lineage: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)


def check_train_run(payload: Any, path: Path, *, error: type[DdpmctlError] = ConfigError) -> TrainRun:
    """Validate a training run's ``config.json`` (after the legacy values of older versions were filled in)."""
    run: TrainRun = _validate(TrainRun, payload, path, error)
    train, model, diffusion = run.train, run.model, run.diffusion
    pairs: list[tuple[str, Any, Any]] = []
    if model is not None:
        pairs += [("model.model_channels", model.model_channels, train.model_channels),
                  ("model.num_res_blocks", model.num_res_blocks, train.res_blocks),
                  ("model.channel_mult", model.channel_mult, train.channel_mult),
                  ("model.attention_resolutions", model.attention_resolutions, train.attention_resolutions),
                  ("model.num_heads", model.num_heads, train.heads),
                  ("model.dropout", model.dropout, train.dropout)]
        if train.image_size is not None:
            pairs.append(("model.image_size", model.image_size, train.image_size))
    if diffusion is not None and train.method == "cld":
        # A CLD network has no chain: its diffusion block only fixes the time scale (config.CLD_DIFFUSION).
        pairs.append(("diffusion", diffusion, CLD_DIFFUSION))
    elif diffusion is not None and train.method == "ddgan":
        # A DDGAN run's chain is fixed by the method (vp-sde, x_0, fixed_small); the IDDPM options do not describe it.
        pairs += [("diffusion.timesteps", diffusion.timesteps, train.timesteps),
                  ("diffusion.schedule", diffusion.schedule, "vp-sde"),
                  ("diffusion.use_timesteps", diffusion.use_timesteps, None)]
    elif diffusion is not None:
        pairs += [("diffusion.schedule", diffusion.schedule, train.schedule),
                  ("diffusion.timesteps", diffusion.timesteps, train.timesteps),
                  ("diffusion.mean_type", diffusion.mean_type, train.mean_type),
                  ("diffusion.var_type", diffusion.var_type, train.var_type),
                  ("diffusion.loss_type", diffusion.loss_type, train.loss_type),
                  ("diffusion.use_timesteps", diffusion.use_timesteps, None)]
    for field, built, chosen in pairs:
        # (None in train: chosen from the data, so whatever was built; a respaced chain is never trained.)
        if (chosen is not None or field == "diffusion.use_timesteps") and built != chosen:
            raise _bad(path, error, field, f"{_show(built)} differs from the train section's {_show(chosen)}")
    return run


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return repr(value)


# --------------------------------------------------------------------------------------------------------------
# Distillation: distill.json, report.json and a stage's state metadata

class DistillRun(_Schema):
    """A distillation run's ``distill.json``."""

    format: Literal["ddpmctl-distill/1"] = "ddpmctl-distill/1"
    config: DistillConfig
    parent_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    from_steps: int = Field(ge=2, le=100_000)
    to_steps: int = Field(ge=1, le=100_000)
    param: StudentParam
    stages: tuple[int, ...]
    precision: Precision | None = None  # the precision the run resolved (absent before it was saved)


def _halvings(from_steps: int, to_steps: int) -> list[int]:
    steps, out = from_steps, []
    while steps > to_steps and steps > 1:
        steps //= 2
        out.append(steps)
    return out


def check_distill_run(payload: Any, path: Path, *, error: type[DdpmctlError] = ConfigError) -> DistillRun:
    """Validate a distillation run's ``distill.json``: its plan follows from its settings."""
    run: DistillRun = _validate(DistillRun, payload, path, error)
    config = run.config
    if run.to_steps != config.to_steps:
        raise _bad(path, error, "to_steps", f"{run.to_steps} differs from config.to_steps ({config.to_steps})")
    if config.from_steps is not None and run.from_steps != config.from_steps:
        raise _bad(path, error, "from_steps", f"{run.from_steps} differs from config.from_steps "
                   f"({config.from_steps})")
    if config.param is not None and run.param != config.param:
        raise _bad(path, error, "param", f"{run.param!r} differs from config.param ({config.param!r})")
    if run.from_steps & (run.from_steps - 1) or run.to_steps & (run.to_steps - 1) or run.to_steps >= run.from_steps:
        raise _bad(path, error, "from_steps", f"{run.from_steps} -> {run.to_steps} is not a halving plan between "
                   "powers of two")
    if list(run.stages) != _halvings(run.from_steps, run.to_steps):
        raise _bad(path, error, "stages", f"{_show(run.stages)} is not the halving of {run.from_steps} down to "
                   f"{run.to_steps}")
    return run


class StageRecord(_Schema):
    """One finished stage in ``report.json``."""

    stage: int = Field(ge=1)
    steps: int = Field(ge=1)
    teacher_steps: int = Field(ge=2)
    iters: int = Field(ge=0)
    loss: float | None = None
    seconds: float = Field(ge=0.0)
    student: str = Field(pattern=r"^student_\d+\.safetensors$")
    student_distance: float | None = Field(None, ge=0.0)
    ddim_distance: float | None = Field(None, ge=0.0)
    ratio: float | None = Field(None, ge=0.0)


class DistillReport(_Schema):
    """``report.json``: the stages finished so far (a resumed run reuses their numbers)."""

    model_config = ConfigDict(extra="ignore")  # its other keys are for people and scripts, never read back
    stages: tuple[StageRecord, ...]


def check_distill_report(payload: Any, path: Path, stages: list[int], *,
                         error: type[DdpmctlError] = ConfigError) -> dict[int, StageRecord]:
    """Validate ``report.json`` against its run's plan (the student steps of each stage); returns its stages by
    step count."""
    report: DistillReport = _validate(DistillReport, payload, path, error)
    by_steps: dict[int, StageRecord] = {}
    for index, record in enumerate(report.stages):
        where = f"stages.{index}"
        if index >= len(stages) or record.steps != stages[index] or record.stage != index + 1:
            raise _bad(path, error, where, f"stage {record.stage} of {record.steps} steps is not stage {index + 1} "
                       "of the run's plan")
        if record.teacher_steps != 2 * record.steps or record.student != f"student_{record.steps}.safetensors":
            raise _bad(path, error, where, f"does not describe the {record.steps}-step student of a "
                       f"{2 * record.steps}-step teacher")
        by_steps[record.steps] = record
    return by_steps


def check_stage_state(metadata: dict[str, str], path: Path, *, iters: int, batch_size: int, num_images: int,
                      error: type[DdpmctlError]) -> tuple[int, dict[str, Any]]:
    """Validate a distillation stage state's metadata: (its iteration, within 0..``iters``; the loop's values).

    ``iteration`` and ``seconds`` are strings; ``values`` the loop's JSON (states of ddpmctl before 0.2 kept only
    ``recent_losses`` beside them, and the optimizer's ``param_groups``, never read)."""
    def number(key: str, kind: type) -> Any:
        text = metadata.get(key, "0" if key == "seconds" else None)
        if text is None:
            raise _bad(path, error, key, "is missing")
        try:
            value = kind(text)
        except ValueError:
            raise _bad(path, error, key, f"{text[:40]!r} is not a number of the right kind") from None
        if not (math.isfinite(value) and value >= 0):
            raise _bad(path, error, key, f"{text[:40]!r} is not a finite number >= 0")
        return value

    if metadata.get("format", DISTILL_RUN_FORMAT) != DISTILL_RUN_FORMAT:
        raise _bad(path, error, "format", f"{metadata['format'][:40]!r} is not {DISTILL_RUN_FORMAT}")
    iteration, seconds = number("iteration", int), number("seconds", float)
    if iteration > iters:
        raise _bad(path, error, "iteration", f"{iteration} is beyond the stage's {iters} iterations")
    values = {}
    for key in ("values", "recent_losses"):
        if key in metadata:
            if len(metadata[key]) > MAX_TEXT_BYTES:
                raise _bad(path, error, key, "is larger than a stage state's metadata can be")
            values[key] = parse_json(metadata[key], path, error=error)
    payload = values.get("values", {"recent_losses": values.get("recent_losses", [])})
    state: LoopState = _validate(LoopState, payload, path, error)
    _check_counts(state, path, error, step=iteration, batch_size=batch_size, num_images=num_images, ema=False)
    checked = json.loads(json.dumps(payload))
    checked.setdefault("recent_losses", list(state.recent_losses or ()))
    checked["elapsed"] = seconds
    return iteration, checked
