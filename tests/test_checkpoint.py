"""Checkpoint format (docs/design.md "The checkpoint format": loading treats the file as untrusted): round trips, atomic
writes, and every kind of bad file giving one CheckpointError line that names the file, never running code."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddpmctl
import ddpmctl.checkpoint as checkpoint_module
from ddpmctl.build import build_model
from ddpmctl.checkpoint import FORMAT, load_checkpoint, read_checkpoint_info, save_checkpoint
from ddpmctl.fileio import file_sha256, load_tensors, save_tensors, write_json_atomic
from ddpmctl.config import CheckpointConfig, DataInfo, DiffusionConfig, ModelConfig, StudentConfig
from ddpmctl.errors import CheckpointError

MODEL = ModelConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,))
DIFFUSION = DiffusionConfig(schedule="cosine", timesteps=10)
CONFIG = CheckpointConfig(model=MODEL, diffusion=DIFFUSION,
                          data=DataInfo(source="builtin:digits", image_size=8, channels=1, num_images=1437))
LINEAGE = [{"op": "train", "run": "runs/a", "step": 300, "ema": 0.9999}]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = build_model(CONFIG)
    # Randomise every tensor (the zero-initialised output conv included) so a round trip is a real check.
    return {k: torch.randn_like(v) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def good(state: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("good") / "model.safetensors", state, CONFIG, kind="model",
                           lineage=LINEAGE)


def _metadata(**overrides: str) -> dict[str, str]:
    meta = {"format": FORMAT, "config": CONFIG.model_dump_json(), "kind": "model",
            "lineage": json.dumps(LINEAGE), "created_with": "0.1.0"}
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def _raw(header: object, data: bytes = b"") -> bytes:
    """A safetensors-shaped file by hand: u64 little-endian header length, JSON header, data."""
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _assert_refused(path: Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip(good: Path, state: dict[str, torch.Tensor]) -> None:
    ckpt = load_checkpoint(good)
    assert ckpt.path == good and ckpt.kind == "model" and ckpt.lineage == LINEAGE
    assert ckpt.config == CONFIG and ckpt.created_with == ddpmctl.__version__
    loaded = ckpt.model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert not ckpt.model.training
    assert ckpt.num_parameters == sum(p.numel() for p in ckpt.model.parameters())
    assert ckpt.sha256 == hashlib.sha256(good.read_bytes()).hexdigest() == file_sha256(good)
    assert ckpt.diffusion.num_timesteps == 10
    assert torch.equal(ckpt.diffusion.timestep_map, torch.arange(10))


def test_respaced_checkpoint_builds_respaced_diffusion(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    config = CONFIG.model_copy(update={"diffusion": DIFFUSION.model_copy(update={"use_timesteps": (0, 3, 6, 9)})})
    path = save_checkpoint(tmp_path / "r.safetensors", state, config, kind="respaced",
                           lineage=[*LINEAGE, {"op": "respace", "steps": 4}])
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "respaced" and ckpt.lineage[-1] == {"op": "respace", "steps": 4}
    assert ckpt.diffusion.num_timesteps == 4
    assert ckpt.diffusion.timestep_map.tolist() == [0, 3, 6, 9]
    assert ckpt.diffusion.original_num_steps == 10


def test_student_kind_needs_student_config(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.student"):
        save_checkpoint(tmp_path / "s.safetensors", state, CONFIG, kind="student", lineage=[])
    student = CONFIG.model_copy(update={"student": StudentConfig(steps=(4, 9), teacher_steps=4)})
    path = save_checkpoint(tmp_path / "s.safetensors", state, student, kind="student", lineage=[])
    assert load_checkpoint(path).config.student == StudentConfig(steps=(4, 9), teacher_steps=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_cast_to_float32(state: dict[str, torch.Tensor], tmp_path: Path,
                                                    dtype: torch.dtype) -> None:
    half = {k: v.to(dtype) for k, v in state.items()}
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "h.safetensors", half, CONFIG, kind="model", lineage=[]))
    for name, tensor in ckpt.model.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, half[name].float()), name


def test_save_handles_shared_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"a": base, "tied": base, "t": base.t(), "slice": base[1]}
    save_tensors(tmp_path / "x.safetensors", tensors, {"step": "7"})
    loaded, meta = load_tensors(tmp_path / "x.safetensors")
    assert meta == {"step": "7"}
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_read_checkpoint_info_does_not_build_the_network(good: Path, state: dict[str, torch.Tensor],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_checkpoint_info must not build the network")

    monkeypatch.setattr(checkpoint_module, "build_model", refuse)
    info = read_checkpoint_info(good)
    assert info.kind == "model" and info.format == FORMAT and info.config == CONFIG and info.lineage == LINEAGE
    assert {t.name: t.shape for t in info.tensors} == {k: tuple(v.shape) for k, v in state.items()}
    assert {t.dtype for t in info.tensors} == {"F32"}
    assert info.num_tensors == len(state)
    assert info.num_parameters == sum(v.numel() for v in state.values())
    assert info.file_size == good.stat().st_size


# ------------------------------------------------------------------------------------------------ bad checkpoints


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("where", ["empty", "3", "8", "inside header", "header end - 1", "header end",
                                   "inside data", "last byte"])
def test_truncated(good: Path, tmp_path: Path, where: str) -> None:
    blob = good.read_bytes()
    end = 8 + _header_length(good)
    cut = {"empty": 0, "3": 3, "8": 8, "inside header": 40, "header end - 1": end - 1, "header end": end,
           "inside data": end + (len(blob) - end) // 2, "last byte": len(blob) - 1}[where]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(blob[:cut])
    message = _assert_refused(path)
    assert ("truncated" in message) or ("not a safetensors file" in message), message
    if cut >= 40:
        assert "truncated" in message


def test_random_bytes(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    for size in (1, 7, 8, 9, 100, 10_000):
        path = tmp_path / f"r{size}.safetensors"
        path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).tolist()))
        _assert_refused(path)


def test_huge_header_length_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b'{"a": 1}')
    _assert_refused(path, "not a safetensors file")


def test_trailing_bytes(good: Path, tmp_path: Path) -> None:
    path = tmp_path / "tail.safetensors"
    path.write_bytes(good.read_bytes() + b"\0" * 16)
    _assert_refused(path, "16 unexpected bytes")


@pytest.mark.parametrize("header", [[1, 2], "text", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                    {"w": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}},
                                    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                                    {"w": [1]}, {"__metadata__": {"format": 1}}])
def test_corrupt_headers(tmp_path: Path, header: object) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(_raw(header, b"\0" * 4))
    _assert_refused(path)


def test_header_not_json(tmp_path: Path) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{nope}")
    _assert_refused(path, "not JSON")


def test_foreign_safetensors_without_metadata(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(state, str(path))
    _assert_refused(path, "has no ddpmctl metadata: was it written by ddpmctl?")
    safetensors.torch.save_file(state, str(path), metadata={"producer": "another tool"})
    _assert_refused(path, "has no ddpmctl metadata")


@pytest.mark.parametrize(("overrides", "words"), [
    ({"format": "ddpmctl/2"}, ("format ddpmctl/2 is newer than this ddpmctl understands (ddpmctl/1)",)),
    ({"format": "other/1"}, ("unknown format",)),
    ({"kind": "teacher"}, ("kind", "'teacher'")),
    ({"kind": None}, ("kind is missing",)),
    ({"config": "{not json"}, ("config metadata is not valid JSON",)),
    ({"config": None}, ("no config",)),
    ({"config": json.dumps({**json.loads(CONFIG.model_dump_json()), "extra": 1})}, ("config.extra",)),
    ({"config": CONFIG.model_dump_json().replace('"image_size":8', '"image_size":2', 1)},
     ("config.model.image_size",)),
    ({"config": CONFIG.model_dump_json().replace('"schedule":"cosine"', '"schedule":"sigmoid"')},
     ("config.diffusion.schedule",)),
    # ddpmctl 0.1 stored T and the output channels in config.model too: they must agree with the rest.
    ({"config": CONFIG.model_dump_json().replace('"model":{', '"model":{"out_channels":1,')}, ("out_channels",)),
    ({"config": CONFIG.model_dump_json().replace('"model":{', '"model":{"num_timesteps":20,')}, ("num_timesteps",)),
    ({"lineage": "{}"}, ("lineage", "list")),
    ({"lineage": "[1, 2]"}, ("lineage", "list")),
    ({"lineage": "[{"}, ("lineage", "not valid JSON")),
])
def test_bad_metadata(state: dict[str, torch.Tensor], tmp_path: Path, overrides: dict, words: tuple) -> None:
    path = tmp_path / "meta.safetensors"
    safetensors.torch.save_file(state, str(path), metadata=_metadata(**overrides))
    _assert_refused(path, *words)
    with pytest.raises(CheckpointError):
        read_checkpoint_info(path)


def test_missing_and_extra_tensors(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    dropped = sorted(state)[0]
    safetensors.torch.save_file({k: v for k, v in state.items() if k != dropped}, str(path), metadata=_metadata())
    _assert_refused(path, "missing", dropped)
    safetensors.torch.save_file({**state, "bonus.weight": torch.zeros(3)}, str(path), metadata=_metadata())
    _assert_refused(path, "unexpected", "bonus.weight")


def test_wrong_shape(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    name = next(k for k, v in state.items() if v.dim() == 4)
    path = tmp_path / "s.safetensors"
    safetensors.torch.save_file({**state, name: torch.zeros(1, 2, 3, 3)}, str(path), metadata=_metadata())
    _assert_refused(path, name, "shape [1, 2, 3, 3]")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_wrong_dtype(state: dict[str, torch.Tensor], tmp_path: Path, dtype: torch.dtype) -> None:
    name = sorted(state)[0]
    path = tmp_path / "d.safetensors"
    safetensors.torch.save_file({**state, name: state[name].to(dtype)}, str(path), metadata=_metadata())
    _assert_refused(path, name, "dtype")


def test_hostile_config_is_refused_before_building(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    huge = CONFIG.model_dump_json().replace('"num_res_blocks":1', '"num_res_blocks":100000000')
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file(state, str(path), metadata=_metadata(config=huge))
    _assert_refused(path, "config.model.num_res_blocks", "must be at most 16")
    # Within train's caps, but more blocks than a file of two tensors can hold: refused before the build too.
    deep = CONFIG.model_dump_json().replace('"num_res_blocks":1', '"num_res_blocks":16')
    safetensors.torch.save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(path), metadata=_metadata(config=deep))
    _assert_refused(path, "more blocks than the file has tensors")


class _Touch:
    """Unpickling this would create a marker file: proof that a load never executes a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("flavour", ["zip", "legacy", "raw"])
