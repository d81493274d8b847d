"""`ddpmctl info RUN`: a run folder's saves (step, EMA, time) and its resolved settings, as tables or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from ddpmctl.cli.common import out_console, print_json

# TrainConfig fields left to the size-scaled network (None in config.json): the network the run built says them.
_NETWORK_FIELDS = {"model_channels": "model_channels", "channel_mult": "channel_mult", "res_blocks": "num_res_blocks",
                   "attention_resolutions": "attention_resolutions"}
_HYPHEN_VALUES = ("var_type",)  # shown as the command line spells them (learned-range)
# Options of a discrete chain: a CLD run does not use them (train refuses them with --method cld).
_CHAIN_FIELDS = ("schedule", "timesteps", "mean_type", "var_type", "loss", "timestep_sampler")


def cld_constants(cld: Any) -> dict[str, float]:
    """The CLD process's constants (a ``CldConfig``), with the damping Gamma = 2 sqrt(M) it implies."""
    return {"mass": cld.mass, "damping": 2.0 * cld.mass ** 0.5, "beta": cld.beta, "gamma": cld.gamma,
            "numerical_eps": cld.numerical_eps, "t_min": cld.t_min}


def cld_summary(cld: Any) -> str:
    """'M 0.25, Gamma 1, beta 4, gamma 0.04 (v_0 ~ N(0, gamma M)), eps 1e-09, t_min 1e-05'."""
    c = cld_constants(cld)
    return (f"M {c['mass']:g}, Gamma {c['damping']:g}, beta {c['beta']:g}, gamma {c['gamma']:g} (v_0 ~ N(0, gamma M)), "
            f"eps {c['numerical_eps']:g}, t_min {c['t_min']:g}")


def run_cld_process(run: dict[str, Any]) -> Any:
    """The CldConfig a CLD training run trains (None for the other methods and for distillation)."""
    settings = run.get("train") or {}
    if settings.get("method") != "cld":
        return None
    from ddpmctl.config import CldConfig

    values = {"mass": settings.get("cld_mass"), "beta": settings.get("cld_beta"), "gamma": settings.get("cld_gamma")}
    return CldConfig(**{k: v for k, v in values.items() if v is not None})


def _value(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if field in _HYPHEN_VALUES and isinstance(value, str):
        return value.replace("_", "-")
    if field == "max_time" and isinstance(value, (int, float)):
        return f"{value:g}s"
    return value if isinstance(value, str) else json.dumps(value)


def settings_table(run: dict[str, Any], section: str) -> Table:
    """One row per option of the run (named as on the command line), marking those chosen from the data."""
    settings, model = run.get(section) or {}, run.get("model") or {}
    chosen = set(run.get("chosen_from_data") or ())
    table = Table(title=Text(f"{run['run']} ({run['kind']}): resolved settings"), show_header=False,
                  title_justify="left")
    table.add_column("option", style="bold")
    table.add_column("value", overflow="fold")
    cld = run_cld_process(run)
    for field, value in settings.items():
        if cld is not None and field in _CHAIN_FIELDS:
            continue
        if value is None and field in _NETWORK_FIELDS and isinstance(model, dict):
            value = model.get(_NETWORK_FIELDS[field])
        note = " (chosen from the data)" if field in chosen else ""
        table.add_row(Text(field.replace("_", "-")), Text(_value(field, value) + note))
    if cld is not None:
        table.add_row(Text("cld process"), Text(cld_summary(cld)))
    if isinstance(run.get("num_parameters"), int):
        table.add_row(Text("parameters"), Text(f"{run['num_parameters']:,}"))
    return table


def saves_table(run: dict[str, Any]) -> Table:
    """Training: one row per complete save. Distillation: one row per finished student."""
    table = Table(title="saves" if "saves" in run else "students", title_justify="left")
    if "saves" in run:
        widest = max((len(str(save.get("ema"))) for save in run["saves"]), default=0)
        table.add_column("step", justify="right")
        table.add_column("EMA checkpoint", min_width=widest, overflow="fold")  # whole file names, to copy
        table.add_column("EMA", overflow="fold")
        table.add_column("written", overflow="fold")
        for save in run["saves"]:
            ema = f"{save.get('ema_warmup') or 'none'} warm-up"
            if save.get("ema_updates") is not None:
                ema += f", {save['ema_updates']} updates"
            table.add_row(str(save["step"]), Text(str(save.get("ema") or "-")), Text(ema), save["time"])
    else:
        for name in ("steps", "file", "written"):
            table.add_column(name)
        for student in run["students"]:
            table.add_row(str(student["steps"]), Text(student["file"]), student["time"])
    return table


def show_run(run_dir: Path, *, json_output: bool) -> None:
    """Print ``describe_run`` of the folder: JSON, or the settings and the saves as two tables."""
    from ddpmctl.runfolder import describe_run

    run = describe_run(run_dir)
    cld = run_cld_process(run)
    if cld is not None:
        run["cld"] = cld_constants(cld)
    if json_output:
        print_json(run)
        return
    out_console.print(settings_table(run, "train" if "saves" in run else "config"))
    out_console.print(saves_table(run))
    rows = run.get("saves") or run.get("students") or []
    if not rows:
        out_console.print("no complete save yet", highlight=False)
