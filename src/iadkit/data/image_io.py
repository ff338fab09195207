"""Reading images and masks from disk into arrays, with one clear error per bad file.

Any format Pillow decodes is accepted. Grayscale, palette, CMYK, RGBA and 16-bit or float images
all become 8-bit RGB; masks become boolean arrays.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError, ImageTooLargeError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


#: Bytes per pixel of Pillow's decoded modes (others count 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16L": 2,
               "I;16B": 2, "I;16N": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def decoded_bytes(mode: str, width: int, height: int) -> int:
    """An upper estimate of the memory that decoding and converting an image of this mode and
    size takes at its peak: the decoded pixels, their array copy, and the 8-bit result with
    the copy the resize makes."""
    return width * height * (2 * _MODE_BYTES.get(mode, 4) + 6)


def _open_decoded(source: Path | io.BytesIO, name: str, max_pixels: int | None = None,
                  max_bytes: int | None = None) -> Image.Image:
    """Open and fully decode a file or in-memory bytes, turning every failure into an
    ImageReadError that names ``name``; more than ``max_pixels`` pixels, or a decoded size over
    ``max_bytes`` (:func:`decoded_bytes`), are refused before decoding (the header gives the
    size and mode)."""
    if isinstance(source, Path) and not source.exists():
        raise ImageReadError(f"{name}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageTooLargeError(f"{name}: {image.width}x{image.height} pixels is more "
                                         f"than the {max_pixels} allowed")
            size = decoded_bytes(image.mode, image.width, image.height)
            if max_bytes is not None and size > max_bytes:
                raise ImageTooLargeError(
                    f"{name}: decoding this {image.width}x{image.height} {image.mode} image "
                    f"takes about {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} "
                    "MiB allowed")
            image.load()  # decoding happens here: truncated files fail now, not later
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{name}: image too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{name}: corrupt or truncated image ({error})") from None
    if image.width == 0 or image.height == 0:
        raise ImageReadError(f"{name}: image has zero size")
    return image


def _to_uint8(array: np.ndarray, path: Path | str) -> np.ndarray:
    """Scale an integer or float array to 0..255 by its type's full range (not per image)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit (and 32-bit 'I' mode holding 16-bit data) map by the 16-bit range so that
        # every image of a dataset is scaled the same way. Row blocks keep the float64
        # intermediate small on large images.
        top = 65535.0 if array.max(initial=0) <= 65535 else float(np.iinfo(array.dtype).max)
        result = np.empty(array.shape, dtype=np.uint8)
        step = max(1, (1 << 20) // max(1, array[0].size))
        for start in range(0, array.shape[0], step):
            block = array[start:start + step].astype(np.float64) * (255.0 / top)
            result[start:start + step] = np.clip(np.round(block), 0, 255)
        return result
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageReadError(f"{path}: float image contains NaN or infinite values")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    raise ImageReadError(f"{path}: unsupported pixel type {array.dtype}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        ImageReadError: the file is missing, corrupt, truncated or of an unsupported kind.
    """
    path = Path(path)
    return _to_rgb(_open_decoded(path, str(path)), path)


def image_shape(path: str | Path) -> tuple[int, int]:
    """An image file's ``(height, width)`` from its header alone (nothing decoded).

    Raises:
        ImageReadError: the file is missing or not an image.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format)") from None
    if width == 0 or height == 0:
        raise ImageReadError(f"{path}: image has zero size")
    return height, width


def decode_image(data: bytes, name: str = "upload", max_pixels: int | None = None,
                 max_bytes: int | None = None, keep_gray: bool = False) -> np.ndarray:
    """Decode image bytes (e.g. an upload) as an ``(H, W, 3)`` uint8 RGB array, with the same
    conversions as :func:`read_image`; with ``keep_gray`` a single-channel image stays
    ``(H, W)`` (a third of the memory; :class:`~iadkit.data.preprocess.Preprocess` gives the
    same input from either).

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels, or more than ``max_bytes`` to
            decode (checked before decoding).
        ImageReadError: not an image, corrupt, truncated or of an unsupported kind.
    """
    if not data:
        raise ImageReadError(f"{name}: empty")
    return _to_rgb(_open_decoded(io.BytesIO(data), name, max_pixels, max_bytes), name,
                   keep_gray)


def _to_rgb(image: Image.Image, path: Path | str, keep_gray: bool = False) -> np.ndarray:
    if image.mode in ("RGB",):
        return np.asarray(image)
    if image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        image = image.convert("RGBA" if image.mode in ("P", "PA") else "RGB")
    array = np.asarray(image)
    del image  # the array holds the pixels now: let Pillow's copy go
    if array.ndim == 2:
        gray = _to_uint8(array, path)
        if keep_gray:
            return gray
        array = np.repeat(gray[:, :, None], 3, axis=2)
    elif array.ndim == 3:
        channels = array.shape[2]
        if channels == 2:  # gray + alpha
            array = np.repeat(array[:, :, :1], 3, axis=2)
        elif channels >= 3:  # RGB(A...): drop alpha and extra channels
            array = array[:, :, :3]
        else:
            array = np.repeat(array, 3, axis=2)
        array = _to_uint8(array, path)
    else:
        raise ImageReadError(f"{path}: unsupported image shape {array.shape}")
    return np.ascontiguousarray(array)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask as an ``(H, W)`` bool array.

    Masks saved as 0/255 are split at half range; masks saved as 0/1 are taken as they are. A
    folder of region masks (MVTec LOCO: one file per defect, whatever its pixel value) gives
    their union.
    """
    path = Path(path)
    if path.is_dir():
        regions = read_mask_regions(path)
        union = regions[0][0].copy()
        for region, _ in regions[1:]:
            if region.shape != union.shape:
                raise ImageReadError(f"{path}: its region masks differ in size")
            union |= region
        return union
    array = _mask_values(path)
    top = float(array.max(initial=0))
    if top <= 1:
        return array > 0
    full_range = 255.0 if array.dtype == np.uint8 or top <= 255 else 65535.0
    return array > full_range / 2


def _mask_values(path: Path) -> np.ndarray:
    image = _open_decoded(path, str(path))
    if image.mode not in ("L", "1", "I", "I;16", "F"):
        image = image.convert("L")
    array = np.asarray(image)
    return array[:, :, 0] if array.ndim == 3 else array


def read_mask_regions(folder: str | Path) -> list[tuple[np.ndarray, int]]:
    """The defect regions of a folder of region masks (MVTec LOCO's
    ``ground_truth/<type>/<image stem>/000.png, 001.png``): per file, in name order, the
    ``(H, W)`` bool mask of its non-zero pixels and the pixel value they carry (the defect's
    key in ``defects_config.json``).

    Raises:
        ImageReadError: an empty folder, an empty region, or a region of several values.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []
    if not files:
        raise ImageReadError(f"{folder}: no region masks in this ground-truth folder")
    regions = []
    for path in files:
        values = _mask_values(path)
        present = np.unique(values[values > 0])
        if present.size != 1:
            raise ImageReadError(f"{path}: a region mask must mark its pixels with one value, "
                                 f"found {'none' if present.size == 0 else present.tolist()}")
        regions.append((values > 0, int(present[0])))
    return regions
