"""Local-feature re-ranking: geometric verification of the kNN candidates (HotSpotter-style).

The embedding ranks individuals by one global vector per photo. Photo-ID researchers match
*marks* instead: the same callosity patch, scar or notch seen at the same place. This module
checks that directly for the few best candidates of each query:

1. RootSIFT keypoints on a contrast-equalised (CLAHE) grey crop, upscaled so that small marks
   yield keypoints (`upscale`), at most `features` per image.
2. Each query descriptor is matched to its two nearest descriptors in every gallery photo of the
   candidate individuals (one batched matrix product per query), kept by Lowe's ratio test. With
   `photos` > 0 only the individual's photos closest to the query by embedding are matched: the
   product is most of the cost, and the best-matching photo is nearly always among them.
3. A geometry is fitted to the kept matches; its inlier count is the evidence that the two photos
   show the same marks. `similarity` (rotation, scale, shift; fitted by RANSAC) suits fins and
   flukes seen at any tilt and distance. `translation` (shift only) suits photos already aligned
   to one pose, like the right whale head crops: every match's own shift is tried as the model
   (exhaustive, so deterministic) and the one most matches agree with wins. On such photos it
   beats the similarity fit, whose RANSAC also accepts degenerate transforms (scale near 0, many
   query keypoints onto one gallery blob) between unrelated photos.
4. Candidate score = embedding score + `weight` * log(1 + max inliers over that individual's
   photos). Candidates are re-sorted by it; the new_individual threshold is then calibrated on
   these scores like any other (stage 04 does it on the validation fold).

Features of an image that cannot be read are empty (zero inliers, score unchanged) and the image
is reported, never dropped. Descriptors are kept as uint8 (RootSIFT x 255, rounded): 128 bytes a
keypoint, a quarter of float32: 51,033 Happywhale train crops at 500 keypoints hold 3.3 GB, the
27,956 test crops 1.8 GB more.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

DESC_DIM = 128
QUANT = 255.0  # RootSIFT components lie in [0, 1]; stored as round(255 x), uint8


@dataclass
class LocalFeatures:
    """Keypoints (x, y in pixels of the upscaled image) and RootSIFT descriptors of one image."""

    xy: np.ndarray  # (n, 2) float32
    desc: np.ndarray  # (n, 128) uint8: quantize(RootSIFT)

    @classmethod
    def empty(cls) -> LocalFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, DESC_DIM), np.uint8))


def root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, square root. The result has unit L2
    norm, so the Hellinger kernel of SIFT histograms becomes a plain dot product."""
    desc = np.asarray(desc, dtype=np.float32)
    return np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7))


def quantize(desc: np.ndarray) -> np.ndarray:
    """Unit-length non-negative descriptors as uint8 (x 255, rounded; error <= 0.002 a component)."""
    return np.clip(np.rint(np.asarray(desc, dtype=np.float32) * QUANT), 0, 255).astype(np.uint8)


def as_float(desc: np.ndarray) -> np.ndarray:
    """float32 descriptors from stored uint8 ones (float input is returned as float32)."""
    desc = np.asarray(desc)
    return desc.astype(np.float32) / np.float32(QUANT) if desc.dtype == np.uint8 else desc.astype(np.float32)


def extract(image: np.ndarray | None, features: int = 500, upscale: float = 1.5) -> LocalFeatures:
    """RootSIFT features of a BGR or grey uint8 image (empty for None or a featureless image)."""
    if image is None or image.size == 0:
        return LocalFeatures.empty()
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if upscale != 1.0:
        grey = cv2.resize(grey, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_CUBIC)
    grey = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey)
    keypoints, desc = cv2.SIFT_create(nfeatures=features).detectAndCompute(grey, None)
    if desc is None or not keypoints:
        return LocalFeatures.empty()
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32)
    return LocalFeatures(xy, quantize(root_sift(desc)))


def extract_files(paths: Sequence[str], features: int, upscale: float, workers: int = 2,
                  desc: str = "local features", mirror: bool = False) -> tuple[list[LocalFeatures], list[str]]:
    """Features of each file (threads: OpenCV releases the GIL), and the paths that could not be read.
    With `mirror`, the features of the left-right mirrored image (keypoints in its own frame)."""
    def one(path: str) -> LocalFeatures | None:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is not None and mirror:
            image = cv2.flip(image, 1)
        return None if image is None else extract(image, features, upscale)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        out = list(tqdm(pool.map(one, paths), total=len(paths), desc=desc, unit="img", leave=False))
    bad = [str(p) for p, f in zip(paths, out) if f is None]
    return [LocalFeatures.empty() if f is None else f for f in out], bad


