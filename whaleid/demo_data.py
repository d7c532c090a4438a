"""The built-in synthetic photo-ID dataset, in the Happywhale competition layout.

Sea photos of procedurally drawn whales and dolphins of five species. Identity is carried only
by persistent individual marks drawn from the individual's own seed (trailing-edge notches,
scars and rake marks, pigment patches, fluke patterns, fin shape); every photo of an animal
varies in scale, position, tilt, side (mirror), lighting, colour cast, waves and spray over the
animal, blur and JPEG quality. Background, image size, file name, row order and compression are
drawn independently of identity, so a model can only score by learning the marks.

Every photo is drawn from its own generator seeded by (seed, individual, photo), so the set is
byte-identical for a seed whatever the number of worker processes.

Usage: `python -m whaleid.demo_data [--config X] [--set demo.n_individuals=20] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from whaleid.config import Config
from whaleid.errors import UserError
from whaleid.images import read_image, write_jpeg
from whaleid.io import read_json, write_bytes, write_csv, write_json

# Bump when the drawing changes, so an existing demo folder is regenerated.
GENERATOR_VERSION = 2
META_FILE = "demo_meta.json"
NEW_ID = "new_individual"
# Happywhale-style names; the weights give the share of individuals of each species.
SPECIES = {
    "bottlenose_dolphin": 0.28,
    "killer_whale": 0.18,
    "humpback_whale": 0.2,
    "beluga": 0.16,
    "fin_whale": 0.18,
}
# Zipf exponent of the images-per-individual draw: about 40% of the individuals get one image.
TAIL_EXPONENT = 1.2
# Config keys that do not change the generated files (left out of the stamp).
STAMP_IGNORED = ("workers",)

FIXED_POINT = 16  # sub-pixel polygon drawing: cv2 coordinates are multiplied by 2**4
WHITE = np.array([0.95, 0.96, 0.97], np.float32)


# ----------------------------------------------------------------------------------------------
# Plan: individuals, image counts, splits and file names (drawn in the main process)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Individual:
    """One animal: its id, species, and how many of its photos go to train and to test."""

    index: int
    individual_id: str
    species: str
    n_train: int
    n_test: int

    @property
    def is_new(self) -> bool:
        return self.n_train == 0


@dataclass(frozen=True)
class Photo:
    """One image to render: which individual, which of its photos, where it goes."""

    image: str
    split: str
    individual: Individual
    photo: int


def _tail_counts(rng: np.random.Generator, n: int, max_count: int) -> np.ndarray:
    """Images per individual from a truncated Zipf law: many with one image, a few with many."""
    ks = np.arange(1, max_count + 1)
    p = ks ** -TAIL_EXPONENT
    return rng.choice(ks, size=n, p=p / p.sum())


def _known_splits(rng: np.random.Generator, counts: np.ndarray, test_share: float) -> np.ndarray:
    """Test images per known individual: a `test_share` share, stochastically rounded, >= 1 left in train."""
    n_test = np.floor(counts * test_share + rng.uniform(size=len(counts))).astype(int)
    return np.clip(n_test, 0, counts - 1)


def _new_counts(rng: np.random.Generator, n_new: int, n_known_test: int, new_share: float,
                max_count: int) -> np.ndarray:
    """Images per new individual so that about `new_share` of test images are new (>= 1 each)."""
    if n_new == 0:
        return np.zeros(0, int)
    target = round(n_known_test * new_share / max(1e-6, 1.0 - new_share))
    extra = max(0, target - n_new)
    weights = 1.0 / rng.permutation(np.arange(1, n_new + 1))
    counts = 1 + rng.multinomial(extra, weights / weights.sum())
    return np.minimum(counts, max_count)


def _unique_hex(rng: np.random.Generator, n: int, n_bytes: int) -> list[str]:
    """`n` distinct random hex strings (deterministic for the generator state)."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(rng.bytes(n_bytes).hex(), None)
    return list(seen)


def plan(demo: Config) -> list[Photo]:
    """Draw the individuals, their image counts and splits, and the shuffled list of photos."""
    if demo.n_individuals < 1 or demo.images_per_individual_max < 1:
        raise UserError("demo.n_individuals and demo.images_per_individual_max must be >= 1")
    if not 0.0 <= demo.test_share < 1.0 or not 0.0 <= demo.test_new_share < 1.0:
        raise UserError("demo.test_share and demo.test_new_share must be in [0, 1)")
    rng = np.random.default_rng([demo.seed, 0])
    n_known, n_new, cap = demo.n_individuals, demo.n_new_individuals, demo.images_per_individual_max
    counts = _tail_counts(rng, n_known, cap)
    n_test = _known_splits(rng, counts, demo.test_share)
    new_counts = _new_counts(rng, n_new, int(n_test.sum()), demo.test_new_share, cap)
    names = list(SPECIES)
    weights = np.array(list(SPECIES.values()))
    species = rng.choice(names, size=n_known + n_new, p=weights / weights.sum())
    ids = _unique_hex(rng, n_known + n_new, 6)
    individuals = [
        Individual(i, ids[i], str(species[i]), int(counts[i] - n_test[i]), int(n_test[i]))
        for i in range(n_known)
    ] + [
        Individual(n_known + j, ids[n_known + j], str(species[n_known + j]), 0, int(new_counts[j]))
        for j in range(n_new)
    ]
    slots = [(ind, k, "train" if k < ind.n_train else "test")
             for ind in individuals for k in range(ind.n_train + ind.n_test)]
    files = _unique_hex(rng, len(slots), 4)
    photos = [Photo(f"{name}.jpg", split, ind, k) for (ind, k, split), name in zip(slots, files)]
    return [photos[i] for i in rng.permutation(len(photos))]


