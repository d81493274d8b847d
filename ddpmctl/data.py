"""Datasets: image folders and the built-in ``builtin:digits``, decoded once into one uint8 tensor in memory.

Preprocessing follows improved-diffusion's ``image_datasets.py``: halve with a BOX filter while the short side is at
least twice the target, BICUBIC-resize the short side to the target, center-crop a square. Random flips are not done
here (train.py flips per batch with its own generator).

Folder rules (documented behaviour, relied on by the CLI and tests):
- Recursive; extensions .png .jpg .jpeg .webp .bmp .gif (case-insensitive; GIF: first frame); names starting with
  "." (hidden files and folders, e.g. macOS ``._x.png``) are ignored. Files are sorted by relative path.
- Only the PNG, JPEG, WebP, BMP and GIF decoders are ever used, whatever a file's name claims.
- Symlinks to folders are followed, but each real folder is read once, so symlink loops end.
- Conversion: EXIF orientation applied; alpha, and palette/gray/RGB images with a transparent colour, are composited
  on white; CMYK -> RGB; 16-bit grayscale scaled to 8 bits with round(v * 255 / 65535).
- ``color="auto"``: 1 channel when every image is grayscale (modes 1, L, LA, I, I;16, or a palette of grays),
  else 3 (RGB).
- ``image_size=None``: the images' own size when all are the same square size, else the smallest short side.
- ``class_cond``: the label is the first-level sub-folder (class names sorted -> 0..K-1); at least 2 classes
  are required, and every image must be inside a class sub-folder.
- ``split`` only applies to built-in datasets; a folder is always used whole (point eval at a separate folder).
- Labels (and class names) are returned only when ``class_cond`` is true, for folders and built-ins alike.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import NoReturn

import numpy as np
import torch
from PIL import Image, ImageOps

from ddpmctl.choices import ColorMode, Split
from ddpmctl.config import DataInfo, ModelConfig
from ddpmctl.errors import ConfigError, DataError

__all__ = ["BUILTIN_DATASETS", "IMAGE_EXTENSIONS", "ImageDataset", "load_dataset", "load_dataset_for"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# The only decoders Pillow may use (JPEG includes camera multi-picture files). Restricting them keeps exotic or
# external-tool decoders (EPS -> Ghostscript, ...) away from untrusted files.
_PIL_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# builtin:digits: test = every 5th image (index % 5 == 0), train = the rest; see assets/DIGITS_LICENSE.txt.
DIGITS_TEST_EVERY = 5
BUILTIN_DATASETS: dict[str, str] = {
    "digits": "1,797 8x8 grayscale handwritten digits (UCI/scikit-learn), labels 0-9; "
    "test = index % 5 == 0 (360), train = the rest (1,437)",
}

Color = ColorMode


@dataclass
class ImageDataset:
    """A whole dataset in memory: uint8 images [N, C, H, W] (H == W), optional int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: tuple[str, ...] | None
    source: str
    skipped: list[str] = field(default_factory=list)
    # What loading changed to reach the requested size and channels ("16x16 resized to 8x8", "RGB to grayscale").
    conversions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def info(self) -> DataInfo:
        """What this dataset is, for a checkpoint's ``config.data``."""
        return DataInfo(
            source=_show(self.source),
            image_size=self.image_size,
            channels=self.channels,
            num_images=len(self),
            class_names=self.class_names,
        )


class _BadImage(Exception):
    """One file cannot be used; ``reason`` is a short, printable explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _show(path: str | os.PathLike[str] | bytes) -> str:
    """A path as one printable line of valid UTF-8: undecodable bytes and control characters are escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _one_line(text: str) -> str:
    """Exception text squeezed to one printable line (Pillow messages may quote paths or span lines)."""
    return _show(" ".join(str(text).split()))


