"""Reading photos robustly: any common format, any bit depth or channel count, EXIF rotation.

`read_image` never raises for a bad file: it returns (None, reason) so a stage can report the
file by name and skip it or fall back, as its contract says.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: real survey photos reach ~60 MP; anything far past that is refused.
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

cv2.setNumThreads(1)


def _to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """Convert a decoded array (gray, gray+alpha, RGB, RGBA; 8 or 16 bit) to HxWx3 uint8 RGB."""
    if arr.dtype == np.uint16:
        arr = (arr / 257.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.shape[2] == 2:
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    # C-contiguous and writable: np.asarray of a PIL image is read-only, which torch.from_numpy
    # warns about (albumentations' ToTensorV2 when the crop already has the model's size)
    return np.require(arr, requirements=["C_CONTIGUOUS", "WRITEABLE"])


class _TooLarge(ValueError):
    """A photo above MAX_PIXELS, refused from its header before its pixels are decoded."""


def _pil_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        # Image.open reads the header only; Pillow itself merely warns up to 2 x its limit.
        if img.width * img.height > MAX_PIXELS:
            raise _TooLarge(f"{img.width} x {img.height} pixels")
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit samples (mode I: 32-bit, as old Pillows open 16-bit PNGs) scale by 1/257 like
            # the OpenCV path, whatever the image's maximum; values outside 0..65535 are clipped.
            arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.uint16)
            return _to_rgb_uint8(arr)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        return _to_rgb_uint8(np.asarray(img))


def _cv2_decode(data: bytes) -> np.ndarray | None:
    """OpenCV's decode, EXIF-rotated: any flag but IMREAD_UNCHANGED applies the orientation,
    and ANYDEPTH keeps 16 bits for `_to_rgb_uint8` (alpha is dropped there anyway)."""
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if decoded is None:
        return None
    if decoded.ndim == 3 and decoded.shape[2] >= 3:
        decoded = cv2.cvtColor(decoded[:, :, :3], cv2.COLOR_BGR2RGB)
    return _to_rgb_uint8(decoded)


def read_image(path: str | Path) -> tuple[np.ndarray | None, str]:
    """Decode `path` to an RGB uint8 array, EXIF-rotated. Returns (image, "") or (None, reason)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "file not found"
    except OSError as err:
        return None, f"cannot read file: {err.strerror or err}"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        arr = _pil_decode(data)
    except _TooLarge as err:
        return None, (f"image too large: {path.name} is {err}, above the {MAX_PIXELS:,} pixel limit "
                      "(decompression bomb)")
    except Image.DecompressionBombError as err:
        # Never handed to OpenCV, which would decode it whole (GBs per worker).
        return None, f"image too large: {path.name}: {err}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        # PIL refuses some files OpenCV can read (and the reverse); try OpenCV before giving up.
        arr = _cv2_decode(data)
        if arr is None:
            return None, f"not a decodable image ({type(err).__name__}: {err})"
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        return None, f"image too small ({arr.shape[1]}x{arr.shape[0]})"
    return arr, ""


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) after EXIF rotation, from the header only; None if unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def write_jpeg(path: str | Path, rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode RGB uint8 as JPEG bytes (the caller writes them atomically)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for {path}")
    return buf.tobytes()


def resize_square(rgb: np.ndarray, size: int, keep_aspect: bool = True) -> np.ndarray:
    """Resize to size x size; with keep_aspect the long side fits and the rest is edge-padded."""
    h, w = rgb.shape[:2]
    if not keep_aspect:
        return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR)
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (nw, nh), interpolation=interp)
    top = (size - nh) // 2
    left = (size - nw) // 2
    return cv2.copyMakeBorder(
        resized, top, size - nh - top, left, size - nw - left, cv2.BORDER_REPLICATE
    )