# ----------------------------------------------------------------------------------------------
# Drawing primitives (masks are float32 in [0, 1], anti-aliased)
# ----------------------------------------------------------------------------------------------


def _fill(shape: tuple[int, int], polygons: list[np.ndarray]) -> np.ndarray:
    """Anti-aliased mask of filled polygons given in float pixel coordinates."""
    mask = np.zeros(shape, np.uint8)
    pts = [np.round(p * FIXED_POINT).astype(np.int32) for p in polygons]
    cv2.fillPoly(mask, pts, 255, lineType=cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) / 255.0


def _stroke(shape: tuple[int, int], lines: list[np.ndarray], thickness: int) -> np.ndarray:
    """Anti-aliased mask of open polylines."""
    mask = np.zeros(shape, np.uint8)
    pts = [np.round(p * FIXED_POINT).astype(np.int32) for p in lines]
    cv2.polylines(mask, pts, False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) / 255.0


def _bezier(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float],
            n: int = 32) -> np.ndarray:
    """Points of a quadratic Bezier curve, shape (n, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c


def _paint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Blend `colour` into `rgb` in place where `mask` is set."""
    rgb += mask[..., None] * (colour - rgb)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth random field of `shape` from a (rows, cols) grid of normals, bicubic-upsampled."""
    grid = rng.standard_normal((max(2, cells[0]), max(2, cells[1]))).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------------------------
# Individual marks (drawn once per individual from its own seed)
# ----------------------------------------------------------------------------------------------


def _notch_cuts(rng: np.random.Generator, edge: np.ndarray, inside: np.ndarray, n: int,
                size: float, span: tuple[float, float] = (0.08, 0.9)) -> list[np.ndarray]:
    """Polygons that cut `n` notches into a trailing edge (points ordered along it).

    Each notch has its own position, depth, width and shape (V or U), the marks by which
    photo-ID catalogues tell dolphins and fluke-photographed whales apart.
    """
    cuts = []
    positions = np.sort(rng.uniform(*span, size=n))
    for u in positions:
        i = int(np.clip(u * (len(edge) - 1), 1, len(edge) - 2))
        p = edge[i]
        tangent = edge[i + 1] - edge[i - 1]
        tangent /= np.linalg.norm(tangent) + 1e-9
        normal = np.array([-tangent[1], tangent[0]])
        if np.dot(inside - p, normal) < 0:
            normal = -normal  # point into the fin
        depth = size * rng.uniform(0.24, 0.42)
        half = size * rng.uniform(0.10, 0.18)
        if rng.random() < 0.5:  # V notch
            profile = [(-1.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
        else:  # U notch
            a = np.linspace(np.pi, 0.0, 9)
            profile = list(zip(np.cos(a), np.sin(a) ** 0.7))
        pts = [p + tangent * half * s + normal * depth * d for s, d in profile]
        pts = [p - tangent * half * 1.2 - normal * 6] + pts + [p + tangent * half * 1.2 - normal * 6]
        cuts.append(np.array(pts))
    return cuts


def _random_point(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A random (x, y) where `mask` is solidly set."""
    ys, xs = np.nonzero(mask > 0.95)
    k = rng.integers(len(xs))
    return np.array([xs[k], ys[k]], np.float64)


def _scars(rng: np.random.Generator, region: np.ndarray, n: int, scale: float) -> np.ndarray:
    """Mask of `n` scars inside `region`: single healed lines or parallel tooth-rake marks."""
    mask = np.zeros(region.shape, np.float32)
    for _ in range(n):
        start = _random_point(rng, region)
        angle = rng.uniform(0, np.pi)
        length = scale * rng.uniform(0.12, 0.28)
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        bend = normal * length * rng.uniform(-0.25, 0.25)
        rakes = 1 if rng.random() < 0.45 else int(rng.integers(2, 5))
        # Marks must stay a few pixels wide in a 128-160 px crop of the whole animal, as real
        # scars do in the 384-512 px crops the competition solutions trained on.
        spacing = scale * rng.uniform(0.03, 0.045)
        thickness = int(rng.integers(7, 11)) if rakes == 1 else int(rng.integers(5, 8))
        lines = []
        for r in range(rakes):
            offset = normal * spacing * (r - (rakes - 1) / 2)
            a = start + offset
            c = start + direction * length + offset
            lines.append(_bezier(a, (a + c) / 2 + bend, c, n=16))
        mask = np.maximum(mask, _stroke(region.shape, lines, thickness))
    return mask * region


def _spots(rng: np.random.Generator, region: np.ndarray, n: int, scale: float,
           size: tuple[float, float] = (0.04, 0.09)) -> np.ndarray:
    """Mask of `n` pigment patches (irregular ellipses) inside `region`."""
    mask = np.zeros(region.shape, np.uint8)
    for _ in range(n):
        cx, cy = _random_point(rng, region)
        axes = (int(scale * rng.uniform(*size)), int(scale * rng.uniform(*size) * 0.7))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 255,
                    -1, cv2.LINE_AA)
    return mask.astype(np.float32) / 255.0 * region


# ----------------------------------------------------------------------------------------------
# Species templates: the animal as it is above the waterline, facing left, with its marks
# ----------------------------------------------------------------------------------------------


@dataclass
class Template:
    """An individual's appearance: RGB and alpha on a canvas whose bottom row is the waterline."""

    rgb: np.ndarray
    alpha: np.ndarray