def load_dataset(
    source: str,
    *,
    image_size: int | None = None,
    color: Color = "auto",
    class_cond: bool = False,
    split: Split = "train",
    skip_bad_images: bool = False,
    on_warning: Callable[[str], None] | None = None,
    fit_size: Callable[[int], int] | None = None,
) -> ImageDataset:
    """Load an image folder or ``builtin:NAME`` into memory, preprocessed to image_size x image_size uint8.

    Without ``image_size`` a folder's images keep their own size (the smallest short side when they differ), made
    to fit by ``fit_size`` (e.g. the largest size the network can halve: :func:`ddpmctl.config.halvable_size`).

    Raises DataError (one line naming the path) for anything unusable; see the module docstring for the rules.
    ``on_warning`` receives one-line notes (upscaling, skipped files, auto-chosen size); by default they go to
    :func:`warnings.warn`.
    """
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if color not in ("auto", "rgb", "gray"):
        raise ConfigError(f"color must be auto, rgb or gray, got {color!r}")
    if split not in ("train", "test"):
        raise ConfigError(f"split must be train or test, got {split!r}")
    warn = on_warning if on_warning is not None else _default_warning
    source = os.fspath(source)
    if isinstance(source, bytes):
        source = os.fsdecode(source)
    if source.startswith("builtin:"):
        return _load_builtin(source, image_size, color, class_cond, split, warn)
    return _load_folder(source, image_size, color, class_cond, skip_bad_images, warn, fit_size)


def load_dataset_for(model: ModelConfig, source: str, *, split: Split = "train",
                     on_warning: Callable[[str], None] | None = None, convert: bool = True) -> ImageDataset:
    """``source`` as the network ``model`` takes it (its size; gray for 1 channel, RGB for 3; labels when it is
    class-conditional). DataError when the images or classes cannot fit the network.

    Images of another size or color are converted and ``on_warning`` says how; with ``convert`` False they are
    refused instead (bits/dim of converted images is the likelihood of other images than the ones given)."""
    if model.in_channels not in (1, 3):
        raise DataError(f"the model takes {model.in_channels}-channel images; datasets are 1 or 3 channels")
    dataset = load_dataset(source, image_size=model.image_size, color="gray" if model.in_channels == 1 else "rgb",
                           class_cond=model.num_classes is not None, split=split, on_warning=on_warning)
    if dataset.channels != model.in_channels or dataset.image_size != model.image_size:
        raise DataError(f"{source} gives {dataset.channels}-channel {dataset.image_size}px images but the model takes "
                        f"{model.in_channels}-channel {model.image_size}px")
    if dataset.conversions:
        what = "; ".join(dataset.conversions)
        if not convert:
            raise DataError(f"{_show(source)} does not fit the model, which takes {model.in_channels}-channel "
                            f"{model.image_size}x{model.image_size} images ({what} would be needed): pass --resize "
                            "to convert them")
        (on_warning or _default_warning)(f"{_show(source)} converted to fit the model: {what}")
    if model.num_classes is not None and dataset.num_classes != model.num_classes:
        raise DataError(f"the model is conditioned on {model.num_classes} classes but {source} has "
                        f"{dataset.num_classes or 'no class labels'}")
    return dataset


def _default_warning(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------------- preprocessing


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """improved-diffusion's preprocessing: BOX-halve while short side >= 2*size, BICUBIC to short side, center crop."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    # max(size, ...) guards the long side against rounding below the target for extreme aspect ratios.
    new_size = (max(size, round(img.width * scale)), max(size, round(img.height * scale)))
    if new_size != img.size:
        img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    left = (img.width - size) // 2
    top = (img.height - size) // 2
    if img.size != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def _int_to_gray8(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) grayscale -> 8-bit L with round(v * 255 / 65535); a transparent value becomes white."""
    values = np.asarray(img).astype(np.int64)
    # v*255/65535 = v/257 is never exactly k + 1/2 for integer v, so floor(+32767) rounds to nearest.
    gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):
        gray[values == transparent] = 255
    return Image.fromarray(gray, mode="L")


