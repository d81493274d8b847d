"""ddpmctl.data: builtin:digits, image folders (conversions, sizes, labels) and hostile input."""

from __future__ import annotations

import io
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmctl.config import DataInfo
from ddpmctl.data import load_dataset
from ddpmctl.errors import DataError

# ----------------------------------------------------------------------------------------------- helpers


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _gray(size: tuple[int, int] = (8, 8), value: int = 100) -> Image.Image:
    return Image.new("L", size, value)


def _load(path: Path, **kwargs):
    warnings: list[str] = []
    ds = load_dataset(str(path), on_warning=warnings.append, **kwargs)
    return ds, warnings


def _raises_naming(path: Path, name: str, *, match: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(str(path), on_warning=lambda m: None, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert name in message
    assert match in message, message
    return message


# ----------------------------------------------------------------------------------------------- builtin:digits


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("ddpmctl").joinpath("assets", "digits.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as npz:
            return np.array(npz["images"]), np.array(npz["labels"])


def test_digits_asset_is_the_scikit_learn_set() -> None:
    images, labels = _raw_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    # The known first rows of sklearn's load_digits(): target 0,1,2,...,9 and image 0's top rows.
    assert labels[:10].tolist() == list(range(10))
    assert images[0, 0].tolist() == [round(v * 255 / 16) for v in (0, 0, 5, 13, 9, 1, 0, 0)]
    assert images[0, 1].tolist() == [round(v * 255 / 16) for v in (0, 0, 13, 15, 10, 15, 5, 0)]
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert set(np.unique(images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert images.min() == 0 and images.max() == 255
    assert (resources.files("ddpmctl") / "assets" / "DIGITS_LICENSE.txt").is_file()


def test_digits_split() -> None:
    images, labels = _raw_digits()
    train = load_dataset("builtin:digits", class_cond=True)
    test = load_dataset("builtin:digits", split="test", class_cond=True)
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    idx = np.arange(1797)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), images[idx % 5 == 0])
    np.testing.assert_array_equal(train.images[:, 0].numpy(), images[idx % 5 != 0])
    np.testing.assert_array_equal(test.labels.numpy(), labels[idx % 5 == 0])
    np.testing.assert_array_equal(train.labels.numpy(), labels[idx % 5 != 0])
    assert train.class_names == tuple("0123456789") and train.num_classes == 10
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    assert train.info() == DataInfo(
        source="builtin:digits", image_size=8, channels=1, num_images=1437, class_names=tuple("0123456789")
    )


def test_digits_options() -> None:
    plain = load_dataset("builtin:digits")
    assert plain.labels is None and plain.class_names is None and plain.num_classes is None
    warnings: list[str] = []
    big = load_dataset("builtin:digits", image_size=16, color="rgb", on_warning=warnings.append)
    assert big.images.shape == (1437, 3, 16, 16)
    assert torch.equal(big.images[:, 0], big.images[:, 2])
    # Bicubic 8 -> 16 exactly as Pillow does it on image 1 (the first train image).
    expected = Image.fromarray(_raw_digits()[0][1]).resize((16, 16), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(big.images[0, 0].numpy(), np.asarray(expected))
    assert len(warnings) == 1 and "upscaled" in warnings[0]
    small = load_dataset("builtin:digits", image_size=4)
    assert small.images.shape == (1437, 1, 4, 4)


def test_unknown_builtin_lists_available() -> None:
    with pytest.raises(DataError, match="builtin:digits") as info:
        load_dataset("builtin:cifar")
    assert "builtin:cifar" in str(info.value)


# ----------------------------------------------------------------------------------------------- conversions


def test_sixteen_bit_png_scales_to_eight_bits(tmp_path) -> None:
    values = np.array([0, 128, 129, 257, 385, 32767, 32768, 65535], dtype=np.uint16)
    arr = np.tile(values, (8, 1))
    _save(tmp_path / "d" / "deep.png", Image.fromarray(arr))
    with Image.open(tmp_path / "d" / "deep.png") as check:
        assert check.mode in ("I;16", "I")  # it really is a 16-bit file
    ds, _ = _load(tmp_path / "d")
    assert ds.channels == 1 and ds.image_size == 8
    expected = [int(v * 255 / 65535 + 0.5) for v in values.tolist()]  # never a tie: v/257 != k + 1/2
    assert expected == [0, 0, 1, 1, 1, 127, 128, 255]
    assert ds.images[0, 0, 0].tolist() == expected


def test_palette_alpha_and_transparency_composite_on_white(tmp_path) -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (4, 0, 8, 8))  # right half index 1 (blue); index 0 (red) is transparent
    _save(tmp_path / "d" / "a_palette.png", pal, transparency=0)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.paste((0, 255, 0, 255), (0, 0, 8, 4))  # opaque green top half
    rgba.putpixel((0, 7), (0, 0, 0, 128))  # half-transparent black -> mid gray
    _save(tmp_path / "d" / "b_rgba.png", rgba)
    ds, _ = _load(tmp_path / "d")
    assert ds.channels == 3
    p, r = ds.images[0], ds.images[1]
    assert p[:, 0, 0].tolist() == [255, 255, 255] and p[:, 0, 7].tolist() == [0, 0, 255]
    assert r[:, 0, 0].tolist() == [0, 255, 0] and r[:, 7, 7].tolist() == [255, 255, 255]
    assert all(abs(v - 255 * 127 / 255) <= 1 for v in r[:, 7, 0].tolist())


def test_gray_modes_give_one_channel(tmp_path) -> None:
    folder = tmp_path / "g"
    _save(folder / "a_l.png", _gray(value=30))
    la = Image.new("LA", (8, 8), (40, 255))
    la.putpixel((0, 0), (40, 0))  # transparent -> white
    _save(folder / "b_la.png", la)
    _save(folder / "c_gray.jpg", _gray(value=128), quality=100)
    _save(folder / "d_one.bmp", Image.new("1", (8, 8), 1))
    gif = Image.new("L", (8, 8), 60).convert("P")  # palette of grays
    _save(folder / "e_gray.GIF", gif)
    _save(folder / "f_16.png", Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)))
    ds, _ = _load(folder)
    assert ds.images.shape == (6, 1, 8, 8)
    assert ds.images[0].unique().tolist() == [30]
    assert ds.images[1, 0, 0, 0] == 255 and ds.images[1, 0, 0, 1] == 40
    assert abs(int(ds.images[2, 0, 4, 4]) - 128) <= 1
    assert ds.images[3].unique().tolist() == [255]
    assert ds.images[4].unique().tolist() == [60]
    assert ds.images[5].unique().tolist() == [255]
    # One colour image anywhere -> 3 channels for all; forcing gray brings 1 back.
    _save(folder / "z_rgb.png", Image.new("RGB", (8, 8), (200, 10, 10)))
    assert _load(folder)[0].images.shape == (7, 3, 8, 8)
    forced, _ = _load(folder, color="gray")
    assert forced.channels == 1 and forced.images[0].unique().tolist() == [30]
    assert _load(tmp_path / "g", color="rgb")[0].images.shape == (7, 3, 8, 8)


def test_cmyk_jpeg_gif_first_frame_and_exif_orientation(tmp_path) -> None:
    folder = tmp_path / "c"
    _save(folder / "a_cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)  # red
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    _save(folder / "b_anim.gif", frames[0], save_all=True, append_images=frames[1:])
    marked = Image.new("RGB", (8, 8), (0, 0, 0))
    marked.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotate 180
    _save(folder / "c_exif.png", marked, exif=exif)
    ds, _ = _load(folder)
    assert ds.images.shape == (3, 3, 8, 8)
    cmyk = ds.images[0, :, 4, 4].tolist()
    assert cmyk[0] >= 245 and cmyk[1] <= 10 and cmyk[2] <= 10
    assert ds.images[1, :, 4, 4].tolist() == [255, 0, 0]
    assert ds.images[2, :, 7, 7].tolist() == [255, 255, 255] and ds.images[2, :, 0, 0].tolist() == [0, 0, 0]


def test_resize_and_center_crop_like_the_reference(tmp_path) -> None:
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    _save(tmp_path / "r" / "wide.png", wide)
    ds, warnings = _load(tmp_path / "r", image_size=16)
    # Independent: one BOX halving (32 >= 2*16) to 32x16, no bicubic needed, center crop columns 8..24.
    expected = wide.resize((32, 16), Image.Resampling.BOX).crop((8, 0, 24, 16))
    np.testing.assert_array_equal(ds.images[0].permute(1, 2, 0).numpy(), np.asarray(expected))
    assert warnings == []
    odd, _ = _load(tmp_path / "r", image_size=12)
    # 32 >= 2*12: one BOX halving to 32x16; bicubic short side 16 -> 12 gives 24x12; crop columns 6..18.
    halved = wide.resize((32, 16), Image.Resampling.BOX)
    expected = halved.resize((24, 12), Image.Resampling.BICUBIC).crop((6, 0, 18, 12))
    np.testing.assert_array_equal(odd.images[0].permute(1, 2, 0).numpy(), np.asarray(expected))


def test_mixed_sizes_auto_size_and_upscale_warned_once(tmp_path) -> None:
    folder = tmp_path / "m"
    _save(folder / "a.png", Image.new("RGB", (32, 16), (1, 2, 3)))
    _save(folder / "b.jpg", Image.new("RGB", (20, 20), (90, 90, 90)))
    _save(folder / "sub" / "c.webp", Image.new("RGB", (40, 24), (5, 5, 5)), lossless=True)
    ds, warnings = _load(folder)
    assert ds.images.shape == (3, 3, 16, 16)
    assert len(warnings) == 1 and "16x16" in warnings[0]
    ds, warnings = _load(folder, image_size=24)
    assert ds.images.shape == (3, 3, 24, 24)
    assert len(warnings) == 1 and "2 images" in warnings[0] and "upscaled" in warnings[0]
    same = tmp_path / "same"
    for name in ("x.png", "y.png"):
        _save(same / name, Image.new("RGB", (12, 12)))
    ds, warnings = _load(same)
    assert ds.image_size == 12 and warnings == []


def test_order_is_sorted_by_relative_path_and_case_insensitive_extensions(tmp_path) -> None:
    folder = tmp_path / "o"
    for value, rel in [(3, "b/a.PNG"), (1, "a.png"), (2, "a/z.JpEg"), (4, "c.Bmp")]:
        _save(folder / rel, _gray(value=value), **({"quality": 100} if "peg" in rel.lower() else {}))
    (folder / "notes.txt").write_text("x")
    (folder / ".hidden.png").write_bytes(b"not an image")  # hidden files are ignored
    ds, _ = _load(folder)
    # Sorted by path components: folder "a" (a/z.JpEg) before file "a.png", then b/a.PNG, c.Bmp.
    assert [int(round(v)) for v in ds.images[:, 0, 0, 0].float().tolist()] == [2, 1, 3, 4]


def test_class_labels_from_first_level_folders(tmp_path) -> None:
    folder = tmp_path / "cls"
    _save(folder / "dog" / "1.png", _gray(value=1))
    _save(folder / "cat" / "deep" / "er" / "2.png", _gray(value=2))
    _save(folder / "cat" / "3.png", _gray(value=3))
    ds, _ = _load(folder, class_cond=True)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    # sorted by path: cat/3.png, cat/deep/er/2.png, dog/1.png
    assert ds.images[:, 0, 0, 0].tolist() == [3, 2, 1]
    assert ds.labels.tolist() == [0, 0, 1] and ds.labels.dtype == torch.int64
    assert _load(folder)[0].labels is None
    _save(folder / "loose.png", _gray())
    _raises_naming(folder, "loose.png", match="class sub-folder", class_cond=True)


def test_single_class_is_an_error(tmp_path) -> None:
    _save(tmp_path / "one" / "only" / "a.png", _gray())
    _raises_naming(tmp_path / "one", "one", match="at least 2", class_cond=True)


# ----------------------------------------------------------------------------------------------- hostile input


def test_missing_file_empty_and_non_image_folders(tmp_path) -> None:
    _raises_naming(tmp_path / "nope", "nope", match="does not exist")
    _save(tmp_path / "x.png", _gray())
    _raises_naming(tmp_path / "x.png", "x.png", match="is a file, not a folder")
    (tmp_path / "empty").mkdir()
    _raises_naming(tmp_path / "empty", "empty", match="is empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a")
    (tmp_path / "docs" / "b.tiff").write_bytes(b"II*\x00")
    msg = _raises_naming(tmp_path / "docs", "docs", match="has no image files")
    assert ".png" in msg and "2 other files ignored" in msg


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name,payload,match",
    [
        ("zero.png", b"", "empty file"),
        ("trunc.png", _truncated_png(), "truncated"),
        ("random.png", np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes(), "not a readable PNG"),
        ("eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not a readable PNG"),
    ],
)
def test_bad_image_names_the_file(tmp_path, name: str, payload: bytes, match: str) -> None:
    _save(tmp_path / "d" / "good.png", _gray())
    (tmp_path / "d" / name).write_bytes(payload)
    _raises_naming(tmp_path / "d", name, match=match)


def test_skip_bad_images_skips_and_counts(tmp_path) -> None:
    folder = tmp_path / "d"
    _save(folder / "a.png", _gray(value=1))
    (folder / "b.png").write_bytes(b"")
    (folder / "c.png").write_bytes(_truncated_png())
    _save(folder / "d.png", _gray(value=4))
    ds, warnings = _load(folder, skip_bad_images=True, image_size=8)
    assert ds.images[:, 0, 0, 0].tolist() == [1, 4]
    assert [os.path.basename(p) for p in ds.skipped] == ["b.png", "c.png"]
    assert len(warnings) == 1 and "skipped 2" in warnings[0] and "b.png" in warnings[0]
    for good in ("a.png", "d.png"):
        (folder / good).unlink()
    _raises_naming(folder, "b.png", match="no readable images", skip_bad_images=True, image_size=8)


def test_skip_keeps_labels_aligned(tmp_path) -> None:
    folder = tmp_path / "cls"
    _save(folder / "a" / "1.png", _gray(value=1))
    (folder / "a" / "2.png").write_bytes(b"junk")
    _save(folder / "b" / "3.png", _gray(value=3))
    ds, _ = _load(folder, class_cond=True, skip_bad_images=True)
    assert ds.images[:, 0, 0, 0].tolist() == [1, 3] and ds.labels.tolist() == [0, 1]


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch) -> None:
    _save(tmp_path / "d" / "bomb.png", _gray((16, 16)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 px: over the limit -> Pillow's warning
    _raises_naming(tmp_path / "d", "bomb.png", match="decompression-bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over twice the limit -> Pillow's error
    _raises_naming(tmp_path / "d", "bomb.png", match="decompression-bomb")
    _save(tmp_path / "d" / "ok.png", _gray((8, 8)))
    ds, warnings = _load(tmp_path / "d", skip_bad_images=True)
    assert len(ds) == 1 and len(warnings) == 1


def test_symlink_loops_end(tmp_path) -> None:
    folder = tmp_path / "loop"
    _save(folder / "a.png", _gray(value=7))
    _save(folder / "sub" / "b.png", _gray(value=8))
    try:
        os.symlink("..", folder / "sub" / "up")
        os.symlink(folder / "sub", folder / "again")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    ds, _ = _load(folder)
    assert ds.images[:, 0, 0, 0].tolist() == [7, 8]  # each real folder read once
    os.symlink("self.png", folder / "self.png")  # a file symlink loop (ELOOP)
    _raises_naming(folder, "self.png", match="cannot")


def test_fifo_is_not_read(tmp_path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    _save(tmp_path / "d" / "a.png", _gray())
    os.mkfifo(tmp_path / "d" / "pipe.png")  # opening it would block forever
    _raises_naming(tmp_path / "d", "pipe.png", match="not a regular file")


def test_non_utf8_file_names(tmp_path) -> None:
    root = os.fsencode(tmp_path / "u")
    os.makedirs(os.path.join(root, b"cl\xe9"))
    os.makedirs(os.path.join(root, b"ok"))
    try:
        good = os.path.join(root, b"cl\xe9", b"im\xff.png")
        with open(good, "wb") as f:
            _gray(value=9).save(f, format="PNG")
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    with open(os.path.join(root, b"ok", b"x.png"), "wb") as f:
        _gray(value=5).save(f, format="PNG")
    ds, _ = _load(tmp_path / "u", class_cond=True)
    assert ds.images[:, 0, 0, 0].tolist() == [9, 5]
    assert ds.class_names == ("cl\\xe9", "ok")
    ds.info().model_dump_json()  # class names are valid UTF-8
    with open(os.path.join(root, b"ok", b"bad\xfe.png"), "wb") as f:
        f.write(b"garbage")
    msg = _raises_naming(tmp_path / "u", "bad\\xfe.png", match="not a readable PNG")
    msg.encode("utf-8")  # printable anywhere
