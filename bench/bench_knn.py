"""Benchmark stage 04's ranking at Happywhale scale against the 1st-place solution's approach.

Both sides do the same job on the same data: kNN of every query over the gallery, the score of an
individual = max cosine over its images, new_individual inserted at a threshold, ids joined into a
submission CSV written to disk.
- ours: `whaleid.knn.rank_queries`, what stage 04 calls: faiss flat inner product (exact) with
  k = --k and the vectorised per-individual max (timed together as "search"), then insertion;
- baseline (1st place): scikit-learn NearestNeighbors(metric="cosine", algorithm="brute"),
  k = --baseline-k (500), then a Python loop keeping the max per individual per query.
Competition scale: 51,033 train images x 2 flips = 102,066 gallery rows, 27,956 test queries,
512-d, ~15,587 individuals with a long-tailed image count. Data are random unit vectors.
Each side runs in its own process so its peak memory (ru_maxrss above the data) is its own.
Usage: python bench/bench_knn.py [--scale 0.1] [--k 50] [--baseline-queries 1.0]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whaleid import knn  # noqa: E402
from whaleid.io import write_csv, write_text  # noqa: E402

GALLERY_IMAGES, FLIPS, QUERIES, DIM, INDIVIDUALS = 51_033, 2, 27_956, 512, 15_587
THRESHOLD = 0.12  # random 512-d unit vectors have cosines ~N(0, 0.044): puts new_individual mid-list


BACKEND_WHAT = {
    "faiss_cpu": "faiss IndexFlatIP on the CPU",
    "torch": "torch matmul + topk on CUDA when present",
    "faiss_gpu": "faiss GpuIndexFlatIP",
}


def make_data(scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (2 rows per image), gallery labels, queries), long-tailed images per individual."""
    rng = np.random.default_rng(seed)
    n_img = max(10, round(GALLERY_IMAGES * scale))
    n_ind = max(5, round(INDIVIDUALS * scale))
    # Zipf-like: every individual has one image, the rest go to individuals with weight 1/rank^1.1.
    weights = 1.0 / np.arange(1, n_ind + 1) ** 1.1
    extra = rng.choice(n_ind, size=max(0, n_img - n_ind), p=weights / weights.sum())
    img_labels = rng.permutation(np.concatenate([np.arange(n_ind), extra])[:n_img])
    gallery = knn.l2_normalize(rng.standard_normal((n_img * FLIPS, DIM), dtype=np.float32))
    queries = knn.l2_normalize(rng.standard_normal((max(5, round(QUERIES * scale)), DIM), dtype=np.float32))
    return gallery, np.repeat(img_labels, FLIPS), queries


