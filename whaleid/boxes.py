"""Animal boxes: import from CSV, checks, margin and clamping, letterbox maths, and the
training-free fallback box.

Boxes are `(x_min, y_min, x_max, y_max)` floats in pixels of the decoded (EXIF-rotated) image,
with x_max/y_max exclusive, so the full frame of a w x h image is (0, 0, w, h). Everything here
except `read_box_file` and `fallback_box` (which reads pixels, not files) is pure arithmetic.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from whaleid.errors import UserError

Box = tuple[float, float, float, float]
BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
IMPORT_COLUMNS = ["image", *BOX_COLUMNS, "conf"]


# --- checks and geometry -------------------------------------------------------------------

def box_problem(box: Box | None, width: int, height: int) -> str:
    """Why `box` cannot be used on a width x height image: "no_box", "degenerate_box" or "".

    Degenerate: a NaN or infinite coordinate, zero or negative width/height (inverted), or no
    overlap of at least one pixel with the image. A box partly outside the image is fine: it is
    clamped.
    """
    if box is None:
        return "no_box"
    if not all(math.isfinite(v) for v in box):
        return "degenerate_box"
    x0, y0, x1, y1 = clamp_box(box, width, height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return "degenerate_box"
    return ""


def clamp_box(box: Box, width: int, height: int) -> Box:
    """`box` cut to the image rectangle (may become empty; see `box_problem`)."""
    x0, y0, x1, y1 = box
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
            min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def pad_and_clamp(box: Box, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop rectangle: `box` grown by `margin` x its width/height on each side, clamped.

    Coordinates are rounded outwards (floor the minimum, ceil the maximum) so the crop always
    contains the whole box, and the result is at least 1 x 1 pixel inside the image.
    """
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left = int(min(max(math.floor(x0 - dx), 0), width - 1))
    top = int(min(max(math.floor(y0 - dy), 0), height - 1))
    right = int(max(min(math.ceil(x1 + dx), width), left + 1))
    bottom = int(max(min(math.ceil(y1 + dy), height), top + 1))
    return left, top, right, bottom


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of paired boxes, arrays of shape (n, 4) -> (n,)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def letterbox_params(width: int, height: int, size: int) -> tuple[float, float, int, int]:
    """(scale_x, scale_y, left, top) of `images.resize_square(keep_aspect=True)`.

    The long side is scaled to `size` and the image centred on a size x size canvas; the
    rounding mirrors resize_square exactly so boxes map to the same pixels.
    """
    scale = size / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return new_w / width, new_h / height, (size - new_w) // 2, (size - new_h) // 2


def to_letterbox(box: Box, width: int, height: int, size: int) -> Box:
    """An image-pixel box as a share (0-1) of the letterboxed square."""
    sx, sy, left, top = letterbox_params(width, height, size)
    x0, y0, x1, y1 = box
    return ((x0 * sx + left) / size, (y0 * sy + top) / size,
            (x1 * sx + left) / size, (y1 * sy + top) / size)


def from_letterbox(box: Box, width: int, height: int, size: int) -> Box:
    """Inverse of `to_letterbox`: a 0-1 box on the square back to image pixels."""
    sx, sy, left, top = letterbox_params(width, height, size)
    x0, y0, x1, y1 = box
    return ((x0 * size - left) / sx, (y0 * size - top) / sy,
            (x1 * size - left) / sx, (y1 * size - top) / sy)


# --- import --------------------------------------------------------------------------------

