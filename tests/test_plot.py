"""`ddpmctl plot RUN`: metrics.jsonl sorted into panels, drawn as a PNG; a missing matplotlib is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import invoke_cli, one_error_line
from ddpmctl.plot import curves, read_metrics




def write_metrics(run: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


RECORDS = [
    {"step": 10, "loss": 1.5, "mse": 0.9, "vb": 0.6, "q1": 3.0, "q2": None, "q3": 0.5, "q4": 0.2, "grad_norm": 2.0,
     "lr": 1e-4, "img_per_s": 300.0, "elapsed": 1.0, "nan_skips": 0, "precision": "fp32"},
    {"step": 20, "loss": 1.0, "mse": 0.7, "vb": 0.3, "q1": 2.0, "q2": 1.0, "q3": 0.4, "q4": 0.1, "grad_norm": 1.5,
     "lr": 1e-4, "img_per_s": 320.0, "elapsed": 2.0, "nan_skips": 0, "precision": "fp32", "fd": 12.5, "kid": 0.01},
    {"step": 20, "eval_fd": 30.0, "eval_precision": 0.5, "eval_recall": 0.4, "eval_num": 256, "eval_seconds": 9.5},
]


def test_records_sorted_into_panels(tmp_path: Path) -> None:
    # a line cut short by a kill, and a record without a step, are skipped
    write_metrics(tmp_path, [*RECORDS, {"loss": 5.0}], tail='{"step": 30, "loss": 0.')
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 20]  # periodic work logs its own record at a step
    panels = {panel.title: series for panel, series in curves(records)}
    assert list(panels) == ["loss", "loss by quartile of t", "gradient norm", "learning rate", "images / s",
                            "Frechet distance", "KID, precision, recall"]
    assert panels["loss"] == {"loss": [(10, 1.5), (20, 1.0)], "mse": [(10, 0.9), (20, 0.7)],
                              "vb": [(10, 0.6), (20, 0.3)]}
    assert panels["loss by quartile of t"]["q2"] == [(20, 1.0)]  # None (no sample in that quarter) is no point
    # what train --eval-every logs (eval_*), and the bare names
    assert panels["Frechet distance"] == {"eval_fd": [(20, 30.0)], "fd": [(20, 12.5)]}
    assert panels["KID, precision, recall"] == {"eval_precision": [(20, 0.5)], "eval_recall": [(20, 0.4)],
                                                "kid": [(20, 0.01)]}
    # what is not a curve (elapsed, nan_skips, precision) is not drawn
    drawn = {key for series in panels.values() for key in series}
    assert not drawn & {"elapsed", "nan_skips", "precision", "step", "eval_num", "eval_seconds"}


def test_plot_writes_a_png_of_every_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    write_metrics(run, RECORDS)
    result = invoke_cli("plot", str(run), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(run / "metrics.png") and len(summary["panels"]) == 7
    with Image.open(run / "metrics.png") as image:
        assert image.format == "PNG" and image.width == 1200 and image.height == 4 * 320
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 50  # curves, text: not a blank canvas
    # redrawn in place by default; an explicit --out is never overwritten without --force
    assert invoke_cli("plot", str(run), "-q").exit_code == 0
    other = tmp_path / "curves.png"
    assert invoke_cli("plot", str(run), "-o", str(other), "-q").exit_code == 0 and other.is_file()
    assert "--force" in one_error_line(invoke_cli("plot", str(run), "-o", str(other)), 1)
    assert invoke_cli("plot", str(run), "-o", str(other), "--force", "-q").exit_code == 0


def test_plot_after_training(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    args = ["train", "builtin:digits", "--out", str(run), "--model-channels", "16", "--channel-mult", "1,2",
            "--res-blocks", "1", "--attention-resolutions", "4", "--timesteps", "50", "--batch-size", "8",
            "--max-steps", "4", "--log-every", "2", "--device", "cpu", "--quiet"]
    assert invoke_cli(*args).exit_code == 0
    assert invoke_cli("plot", str(run), "-q").exit_code == 0
    assert (run / "metrics.png").stat().st_size > 10_000


def test_missing_matplotlib_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_metrics(tmp_path / "run", RECORDS)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    line = one_error_line(invoke_cli("plot", str(tmp_path / "run")), 1)
    assert "pip install 'ddpmctl[plot]'" in line
    assert not (tmp_path / "run" / "metrics.png").exists()


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: None, "no such folder"),
    (lambda p: p.write_text("x"), "it is a file"),
    (lambda p: p.mkdir(), "metrics.jsonl does not exist"),
    (lambda p: write_metrics(p, [], tail="garbage\n"), "holds no metrics"),
])
def test_not_a_run_is_one_error_line(tmp_path: Path, make: Any, words: str) -> None:
    run = tmp_path / "run"
    make(run)
    assert words in one_error_line(invoke_cli("plot", str(run)), 1)
