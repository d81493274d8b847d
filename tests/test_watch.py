"""`train --preview-every N` and `--val-every N`: sample grids in the run folder and the held-out loss in
metrics.jsonl, on the loop's periodic work, without changing what is trained."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_same_files, invoke_cli

TINY = ["--model-channels", "16", "--channel-mult", "1,2", "--res-blocks", "1", "--attention-resolutions", "4",
        "--timesteps", "50", "--batch-size", "8", "--max-steps", "4", "--device", "cpu", "--quiet"]


def test_previews_and_heldout_loss_leave_training_unchanged(tmp_path: Path) -> None:
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    result = invoke_cli("train", "builtin:digits", "--out", str(watched), *TINY, "--preview-every", "2",
                    "--val-every", "2", "--save-every", "2")
    assert result.exit_code == 0, result.output
    assert invoke_cli("train", "builtin:digits", "--out", str(plain), *TINY, "--save-every", "2").exit_code == 0
    assert sorted(p.name for p in watched.glob("preview_*.png")) == ["preview_000002.png", "preview_000004.png"]
    records = [json.loads(line) for line in (watched / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in held] == [2, 4]
    assert all(r["val_loss"] > 0 and r["val_mse"] > 0 for r in held) and held[0]["val_loss"] != held[1]["val_loss"]
    # the same weights, optimizer state and EMA as a run that does not watch itself
    names = ["model_000004.safetensors", "ema_0.9999_000004.safetensors", "state_000004.safetensors"]
    assert_same_files(plain, watched, names)
    # a resume keeps watching (the settings are in config.json) and stays exact
    assert invoke_cli("train", "--out", str(watched), "--resume", "--max-steps", "6", "--device", "cpu",
                  "--quiet").exit_code == 0
    assert (watched / "preview_000006.png").is_file()


def test_heldout_loss_of_a_folder_needs_val_data(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 30 * i).save(folder / f"{i}.png")
    result = invoke_cli("train", str(folder), "--out", str(tmp_path / "r"), *TINY, "--val-every", "2")
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--val-data" in lines[0], result.output
    ok = invoke_cli("train", str(folder), "--out", str(tmp_path / "r2"), *TINY, "--val-every", "2", "--val-data",
                str(folder))
    assert ok.exit_code == 0, ok.output