def test_pickle_checkpoint_is_refused_without_loading(tmp_path: Path, flavour: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"state_dict": {"w": torch.zeros(2)}, "evil": _Touch(marker)}
    if flavour == "raw":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(flavour == "zip"))
    _assert_refused(path, "is a PyTorch pickle checkpoint; ddpmctl never loads pickle")
    with pytest.raises(CheckpointError):
        read_checkpoint_info(path)
    with pytest.raises(CheckpointError):
        load_tensors(path)
    assert not marker.exists()


def test_directory_and_missing_path(tmp_path: Path) -> None:
    _assert_refused(tmp_path, "is a directory")
    _assert_refused(tmp_path / "nothing.safetensors", "does not exist")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensors(tmp_path / "nothing.safetensors")


def test_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    _assert_refused(fifo, "not a regular file")


# ---------------------------------------------------------------------------------------------------- fuzzing

_FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _load_or_refuse(path: Path) -> None:
    """The only acceptable outcomes for any input: a loaded checkpoint or one CheckpointError line."""
    try:
        load_checkpoint(path)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(path) in str(err)


@_FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_header_bytes(good: Path, tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    blob = bytearray(good.read_bytes())
    end = 8 + _header_length(good)
    for position, value in edits:
        blob[position % end] = value  # only the length prefix and the JSON header
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(blob))
    _load_or_refuse(path)


