"""`ddpmctl sample`, `ddpmctl respace`, `ddpmctl samplers` through typer's CliRunner (tiny U-Net checkpoints)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ddpmctl.build import build_model
from ddpmctl.checkpoint import load_checkpoint, save_checkpoint
from ddpmctl.cli.app import app
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig
from ddpmctl.samplers import generate, get_sampler
from conftest import auto_precision, perturb_weights

T = 40
MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,))
DIFFUSION = DiffusionConfig(schedule="cosine", timesteps=T, var_type="learned_range")


def _state(model_config: ModelConfig) -> dict[str, torch.Tensor]:
    # The U-Net zero-initialises its output layer; perturb every weight so the network really shapes the samples.
    net = perturb_weights(build_model(CheckpointConfig(model=model_config, diffusion=DIFFUSION)), 0.05,
                          generator=torch.Generator().manual_seed(0))
    return dict(net.state_dict())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = CheckpointConfig(model=MODEL, diffusion=DIFFUSION)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", _state(MODEL), config,
                           kind="model", lineage=[{"op": "train", "step": 1}])


@pytest.fixture(scope="module")
def class_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = MODEL.model_copy(update={"num_classes": 3})
    config = CheckpointConfig(model=model, diffusion=DIFFUSION,
                              data=DataInfo(source="x", image_size=8, channels=1, class_names=("cat", "dog", "owl")))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "cond.safetensors", _state(model), config,
                           kind="model", lineage=[])


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def _sample(ckpt: Path, out: Path, *extra: str) -> object:
    result = _invoke("sample", str(ckpt), "--out", str(out), "--device", "cpu", "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return result


def _npz(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_sample_writes_pngs_grid_npz(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = _invoke("sample", str(ckpt), "--out", str(out), "--device", "cpu", "--sampler", "ddim", "--steps", "5",
                     "--num", "6", "--batch-size", "4", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num"] == 6 and summary["steps"] == 5 and summary["sampler"] == "ddim"
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.png" for i in range(6)] + ["grid.png", "samples.npz"]
    arrays = _npz(out)
    assert arrays["arr_0"].shape == (6, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    assert "labels" not in arrays
    for i in range(6):  # every PNG is the npz's image i
        png = np.asarray(Image.open(out / f"{i:06d}.png"))
        assert np.array_equal(png.reshape(8, 8), arrays["arr_0"][i, :, :, 0])
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 8 and grid.size[1] > 8
    assert len({arrays["arr_0"][i].tobytes() for i in range(6)}) == 6  # different noise per image


def test_same_seed_identical_files(ckpt: Path, tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / n for n in "abcd")
    _sample(ckpt, a, "--steps", "4", "--num", "10", "--batch-size", "8", "--seed", "3")
    _sample(ckpt, b, "--steps", "4", "--num", "10", "--batch-size", "8", "--seed", "3")
    _sample(ckpt, c, "--steps", "4", "--num", "10", "--batch-size", "64", "--seed", "3")
    _sample(ckpt, d, "--steps", "4", "--num", "10", "--batch-size", "8", "--seed", "4")
    for name in [f"{i:06d}.png" for i in range(10)] + ["grid.png", "samples.npz"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # Another batch size changes a float only at rounding (see below), which may tip a pixel to the next level.
    levels = _npz(a)["arr_0"].astype(int) - _npz(c)["arr_0"].astype(int)
    assert np.abs(levels).max() <= 1
    assert np.abs(_npz(a)["arr_0"].astype(int) - _npz(d)["arr_0"].astype(int)).max() > 10


@pytest.mark.every_cpu
@pytest.mark.parametrize(("sampler", "steps", "splits"), [("ddim", 4, (10, 8, 5)), ("strided", 6, (5, 2))])
def test_batch_size_changes_images_only_at_float_rounding(ckpt: Path, sampler: str, steps: int,
                                                          splits: tuple[int, ...], cpu_class: str) -> None:
    # Image i's noise (x_T and, for strided, every step's) comes from its own stream: a batch of 10 and splits of
    # 8 + 2 or 5 x 2 differ only in the order of float sums. Measured: up to 2.6e-6 (fp32) on [-1, 1]; a shared
    # stream moves an image by O(1).
    loaded, instance = load_checkpoint(ckpt), get_sampler(sampler)()
    num = 10 if sampler == "ddim" else 5
    images = [generate(loaded, instance, num=num, batch_size=size, seed=3, steps=steps)[0] for size in splits]
    for other in images[1:]:
        torch.testing.assert_close(other, images[0], rtol=0, atol=5e-5)
    assert len({tuple(image.flatten().tolist()) for image in images[0]}) == num  # different noise per image


def test_class_conditional_labels(class_ckpt: Path, tmp_path: Path) -> None:
    _sample(class_ckpt, tmp_path / "a", "--steps", "3", "--num", "4", "--class", "dog")
    assert _npz(tmp_path / "a")["arr_1"].tolist() == [1, 1, 1, 1]
    _sample(class_ckpt, tmp_path / "b", "--steps", "3", "--num", "4", "--class", "2")
    assert _npz(tmp_path / "b")["arr_1"].tolist() == [2, 2, 2, 2]
    _sample(class_ckpt, tmp_path / "c", "--steps", "3", "--num", "12", "--batch-size", "12")
    labels = _npz(tmp_path / "c")["arr_1"]
    assert len(set(labels.tolist())) > 1 and set(labels.tolist()) <= {0, 1, 2}  # drawn per image from (seed, i)
    _sample(class_ckpt, tmp_path / "d", "--steps", "3", "--num", "12", "--batch-size", "5")
    assert np.array_equal(_npz(tmp_path / "d")["arr_1"], labels)


def test_strided_equals_ancestral_on_respaced_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    respaced = tmp_path / "r.safetensors"
    result = _invoke("respace", str(ckpt), "--steps", "10", "--out", str(respaced), "--json")
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(respaced)
    assert loaded.kind == "respaced" and loaded.diffusion.num_timesteps == 10
    assert loaded.lineage[-1]["op"] == "respace" and loaded.lineage[-1]["from"] == "model.safetensors"
    assert loaded.lineage[-1]["steps"] == 10 and len(loaded.lineage[-1]["sha256"]) == 64
    assert loaded.lineage[0] == {"op": "train", "step": 1}
    _sample(ckpt, tmp_path / "strided", "--sampler", "strided", "--steps", "10", "--num", "3")
    _sample(respaced, tmp_path / "ancestral", "--sampler", "ancestral", "--num", "3")
    assert (tmp_path / "strided" / "samples.npz").read_bytes() == (tmp_path / "ancestral" / "samples.npz").read_bytes()


def test_respace_composes_and_ddim_spacing(ckpt: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "r20.safetensors", tmp_path / "r5.safetensors"
    assert _invoke("respace", str(ckpt), "--steps", "20", "--out", str(first), "-q").exit_code == 0
    assert _invoke("respace", str(first), "--steps", "5", "--out", str(second), "-q").exit_code == 0
    chain20 = load_checkpoint(first).config.diffusion.use_timesteps
    chain5 = load_checkpoint(second).config.diffusion.use_timesteps
    assert chain20 is not None and chain5 is not None
    # Even spacing of 5 over the 20-step chain, as original indices (docs/conventions.md #12 on 20 steps: 0,5,10,14,19).
    assert chain5 == tuple(chain20[k] for k in (0, 5, 10, 14, 19))
    ddim = tmp_path / "d.safetensors"
    assert _invoke("respace", str(ckpt), "--steps", "8", "--spacing", "ddim", "--out", str(ddim), "-q").exit_code == 0
    assert load_checkpoint(ddim).config.diffusion.use_timesteps == tuple(range(0, 40, 5))


def test_samplers_lists_builtins_and_options() -> None:
    result = _invoke("samplers", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name in ("ancestral", "strided", "ddim"):
        assert rows[name]["ok"], rows[name]
    ddim_options = {o["name"]: o["default"] for o in rows["ddim"]["options"]}
    assert ddim_options["eta"] == 0.0 and ddim_options["spacing"] == "even"
    table = _invoke("samplers")
    assert table.exit_code == 0 and "ancestral" in table.stdout and "eta=0.0" in table.stdout


def _one_line_error(result: object, code: int | None = None) -> str:
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--sampler", "nope"], "installed samplers: ancestral"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--steps", str(T + 1)], f"between 1 and the chain's {T} steps"),
    (["--sampler", "ancestral", "--steps", "7"], "whole chain of 40 steps"),
    (["-O", "spacing=ddim", "--steps", "17"], "possible nearby: 10, 14, 20, 40"),
    (["-O", "nope=1"], "has no option 'nope'"),
    (["--opt", "eta"], "key=value"),
    (["-O", "eta=-1"], "option eta=-1"),
    (["-O", "spacing=odd"], "option spacing=odd"),
    (["--num", "0"], "--num"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "-1"], "--seed must be at least 0, not -1"),  # checked by the library (samplers.check_sample_counts)
    (["--class", "dog"], "not class-conditional"),
    (["-O", "eta=1.5"], "option eta=1.5 must be at most 1"),
])
def test_bad_input_one_line(ckpt: Path, tmp_path: Path, extra: list[str], expected: str) -> None:
    result = _invoke("sample", str(ckpt), "--out", str(tmp_path / "s"), "--device", "cpu", *extra)
    assert expected in _one_line_error(result, 2)  # every one of these is a bad command line
    assert not (tmp_path / "s").exists()  # nothing is written before the inputs are known to be good


def test_dpmpp_2m_samples_through_the_cli(ckpt: Path, tmp_path: Path, cpu_class: str) -> None:
    result = _invoke("sample", str(ckpt), "--out", str(tmp_path / "s"), "--device", "cpu", "--sampler", "dpmpp-2m",
                     "--steps", "6", "--num", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 6
    # The images are dpmpp-2m's at 6 steps (the library's, same seed 0, batch and precision), not another count.
    loaded, sampler = load_checkpoint(ckpt), get_sampler("dpmpp-2m")()
    saved = _npz(tmp_path / "s")["arr_0"]
    for steps in (3, 6, 12):
        expected = generate(loaded, sampler, num=2, batch_size=64, seed=0, steps=steps, output="uint8",
                            precision=auto_precision(cpu_class))[0]
        assert np.array_equal(saved, expected.permute(0, 2, 3, 1).numpy()) is (steps == 6), steps


def test_bad_class_and_bad_checkpoint(class_ckpt: Path, tmp_path: Path) -> None:
    result = _invoke("sample", str(class_ckpt), "--out", str(tmp_path / "s"), "--class", "emu")
    assert "classes: cat, dog, owl" in _one_line_error(result)
    result = _invoke("sample", str(class_ckpt), "--out", str(tmp_path / "s"), "--class", "3")
    assert "out of range" in _one_line_error(result)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"this is not a checkpoint at all")
    _one_line_error(_invoke("sample", str(foreign), "--out", str(tmp_path / "s")), code=1)
    _one_line_error(_invoke("sample", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "s")))


def test_bad_out(ckpt: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in _one_line_error(_invoke("sample", str(ckpt), "--out", str(a_file), "--steps", "2"))
    result = _invoke("sample", str(ckpt), "--out", str(a_file / "sub"), "--steps", "2")
    assert "cannot create --out" in _one_line_error(result)
    out = tmp_path / "s"
    _sample(ckpt, out, "--steps", "2", "--num", "3")
    result = _invoke("sample", str(ckpt), "--out", str(out), "--steps", "2", "--num", "2")
    assert "--force" in _one_line_error(result)
    _sample(ckpt, out, "--steps", "2", "--num", "2", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "grid.png", "samples.npz"]


def test_respace_bad_input(ckpt: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "r.safetensors")
    assert f"between 1 and the chain's {T}" in _one_line_error(
        _invoke("respace", str(ckpt), "--steps", str(T + 1), "--out", out))
    assert "possible nearby" in _one_line_error(
        _invoke("respace", str(ckpt), "--steps", "17", "--spacing", "ddim", "--out", out))
    _one_line_error(_invoke("respace", str(ckpt), "--steps", "0", "--out", out), code=2)
    _one_line_error(_invoke("respace", str(ckpt), "--steps", "5", "--spacing", "odd", "--out", out), code=2)
    assert "input file" in _one_line_error(_invoke("respace", str(ckpt), "--steps", "5", "--out", str(ckpt)))
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"x")
    assert "--force" in _one_line_error(_invoke("respace", str(ckpt), "--steps", "5", "--out", str(taken)))
    assert "does not exist" in _one_line_error(
        _invoke("respace", str(ckpt), "--steps", "5", "--out", str(tmp_path / "no" / "r.safetensors")))


def test_respace_into_a_folder(ckpt: Path, tmp_path: Path) -> None:
    """An existing folder, or a path ending in a slash, means "into this folder" (never a file named like it)."""
    folder = tmp_path / "outdir"
    folder.mkdir()
    for out in (str(folder), str(folder) + "/"):
        result = _invoke("respace", str(ckpt), "--steps", "5", "--out", out, "--json", "--force")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["out"] == str(folder / "model_respaced5.safetensors")
    assert [p.name for p in folder.iterdir()] == ["model_respaced5.safetensors"]
    assert load_checkpoint(folder / "model_respaced5.safetensors").diffusion.num_timesteps == 5
    missing = _one_line_error(_invoke("respace", str(ckpt), "--steps", "5", "--out", str(tmp_path / "new") + "/"))
    assert "does not exist" in missing and not (tmp_path / "new").exists()
    beside = _invoke("respace", str(ckpt), "--steps", "6", "--json")  # no --out: beside the checkpoint
    assert json.loads(beside.stdout)["out"] == str(ckpt.with_name("model_respaced6.safetensors"))


def test_every_file_follows_the_umask(ckpt: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _sample(ckpt, tmp_path / "s", "--steps", "2", "--num", "2")
        assert _invoke("respace", str(ckpt), "--steps", "4", "-o", str(tmp_path / "r.safetensors"), "-q").exit_code == 0
    finally:
        os.umask(old)
    files = [*sorted((tmp_path / "s").iterdir()), tmp_path / "r.safetensors"]
    assert len(files) == 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_info_names_an_npz_for_what_it_is(ckpt: Path, tmp_path: Path) -> None:
    _sample(ckpt, tmp_path / "s", "--steps", "2", "--num", "2")
    result = _invoke("info", str(tmp_path / "s" / "samples.npz"))
    line = _one_line_error(result, 1)
    assert "NumPy .npz archive" in line and "not a checkpoint" in line and "pickle" not in line
    png = _one_line_error(_invoke("info", str(tmp_path / "s" / "grid.png")), 1)
    assert "PNG image" in png


def test_info_and_respace_take_device(ckpt: Path, tmp_path: Path) -> None:
    result = _invoke("info", str(ckpt), "--device", "cpu", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "model"
    assert _invoke("info", str(ckpt), "--device", "tpu").exit_code == 2
    out = tmp_path / "r.safetensors"
    result = _invoke("respace", str(ckpt), "--steps", "4", "-o", str(out), "--device", "cpu", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["steps"] == 4


def test_samplers_table_shows_option_descriptions(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpmctl.cli import samplers
    from ddpmctl.samplers import describe_options, get_sampler

    monkeypatch.setattr(samplers.out_console, "width", 400)  # no cell wraps: each option is one line of the table
    table = _invoke("samplers").stdout
    for name in ("ddim", "dpmpp-2m"):
        for option in describe_options(get_sampler(name)):
            assert option["description"], (name, option)
            assert f"{option['name']}=" in table and option["description"] in table, (name, option)


def _student(tmp_path: Path) -> Path:
    from ddpmctl.config import StudentConfig

    config = CheckpointConfig(model=MODEL, diffusion=DiffusionConfig(schedule="cosine", timesteps=T),
                              student=StudentConfig(param="v", steps=(9, 19, 29, 39), teacher_steps=8))
    return save_checkpoint(tmp_path / "student_4.safetensors", _state(MODEL), config, kind="student", lineage=[])


def test_sampler_defaults_to_the_checkpoint_kinds(ckpt: Path, tmp_path: Path) -> None:
    from ddpmctl.samplers import DEFAULT_SAMPLER, SAMPLER_FOR_KIND, default_sampler

    assert default_sampler("student") == "student" and default_sampler("model") == DEFAULT_SAMPLER == "ddim"
    assert all(default_sampler(kind) == name for kind, name in SAMPLER_FOR_KIND.items())
    student = _invoke("sample", str(_student(tmp_path)), "-o", str(tmp_path / "s"), "-n", "2", "--device", "cpu",
                      "--json")
    assert student.exit_code == 0, student.output
    assert json.loads(student.stdout)["sampler"] == "student" and json.loads(student.stdout)["steps"] == 4
    model = _invoke("sample", str(ckpt), "-o", str(tmp_path / "m"), "-n", "2", "--steps", "3", "--device", "cpu",
                    "--json")
    assert json.loads(model.stdout)["sampler"] == "ddim"


def test_none_option_means_the_unset_default(ckpt: Path, tmp_path: Path) -> None:
    """`ddpmctl samplers` shows lambda_max=None; typed back, it is the default (the same images)."""
    from ddpmctl.samplers import get_sampler, parse_options

    cls = get_sampler("dpmpp-2m")
    assert parse_options(cls, ["lambda_max=None", "lambda_min=none"]) == cls.Options()
    plain = _sample(ckpt, tmp_path / "a", "--sampler", "dpmpp-2m", "--steps", "4", "-n", "2")
    typed = _sample(ckpt, tmp_path / "b", "--sampler", "dpmpp-2m", "--steps", "4", "-n", "2", "-O", "lambda_max=None")
    assert plain.exit_code == typed.exit_code == 0
    assert np.array_equal(_npz(tmp_path / "a")["arr_0"], _npz(tmp_path / "b")["arr_0"])
    with pytest.raises(Exception, match="eta"):  # where None is not allowed it is still refused
        parse_options(get_sampler("ddim"), ["eta=None"])


def test_shards_concatenate_to_the_whole_set(class_ckpt: Path, tmp_path: Path) -> None:
    """Images 0..5 in one run, and as shards 0..1, 2..4, 5: the same images, labels and file names."""
    _sample(class_ckpt, tmp_path / "all", "-n", "6", "--steps", "3", "-b", "6", "-O", "eta=1")
    shards = [(0, 2), (2, 3), (5, 1)]
    for start, num in shards:
        _sample(class_ckpt, tmp_path / f"shard{start}", "-n", str(num), "--start-index", str(start), "--steps", "3",
                "-b", "6", "-O", "eta=1")
    whole = _npz(tmp_path / "all")
    parts = [_npz(tmp_path / f"shard{start}") for start, _ in shards]
    assert np.array_equal(np.concatenate([p["arr_0"] for p in parts]), whole["arr_0"])
    assert np.array_equal(np.concatenate([p["arr_1"] for p in parts]), whole["arr_1"])
    assert sorted(p.name for p in (tmp_path / "shard2").glob("*.png") if p.name != "grid.png") == [
        "000002.png", "000003.png", "000004.png"]
    assert (tmp_path / "shard2" / "000003.png").read_bytes() == (tmp_path / "all" / "000003.png").read_bytes()
    line = _one_line_error(_invoke("sample", str(class_ckpt), "-o", str(tmp_path / "x"), "--start-index", "-1"), 2)
    assert "--start-index must be at least 0" in line


def test_sampler_names_and_options_complete() -> None:
    from ddpmctl.cli.sample import complete_sampler, complete_sampler_option

    assert complete_sampler("d") == ["ddgan", "ddim", "dpmpp-2m"]
    assert "student" in complete_sampler("")

    class Ctx:
        params: dict[str, object] = {"sampler": "ddim"}

    assert complete_sampler_option(Ctx(), "sp") == ["spacing=", "spacing=ddim", "spacing=even", "spacing=logsnr"]
    assert "eta=" in complete_sampler_option(Ctx(), "") and "lambda_max=" not in complete_sampler_option(Ctx(), "")
    Ctx.params = {"sampler": None}
    assert "lambda_max=" in complete_sampler_option(Ctx(), "la")
