"""Nearest-neighbour ranking of individuals with a `new_individual` column.

Pure maths on arrays: no file I/O. Labels are integer codes; `NEW_LABEL` (-1) stands for
`new_individual` and `PAD_LABEL` (-2) fills rows with fewer distinct individuals than asked.

The scheme is the 1st-place Happywhale one: cosine kNN over L2-normalised embeddings, the score
of an individual is the max similarity over its gallery images among the k neighbours, and
`new_individual` is inserted with a fixed score `t` so it lands at whatever rank `t` falls.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NEW_LABEL = -1
PAD_LABEL = -2
BACKENDS = ("auto", "faiss_gpu", "torch", "faiss_cpu")
FAISS_GPU_MAX_K = 2048  # faiss's GPU indexes return at most this many neighbours a query

Searcher = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def faiss_gpus() -> int:
    """How many GPUs faiss can use (0 with faiss-cpu or without faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def resolve_backend(backend: str = "auto") -> str:
    """Pick faiss on the GPU if faiss sees one, else torch on CUDA, else faiss on the CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown knn backend {backend!r}; valid: {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if faiss_gpus() > 0:
        return "faiss_gpu"
    try:
        import torch

        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    return "faiss_cpu"


def backend_for_device(backend: str, device: str) -> str:
    """`knn.backend` under the pipeline's `device`: with `device: cpu`, auto searches with faiss on
    the CPU even where a GPU is visible (a CPU run stays off the GPU); other settings are kept."""
    return "faiss_cpu" if backend == "auto" and device == "cpu" else backend


def _torch_searcher(gallery: np.ndarray, chunk: int = 4096) -> Searcher:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.from_numpy(gallery).to(device)

    def run(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = [], []
        for start in range(0, len(queries), chunk):
            q = torch.from_numpy(queries[start : start + chunk]).to(device)
            s, i = torch.topk(q @ g.T, k, dim=1)
            scores.append(s.cpu().numpy())
            idx.append(i.cpu().numpy())
        if not scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate(scores), np.concatenate(idx)

    return run


def _faiss_searcher(gallery: np.ndarray, gpu: bool, index: str, nlist: int, nprobe: int) -> Searcher:
    import faiss

    d = gallery.shape[1]
    if index == "ivf":
        nlist = max(1, min(nlist, len(gallery) // 39))  # faiss wants ~39 points per centroid
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        idx.train(gallery)
        idx.nprobe = min(nprobe, nlist)
    elif index == "flat":
        idx = faiss.IndexFlatIP(d)
    else:
        raise ValueError(f"unknown knn index {index!r}; valid: ['flat', 'ivf']")
    if gpu:
        idx = faiss.index_cpu_to_all_gpus(idx)
    idx.add(gallery)

    def run(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return idx.search(queries, k)

    return run


def searcher(
    gallery: np.ndarray, backend: str = "auto", index: str = "flat", nlist: int = 1024, nprobe: int = 32,
) -> tuple[Searcher, int]:
    """An index over `gallery` (built once) and the largest k it can return: a function
    (queries, k) -> (scores, gallery indices), best first, k at most that limit."""
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if gallery.ndim != 2:
        raise ValueError(f"the gallery must be 2-d, got shape {gallery.shape}")
    chosen = resolve_backend(backend)
    limit = min(len(gallery), FAISS_GPU_MAX_K) if chosen == "faiss_gpu" else len(gallery)
    if chosen == "torch":
        return _torch_searcher(gallery), limit
    return _faiss_searcher(gallery, chosen == "faiss_gpu", index, nlist, nprobe), limit


def search(
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    backend: str = "auto",
    index: str = "flat",
    nlist: int = 1024,
    nprobe: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product neighbours of each query: (scores, gallery indices), best first.

    Both inputs should be L2-normalised so the inner product is the cosine similarity.
    """
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if gallery.ndim != 2 or queries.ndim != 2 or gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"shape mismatch: gallery {gallery.shape}, queries {queries.shape}")
    run, limit = searcher(gallery, backend, index, nlist, nprobe)
    return run(queries, min(k, limit))