_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["[]", "{}", "null", "[{}]", "ddpmctl/1", "ddpmctl/99",
                                                         "model", "respaced", "student", '{"model": {}}', "1e999"]))


@_FUZZ
@given(values=st.dictionaries(st.sampled_from(["format", "config", "kind", "lineage", "created_with", "x"]),
                              st.one_of(_TEXT, st.none()), max_size=4),
       config_edit=st.none() | st.tuples(st.sampled_from(["8", "16", "10", "1", "2", "cosine", "true", "null"]),
                                         st.sampled_from(["0", "-1", "4", "99999", "null", "[]", '"x"', "1.5"])))
def test_fuzz_metadata_values(state: dict[str, torch.Tensor], tmp_path: Path, values: dict,
                              config_edit: tuple[str, str] | None) -> None:
    config = CONFIG.model_dump_json()
    if config_edit is not None:
        config = config.replace(config_edit[0], config_edit[1], 1)
    path = tmp_path / "fuzz.safetensors"
    safetensors.torch.save_file(state, str(path), metadata=_metadata(**{"config": config, **values}))
    _load_or_refuse(path)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**65) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3), max_leaves=8)


@_FUZZ
@given(header=st.dictionaries(st.sampled_from(["__metadata__", "w", "b"]), _JSON, max_size=3),
       data=st.binary(max_size=16))