def ratio_matches(query: np.ndarray, gallery: list[np.ndarray], ratio: float = 0.8,
                  device: str | None = None) -> list[np.ndarray]:
    """Lowe's ratio test of `query` descriptors against each gallery descriptor set, in one product.

    Returns, per gallery set, an (m, 2) int array of (query index, gallery index) pairs whose
    nearest gallery descriptor is closer than `ratio` times the second nearest (L2 distance,
    d^2 = |q|^2 + |g|^2 - 2 q.g). A set with fewer than 2 descriptors yields no matches.

    Stored (uint8) descriptors are compared in their integer units: every product, sum and
    distance is then an integer or a half, below 2^23 in magnitude (128 x 255^2 at most), which
    float32 holds exactly whatever the order of summation, so the matches are the same on the CPU
    and on a GPU (`device`, default the CPU), bit for bit. Float descriptors are compared as they are.
    """
    import torch

    empty = np.zeros((0, 2), dtype=np.int64)
    if len(query) == 0 or not gallery:
        return [empty for _ in gallery]
    device = torch.device(device or "cpu")
    lengths = [len(g) for g in gallery]
    width = max(2, max(lengths))
    exact = np.asarray(query).dtype == np.uint8 and all(np.asarray(g).dtype == np.uint8 for g in gallery)
    padded = np.zeros((len(gallery), width, DESC_DIM), dtype=np.uint8 if exact else np.float32)
    for i, g in enumerate(gallery):
        padded[i, : len(g)] = g if exact else as_float(g)
    # uint8 crosses to the device (a quarter of the bytes) and becomes float32 there
    g = torch.from_numpy(padded.reshape(-1, DESC_DIM)).to(device).float()
    q = torch.from_numpy(np.ascontiguousarray(query) if exact else as_float(query)).to(device).float()
    # Half the squared distance, shifted by |q|^2/2 (the same for every gallery descriptor of a
    # query descriptor, so it does not change which is nearest): |g|^2/2 - q.g, in one fused
    # product; padding never wins. Float32 even inside a caller's autocast (exactness).
    with torch.autocast(device.type, enabled=False):
        half = torch.addmm(0.5 * (g * g).sum(1)[None], q, g.T, alpha=-1.0).view(len(query), len(gallery), width)
    if min(lengths) < width:
        valid = torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        half.masked_fill_(~valid[None], float("inf"))
    low, idx = half.topk(2, dim=2, largest=False)
    qn = 0.5 * (q * q).sum(1)[:, None]
    d1, d2 = (2.0 * (low[..., 0] + qn)).clamp_min(0), (2.0 * (low[..., 1] + qn)).clamp_min(0)
    good = (d1 < (ratio ** 2) * d2) & torch.isfinite(low[..., 1])  # the second neighbour must be real
    good, idx = good.cpu().numpy(), idx[..., 0].cpu().numpy()
    out = []
    for i in range(len(gallery)):
        hit = np.flatnonzero(good[:, i])
        out.append(np.stack([hit, idx[hit, i]], axis=1) if len(hit) else empty)
    return out


GEOMETRIES = ("similarity", "translation")


def count_translation_inliers(src: np.ndarray, dst: np.ndarray, px: float) -> int:
    """The most matches that one shift src -> dst explains within `px` (each match's own shift
    tried as the model; 0 with no matches)."""
    if len(src) == 0:
        return 0
    shift = np.asarray(dst, np.float32) - np.asarray(src, np.float32)
    d2 = ((shift[:, None, :] - shift[None, :, :]) ** 2).sum(axis=2)
    return int((d2 < px * px).sum(axis=1).max())


def count_inliers(src: np.ndarray, dst: np.ndarray, ransac_px: float, geometry: str = "similarity") -> int:
    """Inliers of the best transform src -> dst of `geometry`: a RANSAC similarity transform (0
    with fewer than 3 matches), or the best-supported translation."""
    if geometry == "translation":
        return count_translation_inliers(src, dst, ransac_px)
    if geometry != "similarity":
        raise ValueError(f"unknown geometry {geometry!r}; valid: {list(GEOMETRIES)}")
    if len(src) < 3:
        return 0
    _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_px,
                                          maxIters=500, confidence=0.99)
    return 0 if mask is None else int(mask.sum())


