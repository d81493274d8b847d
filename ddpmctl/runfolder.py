"""Run folders (``--out``) of training and distillation: which files belong to a run, whether a folder may be used
(``--resume`` / ``--force``), the saved settings a resume must match, and for training its saves, pruning (--keep)
and metrics.jsonl.

Training (:data:`TRAINING`): ``config.json``, ``metrics.jsonl``, and per save at step N the triplet
``ema_{rate}_{N:06d}.safetensors``, ``model_{N:06d}.safetensors``, ``state_{N:06d}.safetensors`` plus
``state_{N:06d}.json``. The JSON is written last, so a save is complete exactly when its JSON exists; deleting
starts with the JSON for the same reason. Distillation (:data:`DISTILLATION`): ``distill.json``,
``state_{N}.safetensors`` (an unfinished stage), ``student_{N}.safetensors``, ``report.json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ddpmctl import runfiles
from ddpmctl.config import TrainConfig
from ddpmctl.errors import CheckpointError, ConfigError, validation_problem
from ddpmctl.fileio import atomic_write, write_json_atomic

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
_STEP_FILE = re.compile(r"^(?:ema_[^_]+|model|state)_(\d+)\.(?:safetensors|json)$")
_STATE_JSON = re.compile(r"^state_(\d+)\.json$")
# safetensors (0.8 here) itself writes through a ".tmpXXXXXX" file beside its target (Rust's tempfile crate), which a
# kill in the middle of save_file leaves behind as well.
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


@dataclass(frozen=True)
class RunLayout:
    """One kind of run folder: what it is called in messages, the settings file that marks it (written first, read
    by ``--resume``), the key of the settings in that file, and the names of the files that belong to the run."""

    what: str
    format: str
    config_file: str
    section: str
    files: str  # a regular expression for the run's file names (without anchors)
    # Settings that only steer one invocation: they may change on --resume without changing the result.
    resumable: frozenset[str]

    def owns(self, name: str) -> bool:
        return re.fullmatch(self.files, name) is not None

    def is_temp_file(self, name: str) -> bool:
        """checkpoint._atomic_write's ".<final name>.<pid>.<hex>.tmp", left behind only by a killed writer."""
        return re.fullmatch(rf"\.(?:{self.files})\.\d+\.[0-9a-f]+\.tmp", name) is not None


TRAINING = RunLayout(
    what="training run", format="ddpmctl-run/1", config_file=CONFIG_FILE, section="train",
    files=r"config\.json|metrics\.jsonl|metrics\.png|preview_\d+\.png|(?:ema_[^_]+|model|state)_\d+\.(?:safetensors|json)",
    resumable=frozenset({"out", "max_steps", "max_time", "save_every", "keep", "log_every", "nan_policy",
                         "eval_every", "eval_num", "eval_steps", "preview_every", "val_every", "val_data"}))
DISTILLATION = RunLayout(
    what="distillation run", format="ddpmctl-distill/1", config_file="distill.json", section="config",
    files=r"distill\.json|report\.json|(?:state|student)_\d+\.safetensors",
    # (The teacher checkpoint is compared by its sha256, not by how its path was spelled.)
    resumable=frozenset({"checkpoint", "out", "save_every"}))
RESUMABLE_FIELDS = TRAINING.resumable


def ema_name(rate: float, step: int) -> str:
    return f"ema_{rate}_{step:06d}.safetensors"


def model_name(step: int) -> str:
    return f"model_{step:06d}.safetensors"


def state_name(step: int) -> str:
    return f"state_{step:06d}.safetensors"


def state_json_name(step: int) -> str:
    return f"state_{step:06d}.json"


def complete_saves(run_dir: Path) -> list[int]:
    """Steps whose save is complete (its state JSON exists), ascending."""
    if not run_dir.is_dir():
        return []
    steps = [int(m.group(1)) for p in run_dir.iterdir() if (m := _STATE_JSON.match(p.name))]
    return sorted(steps)