def _profile(x: np.ndarray, x0: float, x1: float, height: float, peak: float, sharp: float) -> np.ndarray:
    """Height of a back above the waterline along x: a skewed arch from x0 to x1."""
    t = np.clip((x - x0) / (x1 - x0), 0.0, 1.0)
    t = t ** (np.log(0.5) / np.log(peak))
    return height * np.sin(np.pi * t) ** sharp


def _back_polygon(x: np.ndarray, heights: np.ndarray, wl: float) -> np.ndarray:
    """Closed polygon of a back whose top is `wl - heights`, reaching below the waterline."""
    top = np.stack([x, wl - heights], axis=1)
    return np.vstack([[x[0], wl + 20], top, [x[-1], wl + 20]])


@dataclass
class Fin:
    """A dorsal fin's outline, and what notching needs: its trailing edge, an inner point, its height."""

    polygon: np.ndarray
    trailing: np.ndarray  # trailing edge, tip first
    centre: np.ndarray
    height: float


def _fin(x_back: np.ndarray, h_back: np.ndarray, wl: float, base0: float, base_w: float,
         height: float, sweep: float, falcate: float) -> Fin:
    """A dorsal fin on the back: convex leading edge, concave (falcate) trailing edge."""
    base1 = base0 + base_w
    y0 = wl - np.interp(base0, x_back, h_back) + 6
    y1 = wl - np.interp(base1, x_back, h_back) + 6
    tip = (base1 + sweep * base_w, min(y0, y1) - height)
    lead = _bezier((base0, y0), (base0 + 0.3 * (tip[0] - base0), tip[1] + 0.35 * height), tip)
    ctrl = (base1 + sweep * base_w * 0.1 - falcate * base_w * 0.45, y1 - 0.4 * height)
    trail = _bezier(tip, ctrl, (base1, y1))
    polygon = np.vstack([lead, trail[1:]])
    centre = np.array([base0 + 0.45 * base_w, y0 - 0.3 * height])
    return Fin(polygon, trail, centre, height)