def verify(query: LocalFeatures, gallery: list[LocalFeatures], ratio: float = 0.8,
           ransac_px: float = 6.0, geometry: str = "similarity", device: str | None = None) -> np.ndarray:
    """Geometric-verification inlier count of `query` against each gallery image (descriptors
    matched on `device`, the geometry fitted on the CPU)."""
    pairs = ratio_matches(query.desc, [g.desc for g in gallery], ratio, device)
    return np.array([count_inliers(query.xy[p[:, 0]], g.xy[p[:, 1]], ransac_px, geometry)
                     for p, g in zip(pairs, gallery)], dtype=np.int64)


def combine(scores: np.ndarray, inliers: np.ndarray, weight: float) -> np.ndarray:
    """Re-ranking score: embedding score + weight * log(1 + inliers)."""
    return np.asarray(scores, dtype=np.float32) + np.float32(weight) * np.log1p(inliers).astype(np.float32)


def candidate_inliers(
    labels: np.ndarray, query_feats: Sequence[LocalFeatures], gallery_feats: Sequence[LocalFeatures],
    gallery_labels: np.ndarray, ratio: float = 0.8, ransac_px: float = 6.0, desc: str = "verify",
    photos: int = 0, query_emb: np.ndarray | None = None, gallery_emb: np.ndarray | None = None,
    mirrored: Sequence[LocalFeatures] | None = None, geometry: str = "similarity", device: str | None = None,
) -> np.ndarray:
    """(Q, C) inlier counts: for each query and candidate individual (`labels`, codes < 0 are
    padding and get 0), the best geometric verification over that individual's gallery images.

    With `photos` > 0 and the embeddings given (unit rows aligned with the queries and the gallery),
    only each individual's `photos` gallery images most similar to the query are verified. With
    `mirrored` (the features of each query's mirror image), a gallery image counts the better of
    the two views: a fin photographed from its other side shows its trailing-edge notches mirrored.
    Descriptors are matched on `device` (default the CPU; the same matches on either).
    """
    labels = np.asarray(labels)
    gallery_labels = np.asarray(gallery_labels)
    order = np.argsort(gallery_labels, kind="stable")
    sorted_labels = gallery_labels[order]
    limit = photos > 0 and query_emb is not None and gallery_emb is not None
    out = np.zeros(labels.shape, dtype=np.int64)
    for q in tqdm(range(len(labels)), desc=desc, unit="query", leave=False):
        rows = []
        for code in labels[q]:
            lo, hi = np.searchsorted(sorted_labels, [code, code + 1]) if code >= 0 else (0, 0)
            r = order[lo:hi]
            if limit and len(r) > photos:  # photos without features (unreadable) come last
                sims = np.where([len(gallery_feats[i].desc) > 0 for i in r], gallery_emb[r] @ query_emb[q], -np.inf)
                r = r[np.argsort(-sims, kind="stable")[:photos]]
            rows.append(r)
        flat = np.concatenate(rows)
        candidates = [gallery_feats[i] for i in flat]
        counts = verify(query_feats[q], candidates, ratio, ransac_px, geometry, device)
        if mirrored is not None:
            counts = np.maximum(counts, verify(mirrored[q], candidates, ratio, ransac_px, geometry, device))
        ends = np.cumsum([len(r) for r in rows])
        for j, (r, end) in enumerate(zip(rows, ends)):
            if len(r):
                out[q, j] = counts[end - len(r) : end].max()
    return out


def apply(labels: np.ndarray, scores: np.ndarray, inliers: np.ndarray, weight: float,
          top: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates re-sorted by `combine` (padding, score -inf, stays last): (labels, scores,
    inliers), each (Q, top)."""
    new = np.where(np.isfinite(scores), combine(scores, inliers, weight), -np.inf).astype(np.float32)
    order = np.argsort(-new, axis=1, kind="stable")[:, :top]
    return tuple(np.take_along_axis(np.asarray(a), order, axis=1) for a in (labels, new, inliers))
