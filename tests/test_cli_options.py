"""The command line as a user meets it: one meaning per short flag, typed options with their choices and help,
booleans as --x/--no-x, one-line usage errors (exit 2), --device everywhere a network runs, shell completion, and
the README's usage lines naming only options that exist."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ddpmctl import config as config_module
from ddpmctl.cli import distill, eval_nll, respace, sample, train
from ddpmctl.cli.app import app
from ddpmctl.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ("train", "sample", "eval-nll", "eval-samples", "respace", "distill", "samplers", "info", "convert",
            "plot")
NETWORK_COMMANDS = ("train", "sample", "eval-nll", "eval-samples", "respace", "distill", "info")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def commands() -> dict[str, Any]:
    group = typer.main.get_command(app)
    return dict(group.commands)  # type: ignore[attr-defined]


def _options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option"]


def test_every_command_is_registered(commands: dict[str, Any]) -> None:
    assert set(commands) == set(COMMANDS)


def test_each_short_flag_has_one_meaning_across_commands(commands: dict[str, Any]) -> None:
    meaning: dict[str, set[str]] = {}
    for command in commands.values():
        for option in _options(command):
            longs = [o for o in option.opts if o.startswith("--")]
            for short in (o for o in option.opts if not o.startswith("--")):
                meaning.setdefault(short, set()).update(longs)
    assert all(len(longs) == 1 for longs in meaning.values()), meaning
    assert meaning["-o"] == {"--out"} and meaning["-b"] == {"--batch-size"} and meaning["-n"] == {"--num"}
    assert meaning["-O"] == {"--opt"} and meaning["-q"] == {"--quiet"}


@pytest.mark.parametrize(("command", "shorts"), [
    ("train", {"-o", "-b", "-q"}), ("sample", {"-o", "-b", "-n", "-O", "-s", "-q"}), ("eval-nll", {"-n", "-b", "-q"}),
    ("respace", {"-o", "-q"}), ("distill", {"-o", "-b", "-q"}),
])
def test_the_common_short_flags_exist_where_the_option_does(commands: dict[str, Any], command: str,
                                                            shorts: set[str]) -> None:
    present = {o for option in _options(commands[command]) for o in option.opts if not o.startswith("--")}
    assert shorts <= present, (command, shorts - present)


def test_every_option_has_help_text(commands: dict[str, Any]) -> None:
    missing = [f"{name} {option.opts[0]}" for name, command in commands.items() for option in _options(command)
               if not option.hidden and not (option.help or "").strip()]
    assert not missing, missing


@pytest.mark.parametrize("command", NETWORK_COMMANDS)
def test_device_on_every_command_that_loads_a_network(commands: dict[str, Any], command: str) -> None:
    assert any("--device" in option.opts for option in _options(commands[command]))


@pytest.mark.parametrize(("command", "flag", "choices"), [
    ("eval-nll", "--estimator", "exact|mc"), ("eval-nll", "--split", "test|train"),
    ("respace", "--spacing", "even|ddim"), ("distill", "--weighting", "truncated-snr|snr+1"),
    ("distill", "--param", "v|x|both"), ("distill", "--precision", "auto|fp32|bf16"),
    ("sample", "--precision", "auto|fp32|bf16"), ("train", "--precision", "auto|fp32|bf16"),
    ("eval-nll", "--precision", "auto|fp32|bf16"), ("train", "--ema-warmup", "power|none"),
    ("train", "--schedule", "cosine|linear"), ("train", "--mean-type", "eps|x0|v"),
    ("train", "--nan-policy", "stop|skip"), ("train", "--color", "auto|rgb|gray"),
])
def test_choices_are_listed_in_help(command: str, flag: str, choices: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if f" {flag} " in line)
    assert choices in line, line


def test_flags_show_no_value_placeholder() -> None:
    for command in COMMANDS:
        text = invoke(command, "--help").stdout
        assert "<bool>" not in text, command


@pytest.mark.parametrize(("command", "pairs"), [
    ("train", ("--flip/--no-flip", "--class-cond/--no-class-cond", "--skip-bad-images/--no-skip-bad-images")),
    ("distill", ("--flip/--no-flip",)),
])
def test_booleans_come_as_on_off_pairs(commands: dict[str, Any], command: str, pairs: tuple[str, ...]) -> None:
    present = {f"{o.opts[0]}/{o.secondary_opts[0]}" for o in _options(commands[command]) if o.secondary_opts}
    assert set(pairs) <= present


def test_cli_choices_match_the_config() -> None:
    # The CLI declares the config's own Literal types (ddpmctl.choices); only the variance types are spelled with
    # hyphens on the command line.
    for field, cli_type in [("color", train.ColorMode), ("schedule", train.Schedule), ("mean_type", train.MeanType),
                            ("loss", train.LossName), ("timestep_sampler", train.TimestepSamplerName),
                            ("nan_policy", train.NanPolicy), ("precision", train.PrecisionRequest),
                            ("ema_warmup", train.EmaWarmup)]:
        annotation = TrainConfig.model_fields[field].annotation
        # A field whose default is chosen from the data is Optional: its Literal is the CLI's type.
        assert annotation is cli_type or cli_type in typing.get_args(annotation), field
    config_var_types = typing.get_args(TrainConfig.model_fields["var_type"].annotation)
    assert {v.replace("_", "-") for v in config_var_types} == set(typing.get_args(train.VarType))
    assert distill.StudentParam is config_module.StudentParam and distill.Weighting is config_module.Weighting
    assert distill.PrecisionRequest is sample.PrecisionRequest is eval_nll.PrecisionRequest is train.PrecisionRequest
    assert set(typing.get_args(respace.Spacing)) == {"even", "ddim"}
    assert set(typing.get_args(eval_nll.Estimator)) == {"exact", "mc"}


def test_train_defaults_in_help_are_the_config_defaults(commands: dict[str, Any]) -> None:
    checked = 0
    for option in _options(commands["train"]):
        field = option.name
        if field not in TrainConfig.model_fields:
            continue
        default = TrainConfig.model_fields[field].default
        shown = option.default.replace("-", "_") if field == "var_type" else option.default
        assert shown == default, (field, option.default, default)
        checked += 1
    assert checked >= 25


def test_usage_errors_are_one_line_with_exit_2() -> None:
    for args in (["sample", "x.safetensors", "--out", "o", "--frob"], ["sample", "x.safetensors"],
                 ["eval-nll", "x", "--split", "val"], ["train", "builtin:digits", "--batch-size", "many"],
                 ["respace", "x", "--steps", "0", "--out", "y"], ["bogus-command"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "╭" not in result.output, (args, result.output)


def test_flag_pairs_undo_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ddpmctl.train as train_module

    seen: dict[str, TrainConfig] = {}

    def fake_train(config: TrainConfig, **kwargs: Any) -> None:
        seen["config"] = config
        raise train_module.TrainingError("stub: not training")

    monkeypatch.setattr(train_module, "train", fake_train)
    toml = tmp_path / "c.toml"
    toml.write_text('data = "builtin:digits"\nflip = false\nclass_cond = true\nlr = 0.0003\n')
    invoke("train", "--config", str(toml), "--out", str(tmp_path / "a"))
    assert seen["config"].flip is False and seen["config"].class_cond is True and seen["config"].lr == 3e-4
    invoke("train", "--config", str(toml), "--out", str(tmp_path / "b"), "--flip", "--no-class-cond")
    assert seen["config"].flip is True and seen["config"].class_cond is False and seen["config"].lr == 3e-4
    # a default never overrides the file: --lr not given keeps 3e-4 although the option's default is 1e-4
    invoke("train", "--config", str(toml), "--out", str(tmp_path / "c"), "--batch-size", "8")
    assert seen["config"].lr == 3e-4 and seen["config"].batch_size == 8


def test_completion_is_offered() -> None:
    text = invoke("--help").stdout
    assert "--install-completion" in text and "--show-completion" in text


def _readme_usage_lines() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("ddpmctl ") or " -m ddpmctl " in line:
                lines.append(line.split("ddpmctl ", 1)[1].split())
    return lines


def test_readme_usage_names_only_options_that_exist(commands: dict[str, Any]) -> None:
    lines = _readme_usage_lines()
    assert len(lines) >= 10
    for words in lines:
        name = words[0]
        assert name in commands, words
        known = {o for option in commands[name].params for o in [*option.opts, *option.secondary_opts]}
        known |= {"-h", "--help"}
        for word in words[1:]:
            flag = word.strip("[]").split("=", 1)[0]
            if flag.startswith("-") and flag != "--" and not flag.startswith("---"):
                for part in flag.split("|"):
                    assert part in known, (name, part)


@pytest.mark.parametrize("columns", ["80", "60"])
def test_help_is_never_cut_in_a_narrow_terminal(columns: str) -> None:
    """Typer cuts a cell that does not fit (`--no-skip-bad-i…`); ddpmctl folds it instead, so every name is whole."""
    for command in COMMANDS:
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": columns}).stdout
        assert "…" not in text, (command, text)
        assert "--help" in text  # (the help itself is there)


def test_sampler_completion_through_the_shell_protocol() -> None:
    """What bash asks for on `ddpmctl sample CKPT --sampler d<TAB>` (click's completion environment variables)."""
    result = CliRunner().invoke(app, [], env={"_DDPMCTL_COMPLETE": "complete_bash", "COMP_WORDS":
                                              "ddpmctl sample x.safetensors --sampler d", "COMP_CWORD": "4"},
                                prog_name="ddpmctl")
    assert result.stdout.split() == ["ddgan", "ddim", "dpmpp-2m"], result.output


@pytest.mark.parametrize(("args", "expected"), [
    (["sample", "x.safetensors", "-o", "o", "--steps", "0"], "--steps must be at least 1"),  # typer's check
    (["sample", "x.safetensors", "-o", "o", "-n", "1000000"], "--num must be at most 999999"),
    (["sample", "x.safetensors", "-o", "o", "--seed", "-1"], "--seed must be at least 0, not -1"),  # ddpmctl's
    (["train", "builtin:digits", "--ema", "1.5"], "--ema must be less than 1, not 1.5"),  # pydantic's
    (["train", "builtin:digits", "--max-steps", "0"], "--max-steps must be at least 1, not 0"),
    (["sample", "x.safetensors", "-o", "o", "-s", "ddim", "-O", "eta=2"], "option eta=2 must be at most 1"),
])
def test_range_errors_have_one_wording(args: list[str], expected: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert expected in result.stderr and "Input should" not in result.stderr and "Invalid value" not in result.stderr