def _has_transparency(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info


def _palette_is_gray(img: Image.Image) -> bool:
    palette = img.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette[: len(palette) // 3 * 3], dtype=np.int64).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def _is_gray(img: Image.Image) -> bool:
    """Whether an opened (header-only) image is grayscale by its mode or a palette of grays."""
    if img.mode in _GRAY_MODES:
        return True
    return img.mode in ("P", "PA") and _palette_is_gray(img)


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Any decoded image -> mode L (channels 1) or RGB (channels 3), transparency composited on white."""
    if img.mode in _INT_MODES:
        gray = _int_to_gray8(img)
        return gray if channels == 1 else gray.convert("RGB")
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba).convert("RGB")
    elif img.mode in ("1", "L") and channels == 1:
        return img.convert("L")
    else:
        # Pillow's converters handle CMYK (incl. Adobe-inverted JPEG), YCbCr and palettes.
        flat = img.convert("RGB")
    return flat.convert("L") if channels == 1 else flat


# --------------------------------------------------------------------------------------------------- built-ins


def _load_builtin(
    source: str, image_size: int | None, color: Color, class_cond: bool, split: Split, warn: Callable[[str], None]
) -> ImageDataset:
    name = source[len("builtin:") :].strip().lower()
    if name not in BUILTIN_DATASETS:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS)
        raise DataError(f"unknown built-in dataset {_show(source)!r}: available: {known}")
    images, labels = _read_digits()
    index = np.arange(len(images))
    keep = index % DIGITS_TEST_EVERY == 0 if split == "test" else index % DIGITS_TEST_EVERY != 0
    images, labels = images[keep], labels[keep]
    native = images.shape[-1]
    size = native if image_size is None else int(image_size)
    if size != native:
        if size > native:
            warn(f"builtin:{name} images are {native}x{native}: upscaled to {size}x{size} (bicubic)")
        images = np.stack([np.asarray(_resize_center_crop(Image.fromarray(a, mode="L"), size)) for a in images])
    tensor = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    if color == "rgb":
        tensor = tensor.expand(-1, 3, -1, -1).contiguous()
    conversions = [f"{native}x{native} resized to {size}x{size}"] if size != native else []
    conversions += ["grayscale to RGB"] if color == "rgb" else []
    return ImageDataset(
        images=tensor,
        labels=torch.from_numpy(labels.astype(np.int64)) if class_cond else None,
        class_names=tuple(str(k) for k in range(10)) if class_cond else None,
        source=f"builtin:{name}",
        conversions=conversions,
    )


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The packaged digits: uint8 images [1797, 8, 8] (0..255) and uint8 labels [1797] (never unpickled)."""
    asset = resources.files("ddpmctl").joinpath("assets", "digits.npz")
    try:
        with asset.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            images, labels = np.array(npz["images"]), np.array(npz["labels"])
    except (OSError, KeyError, ValueError) as err:
        raise DataError(
            f"the packaged digits dataset is missing or damaged ({_one_line(err)}): reinstall ddpmctl"
        ) from None
    if images.shape != (1797, 8, 8) or images.dtype != np.uint8 or labels.shape != (1797,):
        raise DataError("the packaged digits dataset has an unexpected layout: reinstall ddpmctl")
    return images, labels


# --------------------------------------------------------------------------------------------------- folders


def _list_folder(root: str) -> tuple[list[str], int]:
    """Relative paths of candidate image files under ``root`` (sorted) and the number of other files ignored."""

    def fail(err: OSError) -> None:
        where = err.filename if err.filename is not None else root
        raise DataError(f"cannot read folder {_show(where)}: {_one_line(err.strerror or err)}")

    found: list[tuple[tuple[str, ...], str]] = []
    ignored = 0
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as err:
            fail(err)
        # A folder reached twice (symlink loop or two links to one folder) is read only the first time.
        if (st.st_dev, st.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append((tuple(rel.split(os.sep)), rel))
            else:
                ignored += 1
    found.sort()
    return [rel for _, rel in found], ignored


def _open(path: str) -> Image.Image:
    """Open an image header with only the allowed decoders; a decompression-bomb warning counts as an error."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _BadImage("not a regular file")
    if st.st_size == 0:
        raise _BadImage("empty file (0 bytes)")
    return Image.open(path, formats=_PIL_FORMATS)


def _guarded(action: Callable[[], object]) -> object:
    """Run one Pillow action on an untrusted file; every failure becomes a _BadImage with a readable reason."""
    with warnings.catch_warnings():
        # Pillow's other warnings (e.g. about palette transparency) concern conversions done properly here.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return action()
        except _BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _BadImage(
                f"too many pixels: over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
            ) from None
        except Image.UnidentifiedImageError:
            raise _BadImage("not a readable PNG, JPEG, WebP, BMP or GIF image (unknown format or damaged)") from None
        except FileNotFoundError:
            raise _BadImage("cannot open (missing, or a dangling symlink)") from None
        except OSError as err:
            if err.errno is not None:  # the file system refused (permissions, ELOOP, ...)
                raise _BadImage(f"cannot open ({_one_line(err.strerror or err)})") from None
            raise _BadImage(f"truncated or corrupt image ({_one_line(err)})") from None
        except Exception as err:  # noqa: BLE001 - hostile files make Pillow raise anything (SyntaxError, ...)
            raise _BadImage(f"corrupt image ({type(err).__name__}: {_one_line(err)})") from None


def _probe(path: str) -> tuple[int, int, bool]:
    """Width, height (before EXIF rotation; the short side is the same) and grayscale-ness, from the header."""

    def read() -> tuple[int, int, bool]:
        with _open(path) as img:
            return img.width, img.height, _is_gray(img)

    return _guarded(read)  # type: ignore[return-value]


def _decode(path: str, channels: int, size: int) -> np.ndarray:
    """Decode, orient, convert and resize one file -> uint8 [size, size, channels]."""

    def read() -> np.ndarray:
        with _open(path) as img:
            img.load()  # truncated/corrupt pixel data fails here
            oriented = ImageOps.exif_transpose(img)
            out = _resize_center_crop(_to_channels(oriented, channels), size)
        arr = np.asarray(out, dtype=np.uint8)
        return arr.reshape(size, size, channels)

    return _guarded(read)  # type: ignore[return-value]


def _class_labels(root: str, rel_paths: Sequence[str]) -> tuple[list[int], tuple[str, ...]]:
    """Labels from first-level sub-folder names, sorted -> 0..K-1; every image must be in one; K >= 2."""
    firsts: list[str] = []
    for rel in rel_paths:
        parts = rel.split(os.sep)
        if len(parts) < 2:
            raise DataError(
                f"{_show(os.path.join(root, rel))} is not in a class sub-folder: with class_cond every image must "
                f"be in {_show(root)}/<class>/"
            )
        firsts.append(parts[0])
    names = sorted(set(firsts))
    if len(names) < 2:
        raise DataError(
            f"class_cond needs at least 2 class sub-folders in {_show(root)}, found {len(names)} "
            f"({', '.join(_show(n) for n in names)})"
        )
    index = {name: k for k, name in enumerate(names)}
    return [index[f] for f in firsts], tuple(_show(n) for n in names)


def _raise_all_bad(root: str, count: int, first: str) -> NoReturn:
    raise DataError(f"{_show(root)} has no readable images: all {count} image files are bad (first: {first})")


def _image_files(root: str) -> list[str]:
    """The image files under the folder ``root`` (relative paths); DataError when there is no such folder or no
    image in it."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise DataError(f"{_show(root)} does not exist") from None
    except OSError as err:
        raise DataError(f"cannot read {_show(root)}: {_one_line(err.strerror or err)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{_show(root)} is a file, not a folder: expected a folder of images or builtin:NAME")
    rel_paths, ignored = _list_folder(root)
    if not rel_paths:
        if ignored == 0:
            raise DataError(f"{_show(root)} is empty: no image files found")
        raise DataError(
            f"{_show(root)} has no image files (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            f"{ignored} other file{'s' if ignored != 1 else ''} ignored"
        )
    return rel_paths


def _choose_size(root: str, probed: list[tuple[int, tuple[int, int, bool]]], image_size: int | None,
                 warn: Callable[[str], None], fit_size: Callable[[int], int] | None = None) -> int:
    """``image_size``, or else the smallest short side of the probed (width, height, gray) headers, lowered to the
    largest size ``fit_size`` accepts."""
    if image_size is not None:
        return int(image_size)
    sizes = {(w, h) for _, (w, h, _g) in probed}
    smallest = min(min(w, h) for _, (w, h, _g) in probed)
    size = fit_size(smallest) if fit_size is not None else smallest
    mixed = not (len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1])
    if mixed or size != smallest:
        what = "have different sizes or are not square" if mixed else f"are {smallest}x{smallest}"
        why = "the smallest short side" if size == smallest else (
            f"the largest size at or below the smallest short side, {smallest}, that the network can halve")
        warn(f"images in {_show(root)} {what}: using {size}x{size} ({why}); set the image size to choose another")
    return size


def _load_folder(
    root: str, image_size: int | None, color: Color, class_cond: bool, skip_bad: bool, warn: Callable[[str], None],
    fit_size: Callable[[int], int] | None = None,
) -> ImageDataset:
    rel_paths = _image_files(root)
    labels_all, class_names = _class_labels(root, rel_paths) if class_cond else (None, None)

    skipped: list[str] = []
    first_reason: list[str] = []

    def bad(rel: str, err: _BadImage) -> None:
        shown = _show(os.path.join(root, rel))
        if not skip_bad:
            raise DataError(f"{shown}: {err.reason} (--skip-bad-images skips bad files)")
        skipped.append(shown)
        if not first_reason:
            first_reason.append(f"{shown}: {err.reason}")

    # Pass 1: headers only (size, grayscale) to choose the size and channels before decoding pixels.
    probed: list[tuple[int, tuple[int, int, bool]]] = []
    for i, rel in enumerate(rel_paths):
        try:
            probed.append((i, _probe(os.path.join(root, rel))))
        except _BadImage as err:
            bad(rel, err)
    if not probed:
        _raise_all_bad(root, len(rel_paths), first_reason[0])

    size = _choose_size(root, probed, image_size, warn, fit_size)
    channels = {"gray": 1, "rgb": 3}.get(color) or (1 if all(g for _, (_w, _h, g) in probed) else 3)

    # Pass 2: decode, convert and resize each image straight into one preallocated array.
    out = np.empty((len(probed), size, size, channels), dtype=np.uint8)
    kept: list[int] = []
    upscaled = 0
    for i, (w, h, _g) in probed:
        rel = rel_paths[i]
        try:
            out[len(kept)] = _decode(os.path.join(root, rel), channels, size)
        except _BadImage as err:
            bad(rel, err)
            continue
        kept.append(i)
        upscaled += min(w, h) < size
    if not kept:
        _raise_all_bad(root, len(rel_paths), first_reason[0])
    if upscaled:
        warn(
            f"{upscaled} image{'s' if upscaled != 1 else ''} in {_show(root)} "
            f"{'are' if upscaled != 1 else 'is'} smaller than {size}px and "
            f"{'were' if upscaled != 1 else 'was'} upscaled (bicubic)"
        )
    if skipped:
        warn(f"skipped {len(skipped)} bad image file{'s' if len(skipped) != 1 else ''} (first: {first_reason[0]})")

    images = torch.from_numpy(out[: len(kept)]).permute(0, 3, 1, 2).contiguous()
    labels = None
    if labels_all is not None:
        labels = torch.tensor([labels_all[i] for i in kept], dtype=torch.int64)
    kept_set = set(kept)
    conversions = _conversions([probe for i, probe in probed if i in kept_set], size, channels)
    return ImageDataset(images=images, labels=labels, class_names=class_names, source=root, skipped=skipped,
                        conversions=conversions)


def _conversions(probes: list[tuple[int, int, bool]], size: int, channels: int) -> list[str]:
    """What loading did to these (width, height, gray) images to make them size x size with ``channels``."""
    changed = sorted({(w, h) for w, h, _g in probes if (w, h) != (size, size)})
    out = []
    if changed:
        shown = ", ".join(f"{w}x{h}" for w, h in changed[:3]) + (", ..." if len(changed) > 3 else "")
        count = sum((w, h) != (size, size) for w, h, _g in probes)
        out.append(f"{count} of {len(probes)} images ({shown}) resized and cropped to {size}x{size}")
    gray = sum(g for _w, _h, g in probes)
    if channels == 1 and gray < len(probes):
        out.append(f"{len(probes) - gray} color images converted to grayscale")
    if channels == 3 and gray == len(probes):
        out.append("grayscale images converted to RGB")
    return out
