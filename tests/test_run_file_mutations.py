"""Mutation tests of the files a run reads back (docs/design.md "Run files"): a real state JSON, config.json and
checkpoint header, one field at a time set to a wrong type, a negative, zero or huge number, null, a neighbouring
value, or removed. Every outcome is either one ``error:`` line with the documented exit code (no traceback, no
internal error), or, when the file is accepted, a resume that ends at exactly the weights of an uninterrupted run
(a checkpoint that is accepted samples). The run is conftest's ``runs``."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ddpmctl.checkpoint import load_tensors
from ddpmctl.cli.app import app

# The resume runs to step 8 whatever the mutated file says about when to stop.
RESUME = ["--resume", "--max-steps", "8", "--max-time", "1h", "--quiet", "--device", "cpu"]
COMPARED = ("model_000008.safetensors", "ema_0.9999_000008.safetensors", "state_000008.safetensors")

MUTATIONS = ("remove", "null", "text", "list", "object", "true", "false", "float", "negative", "zero", "huge",
             "plus_one", "minus_one", "nan")
SLOW_EXAMPLES = settings(max_examples=24, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def leaves(value: Any, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every key path of a JSON value (objects and lists too, not only their leaves)."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*prefix, index))


def mutate(document: Any, path: tuple[str | int, ...], how: str) -> Any:
    """A copy of ``document`` with the value at ``path`` changed as ``how`` says."""
    document = json.loads(json.dumps(document))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    if how == "remove":
        del parent[key]
        return document
    number = old if isinstance(old, (int, float)) and not isinstance(old, bool) else 1
    parent[key] = {
        "null": None, "text": "sixty", "list": [], "object": {}, "true": True, "false": False,
        "float": number + 0.5, "negative": -abs(number) - 1, "zero": 0, "huge": 10**18, "plus_one": number + 1,
        "minus_one": number - 1, "nan": float("nan"),
    }[how]
    return document


def outcome(result: Any, codes: tuple[int, ...] = (1,)) -> str | None:
    """None when the command succeeded; else its one error line, after checking the contract (exit ``codes``)."""
    if result.exit_code == 0:
        return None
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def resume_mutated(runs: dict[str, Path], name: str, path: tuple[str | int, ...], how: str) -> None:
    """Mutate ``name`` in a copy of the 6-step run and resume it to step 8: refused in one line naming the file,
    or the uninterrupted run's weights, bit for bit."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(runs["run6"], run)
        document = json.loads((run / name).read_text())
        (run / name).write_text(json.dumps(mutate(document, path, how)))
        line = outcome(CliRunner().invoke(app, ["train", "--out", str(run), *RESUME]))
        print(f"mutation {name} {path} {how}: {'accepted' if line is None else 'refused'}")  # (shown with -s)
        if line is not None:
            assert name in line, line
            return
        for file in COMPARED:
            mine, reference = load_tensors(run / file)[0], load_tensors(runs["run8"] / file)[0]
            assert mine.keys() == reference.keys(), (path, how)
            assert all(torch.equal(mine[k], reference[k]) for k in mine), (path, how, file)


def _paths(runs: dict[str, Path], name: str) -> list[tuple[str | int, ...]]:
    return list(leaves(json.loads((runs["run6"] / name).read_text())))


@SLOW_EXAMPLES
@given(data=st.data())
def test_state_json_mutations(runs: dict[str, Path], data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_paths(runs, "state_000006.json")))
    resume_mutated(runs, "state_000006.json", path, data.draw(st.sampled_from(MUTATIONS)))


@SLOW_EXAMPLES
@given(data=st.data())
def test_config_json_mutations(runs: dict[str, Path], data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_paths(runs, "config.json")))
    resume_mutated(runs, "config.json", path, data.draw(st.sampled_from(MUTATIONS)))


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _with_header(header: dict[str, Any], data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _checkpoint_paths(header: dict[str, Any]) -> list[tuple[str, tuple[str | int, ...]]]:
    """Where a mutation can land: the safetensors header (tensor entries, metadata strings) or inside the JSON of
    the config and lineage metadata."""
    inside = [(key, sub) for key in ("config", "lineage")
              for sub in leaves(json.loads(header["__metadata__"][key]))]
    return [("", path) for path in leaves(header) if len(path) <= 3] + inside


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_checkpoint_header_mutations(runs: dict[str, Path], data: st.DataObject) -> None:
    header, tensor_data = _header(runs["run6"] / "ema_0.9999_000006.safetensors")
    where, path = data.draw(st.sampled_from(_checkpoint_paths(header)))
    how = data.draw(st.sampled_from(MUTATIONS))
    if where:
        header["__metadata__"][where] = json.dumps(mutate(json.loads(header["__metadata__"][where]), path, how))
    else:
        header = mutate(header, path, how)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "mutated.safetensors"
        ckpt.write_bytes(_with_header(header, tensor_data))
        # (sample may also exit 2: "--steps 2" can exceed a chain the mutated config shortened.)
        for args, codes in ((["info", str(ckpt)], (1,)),
                            (["sample", str(ckpt), "-o", str(Path(tmp) / "s"), "-n", "2", "--steps", "2",
                              "--device", "cpu", "--quiet"], (1, 2))):
            line = outcome(CliRunner().invoke(app, args), codes)
            print(f"mutation checkpoint {where} {path} {how} {args[0]}: {'accepted' if line is None else 'refused'}")
            if line is not None:
                assert str(ckpt) in line, line
                break
        else:  # accepted by both: the samples exist
            assert (Path(tmp) / "s" / "samples.npz").is_file()

