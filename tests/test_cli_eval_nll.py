"""`ddpmctl eval-nll CKPT` through typer's CliRunner: default data, table vs JSON, mc, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddpmctl.build import build_model
from ddpmctl.checkpoint import load_checkpoint, save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig
from ddpmctl.data import load_dataset
from ddpmctl.images import save_png
from ddpmctl.nll import evaluate_nll
from conftest import perturb_weights

T = 10
MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,))
DIGITS = DataInfo(source="builtin:digits", image_size=8, channels=1, num_images=1437)



def _save(path: Path, *, data: DataInfo | None = DIGITS, model: ModelConfig = MODEL) -> Path:
    torch.manual_seed(0)
    network = perturb_weights(build_model(CheckpointConfig(model=model, diffusion=DiffusionConfig(timesteps=T))), 0.05,
                              only_zero=True)  # the terms must depend on the input
    config = CheckpointConfig(model=model, diffusion=DiffusionConfig(timesteps=T), data=data)
    return save_checkpoint(path, network.state_dict(), config, kind="model", lineage=[])


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("nll") / "digits.safetensors")


def _run(*args: str):
    return CliRunner().invoke(app, ["eval-nll", *args])


@pytest.mark.every_cpu
def test_default_data_is_the_held_out_split_and_json_matches_the_library(digits_ckpt: Path, cpu_class: str) -> None:
    # --precision auto: the library at the precision the class picks (bf16 on avx512-bf16) gives the same numbers.
    result = _run(str(digits_ckpt), "-n", "5", "--device", "cpu", "--json", "--quiet", "--seed", "2")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["data"] == "builtin:digits" and payload["split"] == "test"
    assert payload["num_images"] == 5 and payload["num_terms"] == T and payload["estimator"] == "exact"
    test_images = load_dataset("builtin:digits", split="test").images[:5]
    assert payload["precision"] == "fp32"  # eval-nll's auto: fp32 on every CPU class
    expected = evaluate_nll(load_checkpoint(digits_ckpt), test_images, seed=2, precision="fp32")
    assert payload["bits_per_dim"] == pytest.approx(expected.mean, rel=1e-6)
    assert payload["stderr"] == pytest.approx(expected.stderr, rel=1e-6)
    rows = {row["term"]: row for row in payload["breakdown"]}
    assert list(rows) == ["prior", "L_0", "KL q1", "KL q2", "KL q3", "KL q4", "total"]
    assert rows["total"]["bits_per_dim"] == pytest.approx(
        sum(rows[k]["bits_per_dim"] for k in ("prior", "L_0", "KL q1", "KL q2", "KL q3", "KL q4")), rel=1e-9)
    assert rows["KL q1"]["t_range"] == [1, 2] and rows["KL q4"]["t_range"] == [8, 9]


@pytest.mark.every_cpu
def test_auto_is_fp32_even_where_bf16_is_native(digits_ckpt: Path, cpu_class: str) -> None:
    # The bits/dim users compare with papers' (fp32) numbers: auto never picks bf16 here, unlike train and sample.
    args = [str(digits_ckpt), "-n", "3", "--device", "cpu", "--json", "--quiet"]
    auto = json.loads(_run(*args).stdout)
    assert auto["precision"] == "fp32"
    expected = evaluate_nll(load_checkpoint(digits_ckpt), load_dataset("builtin:digits", split="test").images[:3])
    assert auto["bits_per_dim"] == pytest.approx(expected.mean, rel=1e-6)
    assert json.loads(_run(*args, "--precision", "bf16").stdout)["precision"] == "bf16"
    help_text = CliRunner().invoke(app, ["eval-nll", "--help"], env={"COLUMNS": "400"}).stdout
    assert "auto: fp32 on every device" in help_text and "summed in fp64" in help_text


def test_table_and_json_agree(digits_ckpt: Path, cpu_class: str) -> None:
    # The same batch size for both: the same float sums, so the table must show the JSON's numbers rounded.
    table = _run(str(digits_ckpt), "-n", "4", "--device", "cpu", "-b", "7")
    as_json = _run(str(digits_ckpt), "-n", "4", "--device", "cpu", "-b", "7", "--json", "--quiet")
    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    payload = json.loads(as_json.stdout)
    precision = "fp32"  # eval-nll's auto on every CPU class
    line = re.search(rf"bits/dim: (\d+\.\d{{4}}) ± (\d+\.\d{{4}}) \((\d+) images, (\d+) terms; {precision}\)",
                     table.stdout)
    assert line, table.stdout
    assert payload["precision"] == precision
    assert float(line.group(1)) == round(payload["bits_per_dim"], 4)
    assert float(line.group(2)) == round(payload["stderr"], 4)
    assert (int(line.group(3)), int(line.group(4))) == (4, T)
    for row in payload["breakdown"]:
        if row["term"] == "prior":
            continue  # printed in scientific notation (it is ~1e-6)
        cells = re.search(rf"{re.escape(row['term'])}\s+│[^│]*│\s+(\d+\.\d{{4}})\s+│\s+(\d+\.\d{{4}})", table.stdout)
        assert cells, (row["term"], table.stdout)
        assert float(cells.group(1)) == round(row["bits_per_dim"], 4)
        assert float(cells.group(2)) == round(row["stderr"], 4)
    assert "terms" in table.stderr  # the progress bar goes to stderr


def test_mc_estimator(digits_ckpt: Path, cpu_class: str) -> None:
    result = _run(str(digits_ckpt), "-n", "3", "--device", "cpu", "--estimator", "mc", "--terms", "3",
                  "--pilot-images", "2", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["estimator"] == "mc" and payload["mc_terms"] == 3 and payload["terms_per_image"] == 4
    assert payload["pilot_images"] == 2 and payload["num_terms"] == T
    line = _run(str(digits_ckpt), "-n", "3", "--device", "cpu", "--estimator", "mc", "--terms", "3", "--quiet")
    expected = "(3 images, 10 terms; mc, 3 sampled per image; fp32)"
    assert "bits/dim: " in line.stdout and expected in line.stdout


def test_mc_per_image_error_in_json_and_one_image_is_not_nan(digits_ckpt: Path) -> None:
    result = _run(str(digits_ckpt), "-n", "1", "--device", "cpu", "--estimator", "mc", "--terms", "4",
                  "--pilot-images", "1", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (image,) = payload["per_image"]
    assert image["bits_per_dim"] == pytest.approx(payload["bits_per_dim"], rel=1e-12)
    assert image["mc_stderr"] is not None and image["mc_stderr"] > 0
    # One image: no spread over images, so the error of the mean is that image's own Monte-Carlo error.
    assert payload["stderr"] == pytest.approx(image["mc_stderr"], rel=1e-12)
    exact = json.loads(_run(str(digits_ckpt), "-n", "2", "--device", "cpu", "--json", "--quiet").stdout)
    assert all(row["mc_stderr"] is None for row in exact["per_image"]) and len(exact["per_image"]) == 2


def test_student_checkpoint_is_refused(tmp_path: Path) -> None:
    from ddpmctl.config import StudentConfig

    config = CheckpointConfig(model=MODEL, diffusion=DiffusionConfig(timesteps=T), data=DIGITS,
                              student=StudentConfig(param="v", steps=(4, 9), teacher_steps=4))
    network = build_model(config)
    path = save_checkpoint(tmp_path / "student_2.safetensors", network.state_dict(), config, kind="student",
                           lineage=[])
    result = _run(str(path), "-n", "2", "--device", "cpu", "--json")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == ("error: student_2.safetensors is a distilled student: a student has no "
                                     "variational bound (evaluate the teacher it was distilled from)")
    assert result.stdout == ""


def test_folder_data(tmp_path: Path, digits_ckpt: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        save_png(folder / f"{k}.png", torch.full((1, 8, 8), 40 * k, dtype=torch.uint8))
    result = _run(str(digits_ckpt), "--data", str(folder), "--device", "cpu", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 3
    split = _run(str(digits_ckpt), "--data", str(folder), "--split", "test", "--device", "cpu")
    assert split.exit_code == 2 and "--split applies to builtin" in split.stderr


def test_data_that_does_not_fit_is_refused_unless_resize(tmp_path: Path, digits_ckpt: Path) -> None:
    """16x16 RGB images for an 8x8 grayscale model: no bits/dim of other images than the ones given."""
    folder = tmp_path / "rgb16"
    folder.mkdir()
    for k in range(3):
        save_png(folder / f"{k}.png", torch.full((3, 16, 16), 40 * k, dtype=torch.uint8).index_fill_(0, torch.tensor(
            [0]), 200))
    refused = _run(str(digits_ckpt), "--data", str(folder), "--device", "cpu")
    assert refused.exit_code == 1 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert "takes 1-channel 8x8 images" in refused.stderr and "pass --resize" in refused.stderr
    assert "3 of 3 images (16x16) resized and cropped to 8x8; 3 color images converted to grayscale" in refused.stderr
    converted = _run(str(digits_ckpt), "--data", str(folder), "--device", "cpu", "--resize")
    assert converted.exit_code == 0, converted.output
    assert "converted to fit the model: 3 of 3 images (16x16) resized" in " ".join(converted.stderr.split())
    assert "bits/dim:" in converted.stdout
    # The checkpoint's own training data is converted as in training (an 8x8 model of digits upscaled to 16x16).
    big = _save(tmp_path / "big.safetensors", data=DIGITS.model_copy(update={"image_size": 16}),
                model=MODEL.model_copy(update={"image_size": 16, "attention_resolutions": (8,)}))
    same = _run(str(big), "-n", "2", "--device", "cpu", "--json")
    assert same.exit_code == 0, same.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--terms", "4"], "--terms is for --estimator mc"),
        (["--num", "0"], "--num"),
        (["-n", "1", "--num-images", "1"], "--num-images is the old name of --num"),
        (["--batch-size", "0"], "--batch-size"),
        (["--estimator", "mc", "--terms", "0"], "--terms"),
        (["--estimator", "bogus"], "--estimator"),
        (["--split", "val"], "--split"),
    ],
)
def test_usage_errors_exit_2_with_one_line(digits_ckpt: Path, args: list[str], message: str) -> None:
    result = _run(str(digits_ckpt), "--device", "cpu", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_data_errors(tmp_path: Path) -> None:
    no_info = _save(tmp_path / "none.safetensors", data=None)
    result = _run(str(no_info), "--device", "cpu")
    assert result.exit_code == 2 and "does not record what it was trained on: pass --data" in result.stderr
    folder = DataInfo(source="/data/cats", image_size=8, channels=1)
    trained_on_folder = _save(tmp_path / "folder.safetensors", data=folder)
    result = _run(str(trained_on_folder), "--device", "cpu")
    assert result.exit_code == 2
    assert "the checkpoint was trained on /data/cats, which has no held-out split: pass --data DIR" in result.stderr
    missing = _run(str(tmp_path / "absent.safetensors"), "--device", "cpu")
    assert missing.exit_code == 1 and missing.stderr.startswith("error: ")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_class_count_mismatch_is_one_line(tmp_path: Path) -> None:
    conditional = _save(tmp_path / "c.safetensors", model=MODEL.model_copy(update={"num_classes": 3}))
    result = _run(str(conditional), "--device", "cpu", "-n", "2")
    assert result.exit_code == 1 and "conditioned on 3 classes but builtin:digits has 10" in result.stderr