def read_box_file(path: str | Path, known_images: set[str]) -> tuple[dict[str, tuple[Box, float]], list[str]]:
    """Boxes of a CSV (image, x_min, y_min, x_max, y_max, conf) as {image: (box, conf)}.

    A missing file or column stops with a UserError naming it. Bad rows (a non-numeric or
    missing value, negative conf, an image not in the catalogue, an image listed twice) are
    left out and described in the returned problems, by line of the file (the header is line
    1); an image listed twice loses all its rows, since we cannot tell which one is right.
    Checking geometry against the image (inverted, outside) is left to `box_problem`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"box file {path} not found (crop.box_files)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"box file {path} is not a readable CSV: {err}") from err
    for column in IMPORT_COLUMNS:
        if column not in df.columns:
            raise UserError(f"box file {path} lacks column {column!r} (needs {', '.join(IMPORT_COLUMNS)})")
    problems: list[str] = []
    numbers = df[IMPORT_COLUMNS[1:]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1)
    for i in np.flatnonzero(bad.to_numpy()):
        cols = [c for c in numbers.columns if pd.isna(numbers.iat[i, numbers.columns.get_loc(c)])]
        problems.append(f"{path.name} line {i + 2}: non-numeric or missing {', '.join(cols)}")
    negative = ~bad & (numbers["conf"] < 0)
    problems += [f"{path.name} line {i + 2}: negative conf" for i in np.flatnonzero(negative.to_numpy())]
    unknown = ~df["image"].isin(known_images)
    problems += [f"{path.name} line {i + 2}: image {df['image'].iat[i]!r} is not in the catalogue"
                 for i in np.flatnonzero(unknown.to_numpy())]
    duplicated = df["image"].duplicated(keep=False) & ~unknown
    problems += [f"{path.name} line {i + 2}: image {df['image'].iat[i]!r} is listed more than once"
                 for i in np.flatnonzero(duplicated.to_numpy())]
    keep = ~(bad | negative | unknown | duplicated)
    boxes = {
        image: (tuple(float(v) for v in row[:4]), float(row[4]))
        for image, row in zip(df["image"][keep], numbers[keep].to_numpy())
    }
    return boxes, problems


# --- training-free fallback ----------------------------------------------------------------

FALLBACK_SIDE = 256        # segmentation runs on a copy with this long side (speed; boxes are coarse)
FALLBACK_BORDER = 0.05     # share of each side taken as the sea sample
FALLBACK_MIN_AREA = 0.003  # a foreground smaller than this share of the frame is "no animal"


def fallback_box(rgb: np.ndarray) -> tuple[Box | None, float]:
    """The animal's box by segmenting it from the sea, without training: (box, conf) or (None, 0).

    The frame border is taken as a sample of the sea: every pixel gets its distance to the
    border's median colour in Lab, scaled by the border's own spread (so choppy water needs a
    larger difference). Otsu's threshold on that distance separates the animal; after a
    morphological clean-up the largest blob, plus blobs at least a quarter of its size (a body
    split by spray), gives the box. conf is the contrast between animal and sea, squashed to
    0-1. It assumes one animal that does not fill the frame and a sea-like border.
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, FALLBACK_SIDE / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    lab = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32), (5, 5), 0)
    border = _border_pixels(lab, max(2, round(FALLBACK_BORDER * max(small.shape[:2]))))
    centre = np.median(border, axis=0)
    spread = np.median(np.abs(border - centre), axis=0) * 1.4826 + 2.0
    dist = np.sqrt((((lab - centre) / spread) ** 2).sum(axis=2))
    dist8 = np.clip(dist * (255.0 / max(float(np.percentile(dist, 99.5)), 1e-6)), 0, 255).astype(np.uint8)
    threshold, mask = cv2.threshold(dist8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    found = _main_blobs(mask)
    if found is None:
        return None, 0.0
    x0, y0, x1, y1 = found
    contrast = float(np.median(dist[mask > 0]) - np.median(dist[mask == 0])) if (mask == 0).any() else 0.0
    box = (x0 / scale, y0 / scale, x1 / scale, y1 / scale)
    return clamp_box(box, w, h), float(1.0 - math.exp(-max(contrast, 0.0) / 3.0))


def _border_pixels(image: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a `width`-wide frame around the image, as (n, channels)."""
    c = image.shape[2]
    return np.concatenate([
        image[:width].reshape(-1, c), image[-width:].reshape(-1, c),
        image[:, :width].reshape(-1, c), image[:, -width:].reshape(-1, c),
    ])


def _main_blobs(mask: np.ndarray) -> Box | None:
    """Bounding box of the largest connected blob and of blobs >= 1/4 of its area, or None.

    A blob touching the top edge across most of the width is a band of sky above the horizon,
    not an animal, and is left out.
    """
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    stats = stats[1:]
    sky = (stats[:, cv2.CC_STAT_TOP] == 0) & (stats[:, cv2.CC_STAT_WIDTH] >= 0.9 * mask.shape[1])
    stats = stats[~sky]
    if len(stats) == 0:
        return None
    areas = stats[:, cv2.CC_STAT_AREA]
    if areas.max() < FALLBACK_MIN_AREA * mask.size:
        return None
    keep = stats[areas >= areas.max() / 4]
    x0 = keep[:, cv2.CC_STAT_LEFT].min()
    y0 = keep[:, cv2.CC_STAT_TOP].min()
    x1 = (keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max()
    y1 = (keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max()
    return float(x0), float(y0), float(x1), float(y1)