def holds_run(run_dir: Path, layout: RunLayout = TRAINING) -> bool:
    """Whether the folder already holds (part of) a run of this kind."""
    if not run_dir.is_dir():
        return False
    return any(layout.owns(p.name) for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, layout: RunLayout, given: BaseModel, *, resume: bool,
                  force: bool) -> dict[str, Any] | None:
    """Refuse to mix runs: on ``resume`` return the saved settings file after checking ``given`` matches it; else
    refuse a folder that holds a run unless ``force`` (the caller then clears it with :func:`clear_run`)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a folder")
    if resume:
        saved = read_run_config(run_dir, layout)
        diffs = config_differences(saved[layout.section], given, layout.resumable)
        if diffs:
            raise ConfigError(f"cannot resume {run_dir}: its config differs in " + "; ".join(diffs)
                              + " (omit these options to keep the saved values)")
        return saved
    if holds_run(run_dir, layout) and not force:
        raise ConfigError(f"{run_dir} already holds a {layout.what}: use --resume to continue it, "
                          "--force to delete it and start over, or another --out")
    return None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def clear_run(run_dir: Path, layout: RunLayout = TRAINING) -> None:
    """Delete a previous run's files (``--force``): JSONs first, so no half-deleted save looks complete, and the
    settings file last."""
    files = [p for p in run_dir.iterdir() if layout.owns(p.name)]
    for path in sorted(files, key=lambda p: not p.name.endswith(".json") or p.name == layout.config_file):
        _unlink(path)


def prune(run_dir: Path, keep: int) -> list[int]:
    """Keep the newest ``keep`` complete saves; delete every other step file (older saves, orphans of killed saves).

    Call only right after a save completed. Returns the deleted steps.
    """
    kept = set(complete_saves(run_dir)[-keep:])
    doomed: dict[int, list[Path]] = {}
    for path in run_dir.iterdir():
        match = _STEP_FILE.match(path.name)
        if match and int(match.group(1)) not in kept:
            doomed.setdefault(int(match.group(1)), []).append(path)
    for step, paths in sorted(doomed.items()):
        # The JSON goes first: once it is gone the save no longer counts as complete.
        for path in sorted(paths, key=lambda p: not p.name.endswith(".json")):
            _unlink(path)
    remove_temp_files(run_dir)
    return sorted(doomed)


def remove_temp_files(run_dir: Path, layout: RunLayout = TRAINING) -> list[str]:
    """Delete the temporary files of killed writers (never complete, never read); returns their names."""
    if not run_dir.is_dir():
        return []
    # (metrics.jsonl.tmp: the metrics rewrite of ddpmctl 0.1, before it went through fileio.atomic_write.)
    removed = [p for p in run_dir.iterdir() if layout.is_temp_file(p.name) or _SAFETENSORS_TMP.match(p.name)
               or p.name == METRICS_FILE + ".tmp"]
    for path in removed:
        _unlink(path)
    return sorted(p.name for p in removed)


def read_json(path: Path) -> Any:
    """A JSON file of a run folder, read safely (CheckpointError, one line, when it cannot be read)."""
    return runfiles.read_json_file(path, error=CheckpointError)


def write_run_config(run_dir: Path, payload: dict[str, Any], layout: RunLayout = TRAINING) -> None:
    """Write the settings file (``payload`` gets the layout's ``format``)."""
    write_json_atomic(run_dir / layout.config_file, {"format": layout.format, **payload})


def read_run_config(run_dir: Path, layout: RunLayout = TRAINING) -> dict[str, Any]:
    """The saved settings file of a run folder, validated (runfiles); ConfigError when absent, unreadable, of
    another kind or invalid."""
    path = run_dir / layout.config_file
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{run_dir} holds no {layout.what} to resume (no {layout.config_file})")
    payload = runfiles.read_json_file(path, error=ConfigError)
    if not isinstance(payload, dict) or not isinstance(payload.get(layout.section), dict):
        raise ConfigError(f"{path} is not a ddpmctl {layout.what} config (no '{layout.section}' section)")
    if payload.get("format", layout.format) != layout.format:  # (hand-written settings files may omit it)
        raise ConfigError(f"{path} was not written by this version of ddpmctl (format "
                          f"{str(payload.get('format'))[:40]!r}, expected {layout.format})")
    if layout is TRAINING:
        payload["train"] = _with_legacy_values(payload["train"], payload.get("model"))
        runfiles.check_train_run(payload, path)
    else:
        runfiles.check_distill_run(payload, path)
    return payload


# A run folder written before a field existed was trained as these values say: it resumes exactly so.
_LEGACY_TRAIN_VALUES = {"ema_warmup": "none"}
# Network-shape options left to the size-scaled defaults (None) by older versions: their saved network decides.
_LEGACY_MODEL_FIELDS = {"model_channels": "model_channels", "channel_mult": "channel_mult",
                        "res_blocks": "num_res_blocks", "attention_resolutions": "attention_resolutions"}


def _with_legacy_values(train: dict[str, Any], model: Any) -> dict[str, Any]:
    """Fill fields an older ddpmctl did not save with what that version did (EMA without warm-up; the network it
    built), so a run folder written before them resumes bit for bit under today's defaults."""
    train = dict(train)
    for field, value in _LEGACY_TRAIN_VALUES.items():
        train.setdefault(field, value)
    return with_network_fields(train, model)


def with_network_fields(train: dict[str, Any], model: Any) -> dict[str, Any]:
    """``train`` (TrainConfig fields as JSON) with the network-shape options it left to the size-scaled defaults
    (None) filled in from ``model`` (the built network's ModelConfig as JSON): what a resumed run reads back, and so
    what a save records as the run's settings."""
    train = dict(train)
    if isinstance(model, dict):
        for field, model_field in _LEGACY_MODEL_FIELDS.items():
            if train.get(field) is None and model.get(model_field) is not None:
                train[field] = model[model_field]
    return train


def saved_train_config(run_dir: Path) -> dict[str, Any]:
    """The ``train`` section of a run's config.json as a plain dict (TrainConfig field names)."""
    return dict(read_run_config(run_dir)["train"])


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def config_differences(saved: dict[str, Any], given: BaseModel,
                       resumable: frozenset[str] = RESUMABLE_FIELDS) -> list[str]:
    """Fields (other than ``resumable``) where ``given`` differs from the saved run, as 'flag (saved, given)'.

    A training option ``given`` leaves to its default choice (None) takes the saved value and is no difference."""
    try:
        saved_config = type(given).model_validate(saved)
    except ValidationError as err:
        raise ConfigError(f"the saved run config is invalid: {validation_problem(err)}") from None
    diffs = []
    for field in type(given).model_fields:
        if field in resumable:
            continue
        old, new = getattr(saved_config, field), getattr(given, field)
        if old != new and not (new is None and isinstance(given, TrainConfig)):
            diffs.append(f"{_flag(field)} (saved {_show(old)}, given {_show(new)})")
    return diffs


def rewrite_metrics(run_dir: Path, up_to_step: int) -> None:
    """Keep only metrics lines of steps <= up_to_step (a resumed run rewrites what came after its save)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kind = runfiles.not_regular(path.stat().st_mode)
    if kind is not None:
        raise ConfigError(f"{path} is {kind}, not a regular file")
    kept = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = list(handle)
    for line in (line.rstrip("\n") for line in lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= up_to_step:
            kept.append(line)
    text = "".join(line + "\n" for line in kept)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line per log step (flushed, so a kill loses at most the line being written)."""
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


@dataclass(frozen=True)
class RunCheckpoint:
    """The checkpoint a run folder stands for when given where a checkpoint is expected (``sample RUN``)."""

    path: Path
    what: str  # for the "using ..." line: "newest EMA save, step 2000" / "final student, 4 steps"


_STUDENT_FILE = re.compile(r"^student_(\d+)\.safetensors$")


def resolve_run_checkpoint(run_dir: Path) -> RunCheckpoint:
    """A training run folder -> its newest complete EMA checkpoint; a distillation run -> its fewest-step student.

    A save counts once its state JSON exists (the JSON is written last), so a save cut short by a kill is never
    picked. Raises CheckpointError, one line, for a folder that holds neither kind of run."""
    if (run_dir / TRAINING.config_file).is_file() or complete_saves(run_dir):
        for step in reversed(complete_saves(run_dir)):
            state = read_json(run_dir / state_json_name(step))
            name = state.get("files", {}).get("ema") if isinstance(state, dict) else None
            candidates = [run_dir / name] if isinstance(name, str) and "/" not in name else sorted(
                run_dir.glob(f"ema_*_{step:06d}.safetensors"))
            for path in candidates:
                if path.is_file():
                    return RunCheckpoint(path, f"newest EMA save, step {step}")
        raise CheckpointError(f"{run_dir} is a training run without a complete save yet: train it further "
                              "(`ddpmctl train --out RUN --resume`) or give a checkpoint file")
    students = sorted((int(m.group(1)), p) for p in run_dir.glob("student_*.safetensors")
                      if (m := _STUDENT_FILE.match(p.name)))
    if students:
        steps, path = students[0]
        return RunCheckpoint(path, f"final student, {steps} steps")
    if (run_dir / DISTILLATION.config_file).is_file():
        raise CheckpointError(f"{run_dir} is a distillation run without a finished stage yet: give a checkpoint "
                              "file, or continue it with `ddpmctl distill --out RUN --resume`")
    raise CheckpointError(f"{run_dir} is a folder but not a ddpmctl run (no config.json or distill.json): give a "
                          "checkpoint file (.safetensors)")


def _modified(path: Path) -> str:
    """A file's modification time, local, to the second (when a save was written)."""
    import datetime

    return datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(sep=" ", timespec="seconds")


def _training_saves(run_dir: Path) -> list[dict[str, Any]]:
    saves = []
    for step in complete_saves(run_dir):
        json_path = run_dir / state_json_name(step)
        state = read_json(json_path)
        files = state.get("files", {}) if isinstance(state, dict) else {}
        saves.append({"step": step, "ema": files.get("ema"), "model": files.get("model"),
                      "ema_warmup": state.get("ema_warmup") if isinstance(state, dict) else None,
                      "ema_updates": state.get("ema_updates") if isinstance(state, dict) else None,
                      "time": _modified(json_path)})
    return saves


def describe_run(run_dir: Path) -> dict[str, Any]:
    """What ``ddpmctl info RUN`` shows of a run folder: its kind, resolved settings and saves (JSON-ready).

    Training: ``config.json`` as written (the options resolved from the data included, named in
    ``chosen_from_data``) and one entry per complete save. Distillation: ``distill.json`` and the students."""
    if (run_dir / TRAINING.config_file).is_file():
        payload = read_run_config(run_dir, TRAINING)
        return {"run": str(run_dir), "kind": TRAINING.what, **{k: v for k, v in payload.items() if k != "format"},
                "saves": _training_saves(run_dir)}
    if (run_dir / DISTILLATION.config_file).is_file():
        payload = read_run_config(run_dir, DISTILLATION)
        students = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STUDENT_FILE.match(p.name)))
        return {"run": str(run_dir), "kind": DISTILLATION.what,
                **{k: v for k, v in payload.items() if k != "format"},
                "students": [{"steps": n, "file": p.name, "time": _modified(p)} for n, p in reversed(students)]}
    raise CheckpointError(f"{run_dir} is a folder but not a ddpmctl run (no config.json or distill.json): give a "
                          "checkpoint file (.safetensors) or a run folder")