def dedupe_sorted(labels: np.ndarray, scores: np.ndarray, top: int | None = None,
                  payload: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Keep the first (best) occurrence of each label per row of a best-first list.

    Rows must be sorted by score, best first; PAD_LABEL entries are dropped. Returns (labels,
    scores) of shape (Q, top), kept entries moved to the front, padded with PAD_LABEL and -inf;
    with `payload` (an int array aligned with `labels`), also the payload of each kept entry
    (-1 in padding).
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float32)
    q, k = labels.shape
    top = k if top is None else top
    # A stable sort by label keeps the score order within a label, so "first of its run" is the
    # label's best entry.
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    first = np.ones_like(sorted_labels, dtype=bool)
    first[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    keep = np.zeros_like(first)
    np.put_along_axis(keep, order, first, axis=1)
    keep &= labels != PAD_LABEL
    # Move kept entries to the front, preserving their score order.
    front = np.argsort(~keep, axis=1, kind="stable")
    out_labels = np.take_along_axis(np.where(keep, labels, PAD_LABEL), front, axis=1)
    out_scores = np.take_along_axis(np.where(keep, scores, -np.inf), front, axis=1).astype(np.float32)
    outs = [out_labels, out_scores]
    if payload is not None:
        outs.append(np.take_along_axis(np.where(keep, payload, -1), front, axis=1))
    fills = (PAD_LABEL, -np.inf, -1)
    if top > k:
        outs = [np.pad(o, ((0, 0), (0, top - k)), constant_values=f) for o, f in zip(outs, fills)]
    return tuple(o[:, :top] for o in outs)


def aggregate_by_individual(
    scores: np.ndarray, indices: np.ndarray, gallery_labels: np.ndarray, top: int | None = None,
    with_index: bool = False,
) -> tuple[np.ndarray, ...]:
    """Per query, individuals ranked by their best neighbour score (max over their images).

    `scores`/`indices` are a search result sorted best first; faiss marks missing neighbours with
    index -1. Returns (labels, scores) of shape (Q, top), padded with PAD_LABEL and -inf; with
    `with_index`, also the gallery index of each individual's best neighbour (-1 in padding).
    """
    labels = np.where(indices >= 0, np.asarray(gallery_labels)[np.clip(indices, 0, None)], PAD_LABEL)
    scores = np.where(indices >= 0, scores, -np.inf).astype(np.float32)
    return dedupe_sorted(labels, scores, top, payload=np.asarray(indices) if with_index else None)


def rank_queries(
    gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, groups: np.ndarray, k: int,
    top: int, backend: str = "auto", index: str = "flat", nlist: int = 1024, nprobe: int = 32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """kNN of query rows, the rows of one query merged (`groups`: flips, crop sources), then the
    per-individual max: (query ids in first-seen order, labels, scores, gallery index of each
    individual's best neighbour, deepened), each (Q, top) but the first and the last.

    The `top` individuals are exact when the last of them scores at least the k-th neighbour
    score of every row of the query: any photo left out scores at most that. A query where this
    fails (fewer than `top` individuals: an animal with many photos filled the neighbours; or a
    merged row whose own neighbours ran out early) is searched again with k doubled until it holds
    or k covers the gallery. `deepened` counts those queries.
    """
    gallery_labels = np.asarray(gallery_labels)
    groups = np.asarray(groups)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    run, limit = searcher(gallery, backend, index, nlist, nprobe)
    k = max(1, min(k, limit))
    need = min(top, len(np.unique(gallery_labels[gallery_labels >= 0])))

    def ranked(rows: np.ndarray | slice) -> tuple[np.ndarray, ...]:
        scores, idx = run(queries[rows], k)
        # A row's k-th score bounds every photo it left out (none are left out at k = gallery size).
        kth = np.where((idx[:, -1] >= 0) & (k < len(gallery)), scores[:, -1], -np.inf)
        ids, scores, idx = group_neighbours(scores, idx, groups[rows])
        sorter = np.argsort(ids, kind="stable")
        bound = np.full(len(ids), -np.inf, dtype=np.float32)
        np.maximum.at(bound, sorter[np.searchsorted(ids, groups[rows], sorter=sorter)], kth)
        labels, agg, best = aggregate_by_individual(scores, idx, gallery_labels, top, with_index=True)
        unsure = agg[:, need - 1] < bound if need > 0 else np.zeros(len(ids), dtype=bool)
        return ids, labels, agg, best, unsure

    ids, labels, agg, best, unsure = ranked(slice(None))
    sorter = np.argsort(ids, kind="stable")
    deepened = np.zeros(len(ids), dtype=bool)
    while unsure.any() and k < limit:
        k = min(2 * k, limit)
        deepened |= unsure
        more_ids, more_labels, more_agg, more_best, more_unsure = ranked(np.isin(groups, ids[unsure]))
        at = sorter[np.searchsorted(ids, more_ids, sorter=sorter)]
        labels[at], agg[at], best[at] = more_labels, more_agg, more_best
        unsure = np.zeros(len(ids), dtype=bool)
        unsure[at] = more_unsure
    return ids, labels, agg, best, int(deepened.sum())


def group_neighbours(
    scores: np.ndarray, indices: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the neighbour lists of query rows that belong to one query (flips, crop sources).

    `groups` gives each row's query id. Returns (group ids in first-seen order, scores, indices)
    with one row per group: the concatenated lists re-sorted best first, padded with -inf / -1.
    The per-individual max over the merged list is then the max over all rows of the query.
    """
    groups = np.asarray(groups)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order_of_group = np.argsort(first, kind="stable")  # first-seen order
    rank = np.empty_like(order_of_group)
    rank[order_of_group] = np.arange(len(uniq))
    g = rank[inverse.reshape(-1)]
    rows = np.argsort(g, kind="stable")
    counts = np.bincount(g, minlength=len(uniq))
    slot = np.arange(len(g)) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max()) if len(counts) else 0
    k = scores.shape[1]
    merged_s = np.full((len(uniq), width, k), -np.inf, dtype=np.float32)
    merged_i = np.full((len(uniq), width, k), -1, dtype=np.int64)
    merged_s[g[rows], slot] = np.where(indices[rows] >= 0, scores[rows], -np.inf)
    merged_i[g[rows], slot] = indices[rows]
    merged_s = merged_s.reshape(len(uniq), width * k)
    merged_i = merged_i.reshape(len(uniq), width * k)
    best = np.argsort(-merged_s, axis=1, kind="stable")
    return (
        uniq[order_of_group],
        np.take_along_axis(merged_s, best, axis=1),
        np.take_along_axis(merged_i, best, axis=1),
    )


def insert_new(
    labels: np.ndarray, scores: np.ndarray, threshold: float | np.ndarray, n: int = 5
) -> np.ndarray:
    """Top-n labels with NEW_LABEL inserted at the first rank whose score is below `threshold`.

    `threshold` may be one value or one per query (per-species thresholds).
    """
    labels, scores = labels[:, :n], np.asarray(scores, dtype=np.float64)[:, :n]
    # float64, as `map5_for_thresholds` scores the thresholds calibration chooses among: rounded
    # to float32, a threshold just above a score can become equal to it and move the insertion
    t = np.broadcast_to(np.asarray(threshold, dtype=np.float64).reshape(-1, 1), (len(labels), 1))
    pos = (scores >= t).sum(axis=1)  # scores are sorted, so this is the insertion rank
    cols = np.arange(n)[None, :]
    shifted = np.concatenate([np.full((len(labels), 1), NEW_LABEL), labels[:, : n - 1]], axis=1)
    before = cols < pos[:, None]
    at = cols == pos[:, None]
    return np.where(before, labels, np.where(at, NEW_LABEL, shifted))


def _ap_by_insert_rank(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(Q, n+1): the average precision of each query when new_individual sits at rank p = 0..n."""
    n = labels.shape[1]
    hit = labels == truth[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), 99)[:, None]
    p = np.arange(n + 1)[None, :]
    eff = np.where((truth == NEW_LABEL)[:, None], p, np.where(rank < p, rank, rank + 1))
    return np.where(eff < 5, 1.0 / (eff + 1), 0.0)


def map5_for_thresholds(
    labels: np.ndarray, scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """MAP@5 of `insert_new` at each threshold (truth NEW_LABEL = new), for any number of thresholds.

    With threshold t, new_individual sits at rank p(t) = #(scores >= t) of a query, so a query's AP
    changes only where t crosses one of its (at most 5) scores. One sort of all those crossings
    and a cumulative sum give MAP@5 at every threshold in O((5Q + T) log 5Q), instead of O(5Q * T).
    """
    labels, scores = np.asarray(labels)[:, :5], np.asarray(scores, dtype=np.float64)[:, :5]
    truth = np.asarray(truth)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if len(truth) == 0:
        return np.full(len(thresholds), np.nan)
    ap = _ap_by_insert_rank(labels, truth)
    # The j-th highest score of a query moves new_individual from rank j to j+1 once t <= it.
    desc = -np.sort(-scores, axis=1)
    gains = np.diff(ap, axis=1)
    order = np.argsort(desc.ravel(), kind="stable")
    crossings = desc.ravel()[order]
    suffix = np.concatenate([np.cumsum(gains.ravel()[order][::-1])[::-1], [0.0]])
    passed = suffix[np.searchsorted(crossings, thresholds, side="left")]
    return (ap[:, 0].sum() + passed) / len(truth)


def calibrate_threshold(
    labels: np.ndarray, scores: np.ndarray, truth: np.ndarray, grid: np.ndarray | None = None
) -> tuple[float, float]:
    """The new_individual threshold with the best MAP@5 on validation queries: (threshold, MAP@5)."""
    if grid is None:
        finite = scores[:, :5][np.isfinite(scores[:, :5])]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        grid = np.unique(np.concatenate([np.linspace(lo - 1e-3, hi + 1e-3, 201), finite]))
    values = map5_for_thresholds(labels, scores, truth, grid)
    best = int(np.argmax(values))
    return float(grid[best]), float(values[best])


def threshold_for_share(top1_scores: np.ndarray, share: float) -> float:
    """The threshold that puts new_individual first for `share` of the queries."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    top1 = np.sort(np.asarray(top1_scores, dtype=np.float64))  # -inf (no candidate) first: always new
    if top1.size == 0:
        return 0.0
    n_new = int(round(share * len(top1)))
    if n_new == len(top1):  # every query: just above the highest score (insert_new compares in float64)
        return float(np.nextafter(top1[-1], np.inf)) if np.isfinite(top1[-1]) else 0.0
    # new_individual goes first where top-1 < threshold: the n_new lowest scores
    return float(top1[n_new]) if np.isfinite(top1[n_new]) else -float(np.finfo(np.float32).max)


def transfer_threshold(threshold: float, source_top1: np.ndarray, target_top1: np.ndarray) -> float:
    """The threshold on `target` scores that puts new_individual first for the same share of
    queries as `threshold` does on `source` scores (two models ranking the same queries; -inf,
    no candidate, counts as new on either side)."""
    source = np.asarray(source_top1, dtype=np.float64)
    if source.size == 0:
        return float(threshold)
    return threshold_for_share(target_top1, float(np.count_nonzero(source < threshold)) / source.size)


def calibrate_per_group(
    labels: np.ndarray,
    scores: np.ndarray,
    truth: np.ndarray,
    groups: np.ndarray,
    min_queries: int,
    fallback: float,
) -> dict[int, float]:
    """One new_individual threshold per group (e.g. predicted species) with the best MAP@5.

    Groups with fewer than `min_queries` validation queries get `fallback` (the global threshold):
    a threshold fitted on a handful of queries is noise.
    """
    out: dict[int, float] = {}
    for g in np.unique(groups):
        mask = groups == g
        out[int(g)] = (
            calibrate_threshold(labels[mask], scores[mask], truth[mask])[0]
            if mask.sum() >= min_queries
            else float(fallback)
        )
    return out


def thresholds_for_groups(groups: np.ndarray, table: dict[int, float], default: float) -> np.ndarray:
    """Per-query thresholds looked up by group; groups missing from `table` get `default`."""
    return np.array([table.get(int(g), default) for g in groups], dtype=np.float64)


def blend_logits(
    knn_labels: np.ndarray,
    knn_scores: np.ndarray,
    logit_labels: np.ndarray,
    logit_scores: np.ndarray,
    weight: float,
    top: int = 5,
    unblended: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank individuals by (1 - weight) * kNN score + weight * ArcFace class cosine.

    Candidates are the union of both lists. An individual missing from one list gets that list's
    lowest score in the row (its true score is at most that, being outside the top). Both scores
    are cosines, so the blend stays on the scale the new_individual threshold was set on.
    Individuals in `unblended` (those the heads never trained a class for: the validation fold's
    own animals, when the fold model ranks test) keep their kNN score: a class cosine there
    would only be the floor, and pushed them down the ranking.
    """
    knn_scores = np.where(knn_labels == PAD_LABEL, -np.inf, knn_scores).astype(np.float32)
    cand = np.concatenate([knn_labels, logit_labels], axis=1)

    def lookup(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
        finite = np.where(np.isfinite(values), values, np.inf)
        floor = finite.min(axis=1, keepdims=True)
        floor = np.where(np.isfinite(floor), floor, 0.0)
        match = cand[:, :, None] == labels[:, None, :]
        found = np.where(match, values[:, None, :], -np.inf).max(axis=2)
        return np.where(np.isfinite(found), found, floor)

    knn_part = lookup(knn_labels, knn_scores)
    blended = (1.0 - weight) * knn_part + weight * lookup(logit_labels, logit_scores)
    if unblended is not None and len(unblended):
        blended = np.where(np.isin(cand, unblended), knn_part, blended)
    blended = np.where(cand == PAD_LABEL, -np.inf, blended)
    order = np.argsort(-blended, axis=1, kind="stable")
    return dedupe_sorted(np.take_along_axis(cand, order, axis=1), np.take_along_axis(blended, order, axis=1), top)


def fill_missing(pred: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Replace PAD_LABEL entries (a gallery with too few individuals) by the first `fallback`
    labels (e.g. the most frequent individuals) not already in the row."""
    pred = pred.copy()
    for r in np.flatnonzero((pred == PAD_LABEL).any(axis=1)):
        extra = iter(lab for lab in fallback if lab not in set(pred[r]))
        for c in np.flatnonzero(pred[r] == PAD_LABEL):
            pred[r, c] = next(extra, PAD_LABEL)
    return pred


def rank_individuals(
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    queries: np.ndarray,
    k: int = 50,
    top: int = 20,
    backend: str = "auto",
    index: str = "flat",
    nlist: int = 1024,
    nprobe: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """kNN search then per-individual max: (labels, scores) of shape (Q, top), best first; a query
    whose k neighbours hold fewer than `top` individuals is searched deeper (`rank_queries`)."""
    _, labels, scores, _, _ = rank_queries(gallery, gallery_labels, queries, np.arange(len(queries)), k, top,
                                           backend, index, nlist, nprobe)
    return labels, scores


def evaluate_fold(
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int = 50,
    backend: str = "auto",
) -> dict:
    """Validation of an embedding: rank individuals, calibrate the new_individual threshold on
    these queries, and report MAP@5 overall / known / new at that threshold (truth NEW_LABEL = new).
    """
    labels, scores = rank_individuals(gallery, gallery_labels, queries, k=k, top=5, backend=backend)
    threshold, _ = calibrate_threshold(labels, scores, truth)
    pred = insert_new(labels, scores, threshold)
    hit = pred == np.asarray(truth)[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), 99)
    per_query = np.where(rank < 5, 1.0 / (rank + 1), 0.0)
    is_new = np.asarray(truth) == NEW_LABEL

    def mean(mask: np.ndarray) -> float:
        return float(per_query[mask].mean()) if mask.any() else float("nan")

    return {
        "map5": mean(np.ones_like(is_new)),
        "map5_known": mean(~is_new),
        "map5_new": mean(is_new),
        "acc1": float((rank == 0).mean()) if len(rank) else float("nan"),
        "threshold": threshold,
        "n": int(len(truth)),
        "n_new": int(is_new.sum()),
    }
