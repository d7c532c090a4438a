"""Known-answer tests of the kNN maths: aggregation, new_individual insertion, thresholds, MAP@5."""

from __future__ import annotations

import numpy as np
import pytest

from whaleid import knn
from whaleid.knn import NEW_LABEL, PAD_LABEL
from whaleid.metrics import map_at_5


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    return knn.l2_normalize(rng.standard_normal((n, d)))


def test_aggregate_takes_max_per_individual_with_duplicates_and_missing() -> None:
    gallery_labels = np.array([7, 7, 3, 5, 3, 9])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.0], [0.95, 0.9, 0.2, 0.1, -1.0, -1.0]], dtype=np.float32)
    idx = np.array([[0, 1, 2, 4, 3, -1], [4, 2, 5, -1, -1, -1]])
    labels, agg = knn.aggregate_by_individual(scores, idx, gallery_labels, top=4)
    np.testing.assert_array_equal(labels, [[7, 3, 5, PAD_LABEL], [3, 9, PAD_LABEL, PAD_LABEL]])
    np.testing.assert_allclose(agg[0, :3], [0.9, 0.7, 0.5])
    np.testing.assert_allclose(agg[1, :2], [0.95, 0.2])
    assert np.isneginf(agg[0, 3]) and np.isneginf(agg[1, 2:]).all()


def test_aggregate_pads_when_top_exceeds_k() -> None:
    labels, agg = knn.aggregate_by_individual(np.array([[0.5, 0.4]]), np.array([[1, 0]]), np.array([2, 1]), top=5)
    np.testing.assert_array_equal(labels, [[1, 2, PAD_LABEL, PAD_LABEL, PAD_LABEL]])


def test_group_neighbours_merges_rows_of_one_query() -> None:
    scores = np.array([[0.9, 0.1], [0.5, 0.4], [0.95, 0.3]], dtype=np.float32)
    idx = np.array([[0, 1], [2, 3], [1, -1]])
    images, s, i = knn.group_neighbours(scores, idx, np.array(["b", "a", "b"], dtype=object))
    assert list(images) == ["b", "a"]
    np.testing.assert_allclose(s[0], [0.95, 0.9, 0.1, -np.inf])
    np.testing.assert_array_equal(i[0], [1, 0, 1, -1])
    np.testing.assert_allclose(s[1, :2], [0.5, 0.4])
    assert np.isneginf(s[1, 2:]).all()


@pytest.mark.parametrize("rank", [0, 1, 2, 3, 4, 5])
def test_insert_new_at_each_rank(rank: int) -> None:
    labels = np.array([[10, 11, 12, 13, 14]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], dtype=np.float32)
    threshold = [0.95, 0.85, 0.75, 0.65, 0.55, 0.1][rank]
    out = knn.insert_new(labels, scores, threshold)[0]
    expected = [10, 11, 12, 13, 14][:rank] + [NEW_LABEL] + [10, 11, 12, 13, 14][rank:]
    np.testing.assert_array_equal(out, expected[:5])


def test_insert_new_per_query_thresholds() -> None:
    labels = np.array([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]] * 2, dtype=np.float32)
    out = knn.insert_new(labels, scores, np.array([0.95, 0.75]))
    np.testing.assert_array_equal(out, [[NEW_LABEL, 1, 2, 3, 4], [1, 2, NEW_LABEL, 3, 4]])


def _brute_map5(labels: np.ndarray, scores: np.ndarray, truth: np.ndarray, t: float) -> float:
    pred = knn.insert_new(labels, scores, t)
    return map_at_5([[str(x) for x in row] for row in pred], [str(x) for x in truth])


def test_map5_for_thresholds_equals_metrics_map_at_5() -> None:
    rng = np.random.default_rng(0)
    q = 300
    scores = -np.sort(-rng.uniform(0, 1, (q, 5)), axis=1).astype(np.float32)
    labels = np.stack([rng.permutation(20)[:5] for _ in range(q)])
    truth = np.where(rng.uniform(size=q) < 0.3, NEW_LABEL, rng.integers(0, 20, q))
    grid = np.concatenate([np.linspace(-0.1, 1.1, 37), scores[:5].ravel()])
    fast = knn.map5_for_thresholds(labels, scores, truth, grid)
    slow = [_brute_map5(labels, scores, truth, t) for t in grid]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_map_at_5_hand_computed() -> None:
    preds = [["a", "b", "c", "d", "e"], ["x", "a", "y", "z", "w"], ["n", "m", "o", "p", "q"],
             ["new_individual", "a", "b", "c", "d"]]
    truths = ["a", "a", "k", "new_individual"]
    assert map_at_5(preds, truths) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert map_at_5([["a", "b", "c", "d", "e"]], ["e"]) == pytest.approx(0.2)


