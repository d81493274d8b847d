"""Training curves: a run folder's ``metrics.jsonl`` as one PNG (``ddpmctl plot RUN``).

Reading the records and sorting them into panels is plain Python; drawing needs matplotlib, an optional extra
(``pip install 'ddpmctl[plot]'``), imported only when a PNG is drawn. A missing matplotlib is one
:class:`MissingExtraError` line that says how to install it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpmctl.errors import DataError, DdpmctlError
from ddpmctl.fileio import atomic_write

__all__ = ["PANELS", "MissingExtraError", "Panel", "curves", "plot_run", "read_metrics", "render_png"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"


class MissingExtraError(DdpmctlError):
    """An optional dependency is not installed."""


@dataclass(frozen=True)
class Panel:
    """One plot: a title and the metrics keys drawn in it (a pattern matches further keys, e.g. FD variants)."""

    title: str
    keys: tuple[str, ...]
    pattern: str | None = None
    log: bool = False

    def matches(self, key: str) -> bool:
        return key in self.keys or (self.pattern is not None and re.fullmatch(self.pattern, key) is not None)


PANELS: tuple[Panel, ...] = (
    Panel("loss", ("loss", "mse", "vb", "val_loss", "val_mse", "val_vb"), log=True),
    # The loss of the batch's samples whose t falls in each quarter of the chain (q1 = the least noisy).
    Panel("loss by quartile of t", (), pattern=r"q\d", log=True),
    Panel("gradient norm", ("grad_norm",), log=True),
    Panel("learning rate", ("lr",)),
    Panel("images / s", ("img_per_s",)),
    # What --eval-every logs: Frechet distance (FID with Inception features), and KID, precision and recall
    # (a scale of their own).
    Panel("Frechet distance", ("eval_fd", "fd", "fid"), pattern=r"(fd|fid)_\w+"),
    Panel("KID, precision, recall", ("eval_kid", "eval_precision", "eval_recall", "kid", "precision", "recall"),
          pattern=r"kid_\w+"),
)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` with an integer step, in file order; lines cut short by a kill are
    skipped. DataError (one line) when the file is missing or holds no record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: is {path.parent} a training run folder?") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    if not records:
        raise DataError(f"{path} holds no metrics yet (they are written every --log-every steps)")
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def curves(records: list[dict[str, Any]]) -> list[tuple[Panel, dict[str, list[tuple[int, float]]]]]:
    """Per panel, the (step, value) points of each key it draws (finite numbers only); panels with no point are
    left out. Each key goes to the first panel that claims it."""
    out: list[tuple[Panel, dict[str, list[tuple[int, float]]]]] = []
    claimed: set[str] = set()
    for panel in PANELS:
        series: dict[str, list[tuple[int, float]]] = {}
        for record in records:
            for key, value in record.items():
                number = _number(value)
                if key == "step" or key in claimed or number is None or not panel.matches(key):
                    continue
                if panel.log and number <= 0:
                    continue  # a log axis cannot show it
                series.setdefault(key, []).append((record["step"], number))
        claimed.update(series)
        if series:
            out.append((panel, dict(sorted(series.items(), key=lambda kv: _order(panel, kv[0])))))
    return out


def _order(panel: Panel, key: str) -> tuple[int, str]:
    return (panel.keys.index(key) if key in panel.keys else len(panel.keys), key)


def _pyplot_free_figure(panels: int) -> Any:
    """A matplotlib Figure with an Agg canvas (no global pyplot state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("ddpmctl plot needs matplotlib, an optional extra: pip install 'ddpmctl[plot]' "
                                "(or pip install matplotlib)") from None
    cols = 2 if panels > 1 else 1
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(6.0 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def render_png(panels: list[tuple[Panel, dict[str, list[tuple[int, float]]]]], out: str | os.PathLike[str], *,
               title: str) -> Path:
    """Draw the panels (curves against the step) into one PNG, written atomically."""
    figure = _pyplot_free_figure(len(panels))
    cols = 2 if len(panels) > 1 else 1
    axes = figure.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for axis, (panel, series) in zip(axes, panels):
        for key, points in series.items():
            steps, values = zip(*points)
            axis.plot(steps, values, label=key, marker="." if len(points) < 3 else None, linewidth=1.2)
        axis.set_title(panel.title)
        axis.set_xlabel("step")
        if panel.log:
            axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    out = Path(out)
    return atomic_write(out, lambda tmp: figure.savefig(tmp, format="png"))


def plot_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """``run_dir``'s metrics.jsonl as a PNG (default ``run_dir/metrics.png``); returns its path."""
    run_dir = Path(run_dir)
    panels = curves(read_metrics(run_dir / METRICS_FILE))
    if not panels:
        raise DataError(f"{run_dir / METRICS_FILE} has no numeric metrics to plot")
    last = max(points[-1][0] for _, series in panels for points in series.values())
    return render_png(panels, run_dir / PLOT_FILE if out is None else out, title=f"{run_dir.name} (step {last})")
