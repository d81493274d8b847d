"""ddpmctl.images: the 8-bit grid, PNG/grid/npz files, atomic writes."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmctl import images
from ddpmctl.images import make_grid, model_to_uint8, save_grid, save_npz, save_png, uint8_to_model


def test_uint8_model_round_trip_is_exact_for_every_value() -> None:
    x = torch.arange(256, dtype=torch.uint8)
    m = uint8_to_model(x)
    assert m.dtype == torch.float32
    assert m[0].item() == -1.0 and m[255].item() == 1.0
    # Independent: the float32 grid x/127.5 - 1 computed by numpy.
    expected = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_array_equal(m.numpy(), expected)
    assert torch.equal(model_to_uint8(m), x)


def test_model_to_uint8_rounds_and_clamps() -> None:
    x = torch.tensor([-5.0, -1.0, 1.0, 7.0, float("nan"), float("inf"), -float("inf"), 1 / 127.5 - 1])
    # 1/127.5 - 1 is pixel 1; NaN -> 0 by design; +-inf clamp to the ends.
    assert model_to_uint8(x).tolist() == [0, 0, 255, 255, 0, 255, 0, 1]
    # half a grid step below pixel 10 still rounds to 10; beyond half goes to 9.
    near = torch.tensor([10.4 / 127.5 - 1, 9.4 / 127.5 - 1], dtype=torch.float64)
    assert model_to_uint8(near).tolist() == [10, 9]


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_png_round_trip(tmp_path, channels: int, mode: str) -> None:
    img = torch.randint(0, 256, (channels, 5, 7), dtype=torch.uint8)
    path = save_png(tmp_path / "sub" / "x.png", img)
    with Image.open(path) as pil:
        assert pil.mode == mode and pil.size == (7, 5)
        arr = np.asarray(pil)
    expected = img.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(arr.reshape(expected.shape), expected)
    assert sorted(os.listdir(tmp_path / "sub")) == ["x.png"]  # no temporary left behind


def test_save_png_rejects_wrong_input(tmp_path) -> None:
    with pytest.raises(TypeError):
        save_png(tmp_path / "x.png", torch.zeros(3, 4, 4))
    with pytest.raises(ValueError):
        save_png(tmp_path / "x.png", torch.zeros(2, 4, 4, dtype=torch.uint8))


def test_failed_write_keeps_previous_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x.png"
    save_png(path, torch.zeros(1, 4, 4, dtype=torch.uint8))
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "replace", boom)
    with pytest.raises(OSError):
        save_png(path, torch.full((1, 4, 4), 255, dtype=torch.uint8))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.png"]


def test_make_grid_layout() -> None:
    n, h, w = 5, 4, 6
    batch = torch.stack([torch.full((3, h, w), 10 * (i + 1), dtype=torch.uint8) for i in range(n)])
    grid = make_grid(batch)  # default nrow = ceil(sqrt(5)) = 3 -> 2 rows
    pad = 2
    assert grid.shape == (3, 2 * (h + pad) + pad, 3 * (w + pad) + pad)
    for i in range(n):
        top, left = (i // 3) * (h + pad) + pad, (i % 3) * (w + pad) + pad
        assert torch.equal(grid[:, top : top + h, left : left + w], batch[i])
    # Everything outside the cells is padding (0): total mass equals the images' mass.
    assert grid.to(torch.int64).sum() == batch.to(torch.int64).sum()
    assert make_grid(batch, nrow=5, padding=0).shape == (3, h, 5 * w)
    assert make_grid(batch[:1, :1]).shape == (1, h + 2 * pad, w + 2 * pad)


def test_save_grid_writes_png(tmp_path) -> None:
    batch = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    path = save_grid(tmp_path / "grid.png", batch, nrow=2)
    with Image.open(path) as pil:
        assert pil.mode == "L" and pil.size == (2 * 10 + 2, 2 * 10 + 2)
        np.testing.assert_array_equal(np.asarray(pil), make_grid(batch, nrow=2)[0].numpy())


def test_save_npz_layout(tmp_path) -> None:
    batch = torch.randint(0, 256, (3, 3, 4, 5), dtype=torch.uint8)
    labels = torch.tensor([2, 0, 1])
    path = save_npz(tmp_path / "s.npz", batch, labels)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"arr_0", "arr_1"}  # the images once, in the reference's layout, then the labels
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (3, 4, 5, 3)
        np.testing.assert_array_equal(npz["arr_0"], batch.permute(0, 2, 3, 1).numpy())
        assert npz["arr_1"].dtype == np.int64 and npz["arr_1"].tolist() == [2, 0, 1]
    path = save_npz(tmp_path / "g.npz", batch[:, :1])
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {"arr_0"} and npz["arr_0"].shape == (3, 4, 5, 1)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask: int) -> None:
    batch = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    old = os.umask(umask)
    try:
        paths = [save_png(tmp_path / "a.png", batch[0]), save_grid(tmp_path / "g.png", batch),
                 save_npz(tmp_path / "s.npz", batch)]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
