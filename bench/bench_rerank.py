"""Benchmark stage 04's local-feature re-ranking: verification time per query, on each device.

What is timed is `rerank.candidate_inliers`, the call stage 04 makes: for each query, RootSIFT
matches (Lowe's ratio test, one descriptor product per query) against every photo of its candidate
individuals, then the geometry fitted to the kept matches. The product runs on the device
(`device`: the CPU, and a CUDA GPU when torch sees one), the geometry on the CPU. Both devices
run the same queries, alternated, and must give the same inlier counts (the product is exact in
integer units, so they do, bit for bit).

The photos are generated: each individual is a pattern of bright marks on a dark noisy ground
(like callosity patches seen from above), each of its photos a shifted, re-lit, re-noised view of
it, as the right whale head crops are; queries are further views. Defaults follow the right whale
overlay: 224 px crops enlarged 1.5x, at most 500 keypoints, 20 candidates x 4 photos a query (80
photos, ~40,000 descriptors), shift-only verification at 12 px, ratio 0.85.
Usage: python bench/bench_rerank.py [--queries 100] [--individuals 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_embed  # noqa: E402  (bench/ is on the path: the script's own folder)

from whaleid import rerank  # noqa: E402
from whaleid.io import write_text  # noqa: E402


def pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """One individual's marks: bright ellipses on a dark noisy ground, 2 px larger on each side
    than the views cut from it may shift."""
    img = rng.integers(20, 60, (size, size), dtype=np.uint8)
    for _ in range(30):
        centre = tuple(int(v) for v in rng.integers(8, size - 8, 2))
        axes = tuple(int(v) for v in rng.integers(3, 14, 2))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(140, 255)), -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def view(base: np.ndarray, rng: np.random.Generator, size: int, shift: int) -> np.ndarray:
    """A photo of the pattern: a `size` px window shifted by up to `shift` px, re-lit and re-noised."""
    dy, dx = (int(v) for v in rng.integers(0, 2 * shift + 1, 2))
    crop = base[dy : dy + size, dx : dx + size].astype(np.float32)
    crop = crop * rng.uniform(0.8, 1.2) + rng.uniform(-15, 15) + rng.normal(0, 6, crop.shape)
    return np.clip(crop, 0, 255).astype(np.uint8)


def make_features(args: argparse.Namespace) -> tuple[list, np.ndarray, list, np.ndarray]:
    """(gallery features, gallery labels, query features, query labels)."""
    rng = np.random.default_rng(args.seed)
    bases = [pattern(rng, args.size + 2 * args.shift) for _ in range(args.individuals)]
    gallery_labels = np.repeat(np.arange(args.individuals), args.photos)
    query_labels = rng.integers(0, args.individuals, args.queries)
    images = [view(bases[i], rng, args.size, args.shift) for i in gallery_labels]
    images += [view(bases[i], rng, args.size, args.shift) for i in query_labels]
    feats = [rerank.extract(img, args.features, args.upscale) for img in images]
    return feats[: len(gallery_labels)], gallery_labels, feats[len(gallery_labels) :], query_labels


def candidates(query_labels: np.ndarray, individuals: int, n: int, seed: int) -> np.ndarray:
    """Each query's candidate individuals: its own and n - 1 others, in a random order."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for true in query_labels:
        others = rng.choice(np.setdiff1d(np.arange(individuals), [true]), n - 1, replace=False)
        out.append(rng.permutation(np.concatenate([[true], others])))
    return np.array(out)


def machine() -> str:
    """bench_embed's machine line (CPU model, cores, GPU, torch, load), with torch's thread count."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return f"{bench_embed.machine(device)}, {torch.get_num_threads()} torch threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--individuals", type=int, default=120)
    p.add_argument("--photos", type=int, default=4, help="photos an individual (all verified: rerank.photos)")
    p.add_argument("--candidates", type=int, default=20, help="rerank.candidates")
    p.add_argument("--size", type=int, default=224, help="crop size in px")
    p.add_argument("--shift", type=int, default=10, help="largest shift between two views, px")
    p.add_argument("--features", type=int, default=500, help="rerank.features")
    p.add_argument("--upscale", type=float, default=1.5, help="rerank.upscale")
    p.add_argument("--ratio", type=float, default=0.85, help="rerank.ratio")
    p.add_argument("--geometry", default="translation", choices=list(rerank.GEOMETRIES))
    p.add_argument("--ransac-px", type=float, default=12.0)
    p.add_argument("--devices", default="auto", help="comma-separated torch devices; auto: cpu, and cuda if present")
    p.add_argument("--repeats", type=int, default=2, help="alternated rounds per device (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rerank.md"))
    args = p.parse_args()
    if args.candidates > args.individuals:
        p.error("--candidates cannot exceed --individuals")
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto"
               else list(dict.fromkeys(args.devices.split(","))))

    start = time.perf_counter()
    gallery, gallery_labels, queries, query_labels = make_features(args)
    extract_s = time.perf_counter() - start
    labels = candidates(query_labels, args.individuals, args.candidates, args.seed)
    descriptors = np.mean([len(f.desc) for f in gallery]) * args.photos * args.candidates
    opts = {"ratio": args.ratio, "ransac_px": args.ransac_px, "geometry": args.geometry}

    rerank.candidate_inliers(labels[:2], queries[:2], gallery, gallery_labels, **opts, device=devices[-1])  # warm-up
    best: dict[str, float] = {}
    counts: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for device in devices:
            t0 = time.perf_counter()
            counts[device] = rerank.candidate_inliers(labels, queries, gallery, gallery_labels, **opts,
                                                      device=device, desc=f"verify ({device})")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[device] = min(best.get(device, np.inf), time.perf_counter() - t0)
    same = all(np.array_equal(counts[d], counts[devices[0]]) for d in devices)
    ref = counts[devices[0]]
    own = ref[labels == query_labels[:, None]]
    other = ref[labels != query_labels[:, None]]

    rows = [f"| {d} | {1000 * best[d] / args.queries:.1f} | {args.queries / best[d]:.1f} | "
            f"{best[devices[0]] / best[d]:.2f}x |" for d in devices]
    text = "\n".join([
        "# Re-ranking benchmark (stage 04's geometric verification)", "",
        f"- command: `{' '.join(['python bench/bench_rerank.py', *sys.argv[1:]])}`",
        f"- machine: {machine()}",
        f"- work: {args.queries} queries x {args.candidates} candidates x {args.photos} photos "
        f"({args.candidates * args.photos} photos, ~{descriptors:,.0f} gallery descriptors a query, at most "
        f"{args.features} keypoints a {args.size} px crop enlarged {args.upscale}x); ratio {args.ratio}, "
        f"{args.geometry} geometry at {args.ransac_px} px; best of {args.repeats} alternated rounds",
        f"- features of {len(gallery) + len(queries)} generated photos extracted in {extract_s:.1f} s (not timed below)",
        "",
        "| device (descriptor product) | ms a query | queries/s | vs first row |",
        "|---|---:|---:|---:|",
        *rows, "",
        f"Same inlier counts on every device: {'yes' if same else 'NO'}. "
        f"Median inliers of the true individual {np.median(own):.0f}, of the others {np.median(other):.0f} "
        f"(max {other.max()}).", "",
    ])
    print(text)
    write_text(args.out, text)
    if not same:
        sys.exit("inlier counts differ between devices")


if __name__ == "__main__":
    main()