def test_fuzz_header_structure(tmp_path: Path, header: dict, data: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_raw(header, data))
    _load_or_refuse(path)
    try:
        load_tensors(path)
    except CheckpointError as err:
        assert "\n" not in str(err)


# ------------------------------------------------------------------------------------------------ atomic writes


def _no_space(payload: dict, filename: str, metadata: dict | None = None) -> None:
    """A disk that fills up half-way through the write."""
    with open(filename, "wb") as handle:
        handle.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_write_keeps_previous_checkpoint(good: Path, state: dict[str, torch.Tensor], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(good.read_bytes())
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", _no_space)
        with pytest.raises(CheckpointError) as caught:
            save_checkpoint(path, state, CONFIG, kind="model", lineage=[])
    assert str(caught.value) == (f"could not write {path}: {os.strerror(errno.ENOSPC)}; "
                                 "the previous checkpoint is untouched")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert load_checkpoint(path).lineage == LINEAGE


def test_failed_first_write_leaves_nothing(state: dict[str, torch.Tensor], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    with pytest.raises(CheckpointError, match="no checkpoint was written"):
        save_checkpoint(tmp_path / "new.safetensors", state, CONFIG, kind="model", lineage=[])
    assert os.listdir(tmp_path) == []


def test_failed_fsync_keeps_previous_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_json_atomic(tmp_path / "state.json", {"step": 1})
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(CheckpointError, match="previous file is untouched"):
            write_json_atomic(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_overwrite_replaces_and_respects_umask(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, state, CONFIG, kind="model", lineage=[{"step": 1}])
    save_checkpoint(path, state, CONFIG, kind="model", lineage=[{"step": 2}])
    assert read_checkpoint_info(path).lineage == [{"step": 2}]
    assert os.listdir(tmp_path) == ["m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_of_ddpmctl_0_1_with_t_and_out_channels_in_the_model_loads(state: dict[str, torch.Tensor],
                                                                               tmp_path: Path) -> None:
    # 0.1 wrote the chain length and the output channels twice; agreeing copies are accepted and dropped.
    legacy = CONFIG.model_dump_json().replace('"model":{', '"model":{"out_channels":2,"num_timesteps":10,')
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(state, str(path), metadata=_metadata(config=legacy))
    ckpt = load_checkpoint(path)
    assert ckpt.config == CONFIG and ckpt.config.out_channels == 2
    assert read_checkpoint_info(path).config == CONFIG


def test_loading_builds_the_network_once_and_assigns_the_weights(good: Path, state: dict[str, torch.Tensor],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpmctl.unet import UNetModel

    built: list[int] = []
    original = UNetModel.__init__

    def counting(self: UNetModel, *args: object, **kwargs: object) -> None:
        built.append(1)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(UNetModel, "__init__", counting)
    ckpt = load_checkpoint(good)
    assert len(built) == 1
    tensors = list(ckpt.model.parameters()) + list(ckpt.model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert torch.equal(ckpt.model.freqs, build_model(CONFIG).freqs)  # the buffer no file holds has its values
    for name, tensor in ckpt.model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 9])
    with torch.no_grad():
        fresh = build_model(CONFIG)
        fresh.load_state_dict(state)
        fresh = fresh.eval().to(memory_format=torch.channels_last)  # the layout load_checkpoint gives
        assert torch.equal(ckpt.model(x, t), fresh(x, t))