def _dorsal_animal(rng: np.random.Generator, size: tuple[int, int], wl: float, body: dict,
                   fin: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, body-only mask) of a back-and-fin animal with per-individual fin shape and notches."""
    x = np.linspace(body["x0"], body["x1"], 96)
    heights = _profile(x, body["x0"], body["x1"], body["height"], body["peak"], body["sharp"])
    if "head" in body:  # a second, smaller arch in front (the beluga's melon)
        heights = np.maximum(heights, _profile(x, *body["head"]))
    body_mask = _fill(size, [_back_polygon(x, heights, wl)])
    if fin is None:
        return body_mask, body_mask
    f = _fin(x, heights, wl, fin["base0"], fin["base_w"], fin["height"], fin["sweep"], fin["falcate"])
    fin_mask = _fill(size, [f.polygon])
    cuts = _notch_cuts(rng, f.trailing, f.centre, fin["notches"], min(f.height, 95.0))
    if rng.random() < fin.get("tip_cut", 0.0):  # a missing fin tip
        tip = f.trailing[0]
        cuts.append(np.array([tip + (-40, -20), tip + (40, -20), tip + (40, 0.12 * f.height),
                              tip + (-40, 0.2 * f.height)]))
    if cuts:
        fin_mask *= 1.0 - _fill(size, cuts)
    return np.maximum(body_mask, fin_mask), body_mask


def _finish(rgb: np.ndarray, alpha: np.ndarray, wl: int) -> Template:
    """Clip at the waterline and crop the canvas to the animal."""
    alpha = alpha[:wl]
    rgb = rgb[:wl]
    cols = np.nonzero(alpha.max(axis=0) > 0.02)[0]
    rows = np.nonzero(alpha.max(axis=1) > 0.02)[0]
    x0, x1 = max(0, cols[0] - 3), cols[-1] + 4
    y0 = max(0, rows[0] - 3)
    return Template(np.ascontiguousarray(rgb[y0:, x0:x1]), np.ascontiguousarray(alpha[y0:, x0:x1]))


def _bottlenose(rng: np.random.Generator) -> Template:
    """Grey dolphin back with a falcate fin; ID by trailing-edge notches, scars and pale patches."""
    size, wl = (210, 360), 195
    fin = dict(base0=rng.uniform(130, 160), base_w=rng.uniform(58, 74), height=rng.uniform(62, 92),
               sweep=rng.uniform(0.25, 0.75), falcate=rng.uniform(0.3, 0.9),
               notches=int(rng.integers(1, 5)), tip_cut=0.15)
    body = dict(x0=10, x1=350, height=rng.uniform(52, 66), peak=0.45, sharp=0.85)
    alpha, body_mask = _dorsal_animal(rng, size, wl, body, fin)
    rgb = np.empty(size + (3,), np.float32)
    rgb[:] = (0.44, 0.47, 0.50)
    cape = _fill(size, [_back_polygon(np.linspace(10, 350, 64), np.full(64, 200.0), wl - 22)])
    _paint(rgb, cape * 0.6, np.array([0.30, 0.32, 0.35], np.float32))
    _paint(rgb, _spots(rng, body_mask, int(rng.integers(0, 3)), 360, (0.03, 0.07)),
           np.array([0.72, 0.74, 0.76], np.float32))
    _paint(rgb, _scars(rng, alpha, int(rng.integers(1, 4)), 360), np.array([0.86, 0.87, 0.88], np.float32))
    return _finish(rgb, alpha, wl)


def _killer_whale(rng: np.random.Generator) -> Template:
    """Black back, tall fin (straight in males, falcate in females), grey saddle patch of individual shape."""
    size, wl = (280, 380), 265
    male = rng.random() < 0.5
    fin = dict(base0=rng.uniform(120, 150), base_w=rng.uniform(62, 80),
               height=rng.uniform(140, 185) if male else rng.uniform(85, 115),
               sweep=rng.uniform(0.0, 0.25) if male else rng.uniform(0.3, 0.7),
               falcate=rng.uniform(-0.1, 0.2) if male else rng.uniform(0.4, 0.9),
               notches=int(rng.integers(1, 4)), tip_cut=0.2)
    body = dict(x0=10, x1=370, height=rng.uniform(48, 60), peak=0.45, sharp=0.7)
    alpha, body_mask = _dorsal_animal(rng, size, wl, body, fin)
    rgb = np.empty(size + (3,), np.float32)
    rgb[:] = (0.06, 0.06, 0.07)
    sx = fin["base0"] + fin["base_w"] + rng.uniform(-25, 10)
    sw, sh = rng.uniform(50, 95), rng.uniform(0.3, 0.5) * body["height"]
    saddle = np.zeros(size, np.uint8)
    cv2.ellipse(saddle, (int(sx + sw / 2), int(wl - 0.85 * body["height"])), (int(sw / 2), int(sh)),
                float(rng.uniform(-15, 15)), 0, 360, 255, -1, cv2.LINE_AA)
    saddle_mask = saddle.astype(np.float32) / 255 * body_mask
    if rng.random() < 0.5:  # "open saddle": a black finger reaching into the grey
        p = np.array([sx + sw * rng.uniform(0.2, 0.8), wl - 1.2 * body["height"]])
        finger = [_bezier(p, p + (rng.uniform(-15, 15), 25), p + (rng.uniform(-20, 20), 50 + sh))]
        saddle_mask *= 1.0 - _stroke(size, finger, int(rng.integers(5, 10)))
    _paint(rgb, saddle_mask, np.array([0.55, 0.56, 0.59], np.float32))
    _paint(rgb, _scars(rng, alpha, int(rng.integers(1, 4)), 380), np.array([0.58, 0.59, 0.62], np.float32))
    return _finish(rgb, alpha, wl)


def _beluga(rng: np.random.Generator) -> Template:
    """White finless back with a dorsal ridge; ID by grey scars, spots and ridge nicks."""
    size, wl = (150, 380), 135
    height = rng.uniform(44, 56)
    body = dict(x0=30, x1=370, height=height, peak=0.45, sharp=0.35,
                head=(8, 150, height * rng.uniform(1.0, 1.15), 0.5, 0.9))
    alpha, body_mask = _dorsal_animal(rng, size, wl, body, None)
    rgb = np.empty(size + (3,), np.float32)
    rgb[:] = (0.88, 0.88, 0.84)
    x = np.linspace(180, 320, 48)
    ridge_top = wl - _profile(x, 30, 370, height, 0.45, 0.35) + 3
    ridge = [np.stack([x, ridge_top], 1)]
    ridge_mask = _stroke(size, ridge, 6) * alpha
    nicks = _notch_cuts(rng, ridge[0], np.array([250.0, wl]), int(rng.integers(1, 4)), 40.0, (0.1, 0.9))
    alpha = alpha * (1.0 - _fill(size, nicks))
    _paint(rgb, ridge_mask, np.array([0.74, 0.74, 0.72], np.float32))
    _paint(rgb, _spots(rng, body_mask, int(rng.integers(1, 4)), 380), np.array([0.55, 0.55, 0.55], np.float32))
    _paint(rgb, _scars(rng, body_mask, int(rng.integers(2, 4)), 380), np.array([0.45, 0.43, 0.42], np.float32))
    return _finish(rgb, alpha, wl)


def _fin_whale(rng: np.random.Generator) -> Template:
    """Long low mottled back, small fin far back, pale chevron; ID by fin notches, chevron, blotches, scars."""
    size, wl = (140, 500), 125
    fin = dict(base0=rng.uniform(330, 370), base_w=rng.uniform(38, 50), height=rng.uniform(30, 48),
               sweep=rng.uniform(0.3, 0.9), falcate=rng.uniform(0.2, 0.8),
               notches=int(rng.integers(1, 3)), tip_cut=0.1)
    body = dict(x0=10, x1=490, height=rng.uniform(34, 42), peak=0.5, sharp=0.45)
    alpha, body_mask = _dorsal_animal(rng, size, wl, body, fin)
    rgb = np.empty(size + (3,), np.float32)
    rgb[:] = (0.30, 0.32, 0.35)
    cx, spread = rng.uniform(90, 170), rng.uniform(25, 45)
    tilt = rng.uniform(-12, 12)
    chevron = [np.array([[cx - spread, wl - 5], [cx + tilt, wl - 36], [cx + spread * 1.6, wl - 8]])]
    _paint(rgb, _stroke(size, chevron, int(rng.integers(7, 12))) * body_mask * 0.8,
           np.array([0.74, 0.75, 0.77], np.float32))
    _paint(rgb, _spots(rng, body_mask, int(rng.integers(3, 7)), 500, (0.022, 0.05)),
           np.array([0.62, 0.64, 0.67], np.float32))
    _paint(rgb, _scars(rng, body_mask, int(rng.integers(1, 3)), 420), np.array([0.75, 0.76, 0.78], np.float32))
    return _finish(rgb, alpha, wl)


def _humpback_whale(rng: np.random.Generator) -> Template:
    """Raised fluke, underside shown: an individual black/white pattern and a notched trailing edge."""
    size, wl, cx = (270, 400), 255, 200.0
    span = rng.uniform(170, 190)
    tip_y = rng.uniform(45, 75)
    notch_y = rng.uniform(60, 80)
    base_y = rng.uniform(140, 160)
    edge_sag = rng.uniform(-20, 15)
    lobes, edges = [], []
    for side in (-1.0, 1.0):
        tip = (cx + side * span, tip_y)
        trail = _bezier((cx + side * 3, notch_y), (cx + side * span * 0.55, tip_y + edge_sag), tip, n=40)
        lead = _bezier(tip, (cx + side * span * 0.6, base_y - 10), (cx + side * 16, base_y))
        lobes.append(np.vstack([trail, lead[1:]]))
        edges.append(trail)
    stock = np.array([[cx - 22, base_y - 10], [cx + 22, base_y - 10], [cx + 30, wl + 10], [cx - 30, wl + 10]])
    fluke = _fill(size, lobes)
    cuts = []
    for edge in edges:
        cuts += _notch_cuts(rng, edge, np.array([cx, base_y]), int(rng.integers(0, 3)), 90.0, (0.15, 0.85))
    if cuts:
        fluke *= 1.0 - _fill(size, cuts)
    alpha = np.maximum(fluke, _fill(size, [stock]))
    rgb = np.empty(size + (3,), np.float32)
    rgb[:] = (0.08, 0.08, 0.09)
    field = _noise(rng, size, (5, 10))
    white_share = rng.uniform(0.25, 0.85)
    pattern = (field > np.quantile(field[fluke > 0.5], 1 - white_share)).astype(np.float32)
    pattern = cv2.GaussianBlur(pattern, (0, 0), 1.2) * fluke
    pattern *= 1.0 - _stroke(size, edges, 9)  # the dark trailing-edge margin
    _paint(rgb, pattern, np.array([0.92, 0.92, 0.90], np.float32))
    _paint(rgb, _spots(rng, fluke, int(rng.integers(1, 4)), 400, (0.02, 0.04)), np.array([0.1, 0.1, 0.1], np.float32))
    _paint(rgb, _scars(rng, fluke, int(rng.integers(1, 3)), 400), np.array([0.8, 0.8, 0.8], np.float32))
    return _finish(rgb, alpha, wl)


DRAWERS: dict[str, Callable[[np.random.Generator], Template]] = {
    "bottlenose_dolphin": _bottlenose,
    "killer_whale": _killer_whale,
    "humpback_whale": _humpback_whale,
    "beluga": _beluga,
    "fin_whale": _fin_whale,
}


@lru_cache(maxsize=64)
def _template(seed: int, index: int, species: str) -> Template:
    """The individual's appearance, from its own seed (cached: a worker renders its photos in a row)."""
    return DRAWERS[species](np.random.default_rng([seed, 1, index]))


