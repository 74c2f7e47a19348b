"""Loading images as RGB uint8 arrays, the way a person sees them (EXIF orientation applied)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs (a 20000 x 20000 image is 400 Mpx)

ImageLike = str | Path | bytes | np.ndarray | Image.Image


class ImageError(ValueError):
    """An image that cannot be read: missing, empty, corrupt, too large or of an unknown format."""


def load_image(src: ImageLike) -> np.ndarray:
    """Any image source -> (H, W, 3) RGB uint8 in display orientation.

    Accepts a path, encoded bytes, a PIL image (any mode: L, LA, P, RGBA, CMYK, I;16, ...), or an array
    (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, uint8 or uint16. EXIF orientation is applied to files,
    bytes and PIL images, so coordinates refer to the image as displayed. Raises ``ImageError``.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src)
    try:
        if isinstance(src, bytes):
            if not src:
                raise ImageError("empty image data")
            pil = Image.open(io.BytesIO(src))
        else:
            path = Path(src)
            if not path.is_file():
                raise ImageError(f"image not found: {path}")
            if path.stat().st_size == 0:
                raise ImageError(f"empty image file: {path}")
            pil = Image.open(path)
        pil.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        name = "image data" if isinstance(src, bytes) else str(src)
        raise ImageError(f"cannot read {name}: {exc}") from exc
    return _pil_to_rgb(pil)


def _pil_to_rgb(pil: Image.Image) -> np.ndarray:
    with contextlib.suppress(Exception):  # a broken EXIF block must not make the pixels unreadable
        pil = ImageOps.exif_transpose(pil)
    if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(pil, dtype=np.float64)
        top = arr.max() if arr.size else 1.0
        scale = 255.0 / (65535.0 if top > 255 else 255.0)
        return _array_to_rgb(np.clip(arr * scale, 0, 255).astype(np.uint8))
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        pil = pil.convert("RGBA")
        background = Image.new("RGBA", pil.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(background, pil)
    return np.ascontiguousarray(np.asarray(pil.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint16:
        arr = (arr / 257.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"unsupported array dtype {arr.dtype}: give uint8 or uint16")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ImageError(f"unsupported array shape {arr.shape}: give (H, W), (H, W, 3) or (H, W, 4)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError("empty image")
    return np.ascontiguousarray(arr)