def ours(gallery: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, out: Path,
         backend: str = "faiss_cpu") -> tuple[list[str], dict]:
    """whaleid's path, the functions stage 04 calls: `knn.rank_queries` (exact search with `backend`,
    vectorised max per individual, deeper search where k neighbours did not settle the top 5),
    insertion, ids, CSV. The "search" phase includes the per-individual max."""
    t = {}
    t0 = time.perf_counter()
    _, ranked, agg, _, _ = knn.rank_queries(gallery, labels, queries, np.arange(len(queries)), k, 5, backend=backend)
    t["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = knn.insert_new(ranked, agg, THRESHOLD)
    names = np.array([f"id{i}" for i in range(labels.max() + 1)] + ["new_individual"], dtype=object)
    coded = names[np.where(pred == knn.NEW_LABEL, len(names) - 1, pred)]
    preds = [" ".join(row) for row in coded]
    t["aggregate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_csv(out, pd.DataFrame({"image": [f"q{i}.jpg" for i in range(len(queries))], "predictions": preds}))
    t["write"] = time.perf_counter() - t0
    return preds, t


def baseline(gallery: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int, out: Path) -> tuple[list[str], dict]:
    """The 1st-place approach: sklearn brute cosine kNN, then a Python loop per query."""
    from sklearn.neighbors import NearestNeighbors

    t = {}
    t0 = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=min(k, len(gallery)), metric="cosine", algorithm="brute").fit(gallery)
    distances, idx = nn.kneighbors(queries)
    t["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = []
    for dist_row, idx_row in zip(distances, idx):
        best: dict[int, float] = {}
        for d, j in zip(dist_row, idx_row):
            lab, sim = int(labels[j]), 1.0 - float(d)
            if lab not in best or sim > best[lab]:
                best[lab] = sim
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        row, inserted = [], False
        for lab, sim in ranked:
            if not inserted and sim < THRESHOLD:
                row.append("new_individual")
                inserted = True
            row.append(f"id{lab}")
        if not inserted:
            row.append("new_individual")
        preds.append(" ".join(row[:5]))
    t["aggregate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pd.DataFrame({"image": [f"q{i}.jpg" for i in range(len(queries))], "predictions": preds}).to_csv(out, index=False)
    t["write"] = time.perf_counter() - t0
    return preds, t


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _child(side: str, scale: float, k: int, query_share: float, queue: mp.Queue, backend: str) -> None:
    gallery, labels, queries = make_data(scale)
    queries = queries[: max(1, round(len(queries) * query_share))]
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        if side == "ours":
            ours(gallery[:FLIPS * 100], labels[:FLIPS * 100], queries[:10], k, Path(tmp) / "w.csv", backend)  # warm-up
            preds, times = ours(gallery, labels, queries, k, Path(tmp) / "submission.csv", backend)
        else:
            preds, times = baseline(gallery, labels, queries, k, Path(tmp) / "submission.csv")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"times": times, "queries": len(queries), "peak_mb": peak, "extra_mb": peak - base,
               "gallery": len(gallery), "preds_head": preds[:3]})


def run_side(side: str, scale: float, k: int, query_share: float = 1.0, backend: str = "faiss_cpu") -> dict:
    """One side in a fresh process (spawned, so memory figures are its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(side, scale, k, query_share, queue, backend))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def check_identical(n_gallery: int = 2000, n_queries: int = 500, k: int = 50, baseline_k: int = 500,
                    backend: str = "faiss_cpu") -> bool:
    """Both approaches give the same 5 ids for every query on a small case."""
    rng = np.random.default_rng(1)
    gallery = knn.l2_normalize(rng.standard_normal((n_gallery, DIM)))
    queries = knn.l2_normalize(rng.standard_normal((n_queries, DIM)))
    labels = rng.integers(0, n_gallery // 4, n_gallery)
    with tempfile.TemporaryDirectory() as tmp:
        a, _ = ours(gallery, labels, queries, k, Path(tmp) / "a.csv", backend)
        b, _ = baseline(gallery, labels, queries, baseline_k, Path(tmp) / "b.csv")
    return a == b


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at the end (other jobs share the machine)"
    return f"{model}, {mp.cpu_count()} cores{mem}, {platform.system()} {platform.release()}{load}"


def table(res_ours: dict, res_base: dict, query_share: float, args: argparse.Namespace, same: bool) -> str:
    scale_up = 1.0 / query_share
    t_o = sum(res_ours["times"].values())
    t_b = {key: v * scale_up for key, v in res_base["times"].items()}
    total_b = sum(t_b.values())
    note = "" if query_share >= 1 else (
        f" (extrapolated: ran {res_base['queries']:,} of {res_ours['queries']:,} queries, times x{scale_up:.2f}; "
        "every phase is linear in the number of queries)")
    lines = [
        "# kNN + new_individual + submission benchmark (stage 04)\n",
        f"Machine: {machine()}  ",
        f"Scale {args.scale}: gallery {res_ours['gallery']:,} rows x {DIM}-d, {res_ours['queries']:,} queries, "
        f"~{round(INDIVIDUALS * args.scale):,} individuals (long-tailed), random unit vectors.  ",
        f"Ours: backend `{args.backend}` ({BACKEND_WHAT[args.backend]}), exact, k={args.k}, "
        "`knn.rank_queries` as stage 04 calls it (its search row includes the vectorised per-individual max), "
        "then insertion and ids.  ",
        f"Baseline (1st place): sklearn NearestNeighbors(cosine, brute), k={args.baseline_k}, Python loop{note}.\n",
        "| phase | baseline s | ours s | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for phase in ("search", "aggregate", "write"):
        o, b = res_ours["times"][phase], t_b[phase]
        lines.append(f"| {phase} | {b:.2f} | {o:.2f} | {b / max(o, 1e-9):.1f}x |")
    lines += [
        f"| **total** | **{total_b:.2f}** | **{t_o:.2f}** | **{total_b / max(t_o, 1e-9):.1f}x** |",
        f"| peak RSS MB (above the data) | {res_base['peak_mb']:.0f} ({res_base['extra_mb']:.0f}) | "
        f"{res_ours['peak_mb']:.0f} ({res_ours['extra_mb']:.0f}) | |",
        "",
        f"Identical predictions on a 2,000 x 500 case (ours k={args.k} vs baseline k={args.baseline_k}): "
        f"{'yes' if same else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of competition size (gallery and queries)")
    p.add_argument("--k", type=int, default=50, help="our neighbours per query (config knn.k)")
    p.add_argument("--baseline-k", type=int, default=500)
    p.add_argument("--baseline-queries", type=float, default=1.0,
                   help="share of the queries the baseline runs (its times are scaled up linearly)")
    p.add_argument("--backend", default="faiss_cpu", choices=list(BACKEND_WHAT),
                   help="our search backend (stage 04 picks with knn.backend: auto)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "knn.md"))
    args = p.parse_args()
    same = check_identical(k=args.k, baseline_k=args.baseline_k, backend=args.backend)
    print(f"identical predictions on 2,000 x 500: {same}")
    res_ours = run_side("ours", args.scale, args.k, backend=args.backend)
    print(f"ours: {res_ours['times']}")
    res_base = run_side("baseline", args.scale, args.baseline_k, args.baseline_queries)
    print(f"baseline: {res_base['times']} on {res_base['queries']} queries")
    text = table(res_ours, res_base, args.baseline_queries, args, same)
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