# ----------------------------------------------------------------------------------------------
# Photo: sea scene, the animal posed and lit, waves, spray, camera effects
# ----------------------------------------------------------------------------------------------


def _image_size(rng: np.random.Generator, demo: Config) -> tuple[int, int]:
    """(width, height): random long side in [min_size, max_size] and a random aspect."""
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.8))))
    long_side = int(rng.integers(demo.min_size, demo.max_size + 1))
    short = max(demo.min_size, round(long_side / max(aspect, 1 / aspect)))
    return (long_side, short) if aspect >= 1 else (short, long_side)


WATER = np.array([[0.05, 0.18, 0.30], [0.06, 0.25, 0.30], [0.12, 0.20, 0.22],
                  [0.03, 0.10, 0.20], [0.15, 0.27, 0.33], [0.20, 0.24, 0.26]], np.float32)


def _sea(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Sea scene of w x h: drawn at half resolution (smooth anyway, 4x cheaper), then upsampled."""
    small = _sea_small(rng, (w + 1) // 2, (h + 1) // 2)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _sea_small(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Sea scene: optional sky above a tilted horizon, water gradient, streaky waves and glints."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    has_sky = rng.random() < 0.45
    horizon = rng.uniform(0.05, 0.3) * h if has_sky else -rng.uniform(0.2, 1.5) * h
    horizon = (horizon + np.tan(np.radians(rng.uniform(-4, 4))) * (xx - w / 2)).astype(np.float32)
    sky = np.clip(rng.normal([0.62, 0.72, 0.82], 0.08), 0, 1).astype(np.float32)
    deep = np.clip(WATER[rng.integers(len(WATER))] * np.float32(rng.uniform(0.7, 1.3)), 0, 1)
    far = 0.55 * deep + 0.45 * sky
    t = np.clip((yy - horizon) / (h - horizon + 1e-3), 0, 1)  # 0 at the horizon, 1 at the bottom
    depth_mix = (t ** 0.5)[..., None]
    water = far * (1 - depth_mix) + deep * depth_mix
    waves = (_noise(rng, (h, w), (h // 3, w // 10)) * 0.5 + _noise(rng, (h, w), (h // 8, w // 24)) * 0.5
             + _noise(rng, (h, w), (h // 30, w // 75)) * 0.5)
    strength = rng.uniform(0.08, 0.22) * (0.4 + t)
    water = water * (1 + strength[..., None] * waves[..., None])
    glint = np.clip((waves - rng.uniform(1.2, 2.0)) * 1.5, 0, 1) * (0.3 + t)
    water = water + glint[..., None] * (1.0 - water) * rng.uniform(0.4, 0.9)
    if not has_sky:
        return water.astype(np.float32)
    clouds = _noise(rng, (h, w), (3, 6))
    sky_img = sky * (1 + 0.08 * clouds[..., None]) * (1 - 0.25 * np.clip(yy / h, 0, 1))[..., None]
    is_sky = np.clip(horizon - yy + 0.5, 0, 1)[..., None]
    return (sky_img * is_sky + water * (1 - is_sky)).astype(np.float32)


def _sheen(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Wet-skin highlight along the top contour of the animal, of random width and strength."""
    k = int(rng.integers(3, 10))
    below = np.zeros_like(alpha)
    below[k:] = alpha[:-k]
    rim = cv2.GaussianBlur(np.clip(alpha - below, 0, 1), (0, 0), k / 2) * alpha
    return rim * rng.uniform(0.0, 0.45)


def _light_animal(tpl: Template, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This photo's view of the animal: lighting, wet sheen, and waves cutting the waterline.

    Returns (rgb, alpha, foam) on the template canvas.
    """
    h, w = tpl.alpha.shape
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    shade = rng.uniform(0.75, 1.2) * (1.0 + rng.uniform(0.0, 0.35) * (0.5 - yy))
    rgb = tpl.rgb * shade[..., None]
    rgb = rgb * (1 + 0.03 * _noise(rng, (h, w), (h // 10, w // 10))[..., None])
    rgb = rgb + _sheen(tpl.alpha, rng)[..., None] * (1.0 - rgb)
    xs = np.arange(w, dtype=np.float32)
    level = h * rng.uniform(0.0, 0.12)
    swell = rng.uniform(1, 6) * np.sin(2 * np.pi * xs / rng.uniform(40, 160) + rng.uniform(0, 6.3))
    chop = _noise(rng, (1, w), (2, w // 12))[0] * rng.uniform(1, 5)
    line = h - level - swell - chop
    below = np.clip(np.arange(h, dtype=np.float32)[:, None] - line[None, :] + 0.5, 0, 1)
    alpha = tpl.alpha * (1.0 - below)
    band = np.exp(-np.abs(np.arange(h, dtype=np.float32)[:, None] - line[None, :]) / rng.uniform(2, 6))
    foam = np.clip(band * (0.5 + 0.5 * _noise(rng, (h, w), (h // 10, w // 10))), 0, 1)
    foam *= cv2.dilate(tpl.alpha, np.ones((5, 15), np.uint8)) * rng.uniform(0.1, 0.6)
    return np.clip(rgb, 0, 1), alpha, foam


def _pose(rng: np.random.Generator, shape: tuple[int, int], w: int, h: int) -> tuple[float, bool, float, float]:
    """(angle in degrees, mirrored, x scale, y scale) so the animal covers 10-60% of the frame."""
    angle = float(rng.uniform(-14, 14))
    mirror = bool(rng.random() < 0.5)
    stretch = float(rng.uniform(0.85, 1.1))  # viewing angle: the back looks shorter or longer
    th, tw = shape
    cos, sin = abs(np.cos(np.radians(angle))), abs(np.sin(np.radians(angle)))
    rw, rh = tw * stretch * cos + th * sin, tw * stretch * sin + th * cos
    area = rng.uniform(0.12, 0.6) * w * h / 0.8  # the tight box fills about 80% of the rotated rectangle
    scale = min(np.sqrt(area / (rw * rh)), 0.96 * w / rw, 0.96 * h / rh)
    return angle, mirror, scale * stretch, scale


def _place(layers: list[np.ndarray], rng: np.random.Generator, w: int,
           h: int) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Scale, mirror, rotate and position the animal's layers (same canvas, <= 4 channels each) in a w x h frame.

    Returns the layers warped into the window of the frame that holds the animal, and the
    window's top-left corner (x, y): compositing only there is much cheaper than the full frame.
    """
    angle, mirror, sx, sy = _pose(rng, layers[0].shape[:2], w, h)
    th, tw = layers[0].shape[:2]
    nw, nh = max(2, round(tw * sx)), max(2, round(th * sy))
    m = cv2.getRotationMatrix2D((nw / 2, nh / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    rw, rh = nw * cos + nh * sin, nw * sin + nh * cos
    cx = rng.uniform(rw / 2 + 1, max(rw / 2 + 1, w - rw / 2 - 1))
    cy = rng.uniform(rh / 2 + 1, max(rh / 2 + 1, h - rh / 2 - 1))
    xa, ya = max(0, int(cx - rw / 2) - 2), max(0, int(cy - rh / 2) - 2)
    xb, yb = min(w, int(np.ceil(cx + rw / 2)) + 2), min(h, int(np.ceil(cy + rh / 2)) + 2)
    m[:, 2] += (cx - nw / 2 - xa, cy - nh / 2 - ya)
    interp = cv2.INTER_AREA if sx < 1 else cv2.INTER_LINEAR
    placed = []
    for layer in layers:
        layer = cv2.resize(layer, (nw, nh), interpolation=interp)
        if mirror:  # the animal seen from its other side: the whole animal and its marks mirrored
            layer = np.ascontiguousarray(layer[:, ::-1])
        placed.append(cv2.warpAffine(layer, m, (xb - xa, yb - ya), flags=cv2.INTER_LINEAR, borderValue=0))
    return placed, (xa, ya)


def _spray(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    """White spray blobs near the animal's waterline, partly over it (in place)."""
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(1, 4))):
        r = max(4, int((y1 - y0) * rng.uniform(0.12, 0.35)))
        cx = int(rng.uniform(x0, x1))
        cy = int(rng.uniform(y0 + 0.5 * (y1 - y0), y1 + 0.2 * r))
        ya, yb, xa, xb = max(0, cy - r), min(h, cy + r), max(0, cx - r), min(w, cx + r)
        if yb <= ya or xb <= xa:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        grain = _noise(rng, (yb - ya, xb - xa), (6, 6))
        blob = np.clip(1 - dist, 0, 1) ** 0.8 * np.clip(0.6 + 0.6 * grain, 0, 1)
        blob = cv2.GaussianBlur(blob, (0, 0), max(1.0, r / 8)) * rng.uniform(0.35, 0.8)
        _paint(img[ya:yb, xa:xb], blob, WHITE)


def _tone_curve(rng: np.random.Generator) -> np.ndarray:
    """Per-channel 8-bit lookup table: colour cast, exposure (gamma), contrast and haze."""
    x = np.arange(256, dtype=np.float64)[:, None] / 255
    y = np.clip(x * np.clip(rng.normal(1.0, 0.07, 3), 0.8, 1.2), 0, 1) ** rng.uniform(0.75, 1.3)
    y = (y - 0.5) * rng.uniform(0.8, 1.2) + 0.5
    if rng.random() < 0.3:
        haze = rng.uniform(0.1, 0.3)
        y = y * (1 - haze) + haze * 0.75
    return (np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(1, 256, 3)


def _camera(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, colour cast, exposure, contrast, haze and sensor noise; returns uint8 RGB."""
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if rng.random() < 0.45:
        sigma = rng.uniform(0.4, 1.2) * max(img8.shape[:2]) / 640
        img8 = cv2.GaussianBlur(img8, (0, 0), sigma)
    img8 = cv2.LUT(img8, _tone_curve(rng))
    noise = rng.standard_normal(img8.shape[:2], np.float32) * np.float32(rng.uniform(0.0, 6.0))
    return np.clip(img8 + noise[..., None], 0, 255).astype(np.uint8)


def render_photo(seed: int, individual: Individual, photo: int, demo: Config) -> tuple[np.ndarray, tuple, int]:
    """Draw one photo of `individual`: (RGB uint8 image, tight animal box, JPEG quality)."""
    tpl = _template(seed, individual.index, individual.species)
    rng = np.random.default_rng([seed, 2, individual.index, photo])
    w, h = _image_size(rng, demo)
    scene = _sea(rng, w, h)
    rgb, alpha, foam = _light_animal(tpl, rng)
    (rgb, masks), (xa, ya) = _place([rgb, np.dstack([alpha, foam])], rng, w, h)
    window = scene[ya:ya + rgb.shape[0], xa:xa + rgb.shape[1]]  # a view: painted in place
    window += masks[..., :1] * (rgb - window)
    _paint(window, np.clip(masks[..., 1], 0, 1), WHITE)
    ys, xs = np.nonzero(masks[..., 0] > 0.5)
    box = (xa + int(xs.min()), ya + int(ys.min()), xa + int(xs.max()) + 1, ya + int(ys.max()) + 1)
    if rng.random() < 0.35:
        _spray(scene, rng, box)
    quality = int(rng.integers(demo.jpeg_quality_min, demo.jpeg_quality_max + 1))
    return _camera(scene, rng), box, quality


def _render_job(job: tuple[int, Photo, dict, str]) -> dict:
    """Worker: render one photo, write its JPEG atomically, return its answer-file row."""
    seed, photo, demo, out_dir = job
    demo_cfg = Config(demo)
    img, box, quality = render_photo(seed, photo.individual, photo.photo, demo_cfg)
    path = Path(out_dir) / f"{photo.split}_images" / photo.image
    write_bytes(path, write_jpeg(path, img, quality))
    return {"image": photo.image, "split": photo.split, "x_min": box[0], "y_min": box[1],
            "x_max": box[2], "y_max": box[3]}


# ----------------------------------------------------------------------------------------------
# Writing the set
# ----------------------------------------------------------------------------------------------


def _stamp(demo: Config) -> dict:
    """What the files depend on: the demo section (less worker count) and the generator version."""
    section = {k: v for k, v in demo.to_dict().items() if k not in STAMP_IGNORED}
    return {"generator_version": GENERATOR_VERSION, "demo": section}


def _render_all(photos: list[Photo], demo: Config, out_dir: Path) -> pd.DataFrame:
    """Render every photo, in `demo.workers` processes, with a progress bar."""
    jobs = [(demo.seed, p, demo.to_dict(), str(out_dir)) for p in photos]
    bar = dict(total=len(jobs), desc="demo images", unit="img")
    if demo.workers <= 1:
        return pd.DataFrame([_render_job(j) for j in tqdm(jobs, **bar)])
    # spawn: the caller may hold threads (torch) that a forked child would inherit half-locked
    with multiprocessing.get_context("spawn").Pool(demo.workers) as pool:
        rows = list(tqdm(pool.imap(_render_job, jobs, chunksize=8), **bar))
    return pd.DataFrame(rows)


def _sample_submission(rng: np.random.Generator, test: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Kaggle-like placeholder predictions: new_individual plus four train ids."""
    ids = train["individual_id"].unique()
    preds = [" ".join([NEW_ID, *rng.choice(ids, size=min(4, len(ids)), replace=False)]) for _ in range(len(test))]
    return pd.DataFrame({"image": test["image"].to_numpy(), "predictions": preds})


def _tables(photos: list[Photo], seed: int) -> dict[str, pd.DataFrame]:
    """train.csv, test_labels.csv and sample_submission.csv, in the (shuffled) photo order."""
    train = pd.DataFrame([{"image": p.image, "species": p.individual.species,
                           "individual_id": p.individual.individual_id}
                          for p in photos if p.split == "train"])
    test = pd.DataFrame([{"image": p.image,
                          "individual_id": NEW_ID if p.individual.is_new else p.individual.individual_id,
                          "true_id": p.individual.individual_id, "species": p.individual.species}
                         for p in photos if p.split == "test"],
                        columns=["image", "individual_id", "true_id", "species"])
    sub = _sample_submission(np.random.default_rng([seed, 3]), test, train)
    return {"train": train, "test_labels": test, "sample_submission": sub}


def _tile(path: Path, caption: str, size: tuple[int, int] = (220, 165)) -> np.ndarray:
    """A photo letterboxed to `size` (w, h) under a caption strip."""
    img, _ = read_image(path)
    w, h = size
    scale = min(w / img.shape[1], h / img.shape[0])
    small = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                       interpolation=cv2.INTER_AREA)
    tile = np.full((h + 22, w, 3), 255, np.uint8)
    y, x = 22 + (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    tile[y:y + small.shape[0], x:x + small.shape[1]] = small
    cv2.putText(tile, caption, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def _sample_grid(photos: list[Photo], out_dir: Path, n_rows: int = 5, n_cols: int = 4) -> bytes:
    """PNG of up to `n_cols` photos of each of `n_rows` individuals (different species first)."""
    by_ind: dict[int, list[Photo]] = {}
    for p in sorted(photos, key=lambda p: (p.individual.index, p.photo)):
        by_ind.setdefault(p.individual.index, []).append(p)
    ranked = sorted(by_ind.values(), key=lambda ps: (-min(len(ps), n_cols), ps[0].individual.index))
    chosen, species = [], set()
    for ps in ranked:  # one individual per species, then fill up
        if ps[0].individual.species not in species:
            chosen.append(ps)
            species.add(ps[0].individual.species)
    chosen += [ps for ps in ranked if ps not in chosen]
    rows = []
    for ps in chosen[:n_rows]:
        tiles = [_tile(out_dir / f"{p.split}_images" / p.image,
                       f"{p.individual.individual_id} {p.individual.species[:12]} {p.split}")
                 for p in ps[:n_cols]]
        tiles += [np.full_like(tiles[0], 255)] * (n_cols - len(tiles))
        rows.append(np.hstack([np.pad(t, ((3, 3), (3, 3), (0, 0)), constant_values=255) for t in tiles]))
    grid = np.vstack(rows)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding of the demo sample grid failed")
    return buf.tobytes()


def _remove_stale(out_dir: Path, photos: list[Photo]) -> None:
    """Delete JPEGs left by an earlier generation that are not part of this set."""
    keep = {(p.split, p.image) for p in photos}
    for split in ("train", "test"):
        for path in (out_dir / f"{split}_images").glob("*.jpg"):
            if (split, path.name) not in keep:
                path.unlink()


def is_complete(out_dir: str | Path, demo: Config) -> bool:
    """True when `out_dir` holds a finished demo set generated from this demo config."""
    out_dir = Path(out_dir)
    meta = out_dir / META_FILE
    return (out_dir / "train.csv").exists() and meta.exists() and read_json(meta) == _stamp(demo)


def generate(cfg: Config, out_dir: str | Path) -> Path:
    """Generate the demo set described by `cfg.demo` into `out_dir` (skipped when already there).

    `train.csv` is written last, so its presence (with a matching `demo_meta.json`) means the
    set is complete; an interrupted run is redone from the start.
    """
    out_dir = Path(out_dir)
    demo = cfg.demo
    if is_complete(out_dir, demo):
        return out_dir
    if (out_dir / "train.csv").exists() and not (out_dir / META_FILE).exists():
        raise UserError(f"{out_dir} holds a train.csv that the demo generator did not write; "
                        "choose another output folder for the demo set")
    (out_dir / "train.csv").unlink(missing_ok=True)
    photos = plan(demo)
    boxes = _render_all(photos, demo, out_dir)
    _remove_stale(out_dir, photos)
    tables = _tables(photos, demo.seed)
    write_csv(out_dir / "boxes.csv", boxes[["image", "split", "x_min", "y_min", "x_max", "y_max"]])
    write_csv(out_dir / "test_labels.csv", tables["test_labels"])
    write_csv(out_dir / "sample_submission.csv", tables["sample_submission"])
    write_bytes(out_dir / "demo_sample.png", _sample_grid(photos, out_dir))
    write_json(out_dir / META_FILE, _stamp(demo))
    write_csv(out_dir / "train.csv", tables["train"])
    return out_dir


def summary(out_dir: str | Path) -> dict:
    """Counts of a generated set: images and individuals per split, new share of test."""
    out_dir = Path(out_dir)
    train = pd.read_csv(out_dir / "train.csv")
    test = pd.read_csv(out_dir / "test_labels.csv")
    return {
        "train_images": len(train),
        "train_individuals": int(train["individual_id"].nunique()),
        "test_images": len(test),
        "test_new_images": int((test["individual_id"] == NEW_ID).sum()),
        "new_individuals": int(test.loc[test["individual_id"] == NEW_ID, "true_id"].nunique()),
        "species": train["species"].value_counts().to_dict(),
    }


def _main(cfg: Config, args: argparse.Namespace) -> None:
    out = generate(cfg, args.out or cfg.paths.demo)
    print(f"demo set in {out}: {summary(out)}")


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="", help="output folder (default: paths.demo)")


if __name__ == "__main__":
    from whaleid.cli import run_stage

    run_stage(__doc__.splitlines()[0], _main, _add_args)
