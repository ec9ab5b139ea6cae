"""Tissue image files (PNG/JPEG/TIFF) and arrays as uint8 H x W x 3."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FileFormatError

__all__ = ["read_image", "to_uint8_rgb"]


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Convert grey, RGBA, channel-first, 16-bit or float images to uint8 HxWx3."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[-1] not in (1, 3, 4):
        img = np.moveaxis(img, 0, -1)  # channel-first TIFFs
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise FileFormatError(
            f"Expected a 2-D grey or RGB(A) image (H x W [x 3|4]), got shape {img.shape}."
        )
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    img = img[..., :3]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    img = img.astype(np.float64)
    finite = img[np.isfinite(img)]
    top = float(finite.max()) if finite.size else 0.0
    if np.issubdtype(np.asarray(image).dtype, np.floating) and top <= 1.0:
        scale = 255.0  # float images in [0, 1]
    elif top > 255:
        scale = 255.0 / top  # 16-bit and other wide ranges
    else:
        scale = 1.0
    return np.clip(np.nan_to_num(img * scale), 0, 255).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    """Read a PNG/JPEG/TIFF image as uint8 HxWx3."""
    if not path.is_file():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            pass
        else:
            return to_uint8_rgb(tifffile.imread(path, level=0, series=0))
    from PIL import Image

    # Full-resolution histology easily exceeds PIL's decompression-bomb limit;
    # the file was chosen by the user, so lift the limit for this read only.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
    except OSError as err:
        raise FileFormatError(f"Cannot read image {str(path)!r}: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return to_uint8_rgb(arr)