def test_calibrate_threshold_finds_the_known_best() -> None:
    # Known queries score >= 0.8 at rank 0; new ones score <= 0.5: any t in (0.5, 0.8] is perfect.
    labels = np.array([[1, 2, 3, 4, 5]] * 4)
    scores = np.array([[0.9, 0.4, 0.3, 0.2, 0.1], [0.8, 0.4, 0.3, 0.2, 0.1],
                       [0.5, 0.4, 0.3, 0.2, 0.1], [0.45, 0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    truth = np.array([1, 1, NEW_LABEL, NEW_LABEL])
    t, best = knn.calibrate_threshold(labels, scores, truth)
    assert best == pytest.approx(1.0)
    assert 0.5 < t <= 0.8


def test_calibrate_per_group_falls_back_for_small_groups() -> None:
    labels = np.array([[1, 2, 3, 4, 5]] * 5)
    scores = np.array([[0.9, 0.1, 0.0, -0.1, -0.2]] * 5, dtype=np.float32)
    truth = np.array([NEW_LABEL] * 4 + [1])
    groups = np.array([0, 0, 0, 0, 1])
    table = knn.calibrate_per_group(labels, scores, truth, groups, min_queries=3, fallback=0.33)
    assert table[1] == pytest.approx(0.33)
    assert table[0] > 0.9  # all of group 0 is new: new_individual must come first
    np.testing.assert_allclose(knn.thresholds_for_groups(np.array([1, 0, 7]), table, 0.5)[[0, 2]], [0.33, 0.5])


def test_threshold_for_share() -> None:
    top1 = np.linspace(0, 1, 101)
    t = knn.threshold_for_share(top1, 0.2)
    pred = knn.insert_new(np.tile(np.arange(5), (101, 1)), np.tile(top1[:, None], (1, 5)), t)
    assert (pred[:, 0] == NEW_LABEL).mean() == pytest.approx(0.2, abs=0.011)
    with pytest.raises(ValueError):
        knn.threshold_for_share(top1, 1.5)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_threshold_for_share_is_exact_with_ties_padding_and_float32(share: float) -> None:
    top1 = np.array([0.4, 0.1, -np.inf, 0.3, 0.3, -np.inf, 0.2, 0.9], dtype=np.float32)
    t = knn.threshold_for_share(top1, share)
    pred = knn.insert_new(np.tile(np.arange(5), (8, 1)), np.tile(top1[:, None], (1, 5)), t)
    # -inf (no candidate) rows always count among the new (so share 0 still gives 2/8)
    expected = {0.0: 2 / 8, 0.25: 2 / 8, 0.5: 4 / 8, 0.75: 6 / 8, 1.0: 1.0}[share]
    assert (pred[:, 0] == NEW_LABEL).mean() == expected


def test_the_calibrated_threshold_gives_the_map5_calibration_reported() -> None:
    # a grid point just above a score, which float32 rounding would make equal to it
    labels = np.array([[1, 2, 3, 4, 5]] * 2)
    score = np.float32(0.1042)
    scores = np.array([[score, 0.05, 0.04, 0.03, 0.02]] * 2, dtype=np.float32)
    truth = np.array([NEW_LABEL, NEW_LABEL])
    grid = np.array([float(score) - 1e-3, float(score) + 1e-9])
    t, best = knn.calibrate_threshold(labels, scores, truth, grid)
    assert t == grid[1] and best == 1.0
    assert _brute_map5(labels, scores, truth, t) == best


def test_faiss_and_torch_backends_agree() -> None:
    rng = np.random.default_rng(1)
    gallery, queries = unit(rng, 500), unit(rng, 40)
    s1, i1 = knn.search(gallery, queries, 10, backend="faiss_cpu")
    s2, i2 = knn.search(gallery, queries, 10, backend="torch")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    exact = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    np.testing.assert_array_equal(i1, exact)


def test_ivf_index_runs_and_mostly_agrees() -> None:
    rng = np.random.default_rng(2)
    centres = unit(rng, 20)
    gallery = knn.l2_normalize(np.repeat(centres, 100, axis=0) + 0.05 * rng.standard_normal((2000, 16)))
    queries = gallery[::50] + 0.01
    s, i = knn.search(gallery, queries, 5, backend="faiss_cpu", index="ivf", nlist=16, nprobe=4)
    exact = knn.search(gallery, queries, 5, backend="faiss_cpu")[1]
    assert i.shape == (len(queries), 5)
    assert (i[:, 0] == exact[:, 0]).mean() > 0.9
    with pytest.raises(ValueError):
        knn.search(gallery, queries, 5, backend="faiss_cpu", index="hnsw")


def test_blend_logits_reranks_and_fills_missing() -> None:
    knn_labels = np.array([[1, 2, PAD_LABEL]])
    knn_scores = np.array([[0.8, 0.6, -np.inf]], dtype=np.float32)
    logit_labels = np.array([[3, 2]])
    logit_scores = np.array([[0.9, 0.7]], dtype=np.float32)
    labels, scores = knn.blend_logits(knn_labels, knn_scores, logit_labels, logit_scores, 0.5, top=3)
    # 1: (0.8 + 0.7 floor) / 2 = 0.75; 2: (0.6 + 0.7) / 2 = 0.65; 3: (0.6 floor + 0.9) / 2 = 0.75.
    assert set(labels[0, :2]) == {1, 3} and labels[0, 2] == 2
    np.testing.assert_allclose(scores[0], [0.75, 0.75, 0.65], atol=1e-6)


def test_fill_missing_uses_fallback_without_duplicates() -> None:
    pred = np.array([[NEW_LABEL, 4, PAD_LABEL, PAD_LABEL, PAD_LABEL]])
    out = knn.fill_missing(pred, np.array([4, 9, 8, 7]))
    np.testing.assert_array_equal(out, [[NEW_LABEL, 4, 9, 8, 7]])


def test_evaluate_fold_perfect_embedding() -> None:
    rng = np.random.default_rng(3)
    centres = unit(rng, 10, 32)
    gallery = np.repeat(centres[:8], 2, axis=0)
    labels = np.repeat(np.arange(8), 2)
    queries = knn.l2_normalize(centres + 0.01)
    truth = np.array(list(range(8)) + [NEW_LABEL, NEW_LABEL])
    res = knn.evaluate_fold(gallery, labels, queries, truth, k=10, backend="faiss_cpu")
    assert res["map5"] == pytest.approx(1.0) and res["n_new"] == 2


def test_blend_logits_leaves_individuals_without_a_class_on_their_knn_score() -> None:
    knn_labels = np.array([[1, 2, 4]])
    knn_scores = np.array([[0.8, 0.75, 0.5]], dtype=np.float32)
    logit_labels = np.array([[1, 4]])  # 2 has no trained class, so it is missing from the logits
    logit_scores = np.array([[0.6, 0.9]], dtype=np.float32)
    labels, scores = knn.blend_logits(knn_labels, knn_scores, logit_labels, logit_scores, 0.5, top=3)
    # unmasked, 2 gets the logit floor: (0.75 + 0.6) / 2 = 0.675, last behind 1 and 4 (0.7 each)
    np.testing.assert_array_equal(labels[0], [1, 4, 2])
    np.testing.assert_allclose(scores[0], [0.7, 0.7, 0.675], atol=1e-6)
    labels, scores = knn.blend_logits(knn_labels, knn_scores, logit_labels, logit_scores, 0.5, top=3,
                                      unblended=np.array([2]))
    np.testing.assert_array_equal(labels[0], [2, 1, 4])  # its kNN score, 0.75, ranks it first
    np.testing.assert_allclose(scores[0], [0.75, 0.7, 0.7], atol=1e-6)


def test_rank_queries_searches_deeper_when_one_animal_fills_the_neighbours() -> None:
    """Six photos of individual 0 sit next to the query, so with k=2 its photos fill the list: the
    query is searched again with k doubled until three individuals are ranked."""
    d = 8
    e = np.eye(d, dtype=np.float32)
    query = e[:1]
    near = [e[0] + 0.05 * e[j] for j in range(1, 7)]
    at = [0.5 * e[0] + np.sqrt(0.75) * e[7], 0.45 * e[0] + np.sqrt(1 - 0.45**2) * e[6],
          0.3 * e[0] + np.sqrt(0.91) * e[5], 0.1 * e[0] + np.sqrt(0.99) * e[4]]
    gallery = knn.l2_normalize(np.stack(near + at))
    labels = np.array([0] * 6 + [1, 1, 2, 3])
    ids, ranked, scores, best, deepened = knn.rank_queries(gallery, labels, query, np.array(["q"]), k=2, top=3,
                                                           backend="faiss_cpu")
    assert list(ids) == ["q"] and deepened == 1
    np.testing.assert_array_equal(ranked, [[0, 1, 2]])
    np.testing.assert_allclose(scores[0, 1:], [0.5, 0.3], atol=1e-6)
    assert best[0, 1] == 6 and best[0, 2] == 8 and labels[best[0, 0]] == 0
    _, shallow, _, _, none = knn.rank_queries(gallery, labels, query, np.array(["q"]), k=10, top=3,
                                              backend="faiss_cpu")
    np.testing.assert_array_equal(shallow, ranked)
    assert none == 0


@pytest.mark.parametrize("k", [1, 3, 50])
def test_rank_queries_equals_the_exhaustive_per_individual_max(k: int) -> None:
    """Any k gives what scoring every gallery photo would: two rows per query (flips), merged."""
    rng = np.random.default_rng(k)
    gallery, labels = unit(rng, 60), rng.integers(0, 8, 60)
    rows, groups = unit(rng, 20), np.repeat(np.arange(10), 2)
    ids, ranked, scores, best, _ = knn.rank_queries(gallery, labels, rows, groups, k=k, top=5, backend="faiss_cpu")
    sims = (rows @ gallery.T).reshape(10, 2, 60).max(axis=1)
    per_id = np.stack([np.where(labels == c, sims, -np.inf).max(axis=1) for c in range(8)], axis=1)
    order = np.argsort(-per_id, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, np.arange(10))
    np.testing.assert_array_equal(ranked, order)
    np.testing.assert_allclose(scores, np.take_along_axis(per_id, order, axis=1), atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(sims, best, axis=1), scores, atol=1e-5)
    assert (labels[best] == ranked).all()


def test_transfer_threshold_keeps_the_share_of_new_individual_first() -> None:
    """Two models rank the same 6 queries: the threshold 0.5 puts 2 of the source's top-1 scores
    below it (and the -inf row, no candidate, a third), so the target gets the threshold that puts
    its 3 lowest first: its 4th lowest score."""
    source = np.array([0.2, 0.45, 0.55, 0.9, -np.inf, 0.7])
    target = np.array([0.8, 0.6, 0.95, 0.65, 0.7, 0.99], dtype=np.float32)
    t = knn.transfer_threshold(0.5, source, target)
    assert t == pytest.approx(float(np.float32(0.8)))
    assert np.count_nonzero(target.astype(np.float64) < t) == np.count_nonzero(source < 0.5) == 3
    assert knn.transfer_threshold(0.0, source, target) == pytest.approx(float(np.float32(0.65)))  # -inf only
    assert (target.astype(np.float64) < knn.transfer_threshold(1.0, source, target)).all()  # every query new
    assert knn.transfer_threshold(0.5, np.array([]), target) == 0.5  # nothing to take a share from


@pytest.mark.parametrize(("backend", "device", "gpu_backend"), [
    ("auto", "cpu", "faiss_cpu"),  # a CPU run stays off the GPU
    ("auto", "auto", "torch"),
    ("auto", "cuda", "torch"),
    ("torch", "cpu", "torch"),  # an explicit backend is kept
])
def test_knn_backend_follows_device_cpu_on_a_box_with_a_gpu(monkeypatch, backend: str, device: str,
                                                           gpu_backend: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(knn, "faiss_gpus", lambda: 0)
    assert knn.resolve_backend(knn.backend_for_device(backend, device)) == gpu_backend


def record_backends(monkeypatch, name: str) -> list[str]:
    """Patch `knn.<name>` to record the backend each call asks for, then search with faiss on the
    CPU (so the test runs on any machine); returns the list it records into."""
    seen: list[str] = []
    real = getattr(knn, name)

    def recording(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **{**kwargs, "backend": "faiss_cpu"})

    monkeypatch.setattr(knn, name, recording)
    return seen


def test_stage_04_searches_with_the_backend_device_cpu_implies(tmp_path, monkeypatch) -> None:
    from tests.test_submit import config, make_artifacts
    from whaleid import submit

    make_artifacts(tmp_path)
    seen = record_backends(monkeypatch, "rank_queries")
    submit.run(config(tmp_path, "knn.backend=auto", "device=cpu"))
    assert seen and set(seen) == {"faiss_cpu"}
    seen.clear()
    submit.run(config(tmp_path, "knn.backend=auto", "device=auto"))
    assert seen and set(seen) == {"auto"}
