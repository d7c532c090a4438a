"""Local-feature re-ranking: known answers for verification and re-sorting, and stage 04 with it on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_submit import config, make_artifacts
from whaleid import rerank, submit
from whaleid.errors import UserError


def blobs(seed: int, size: int = 160) -> np.ndarray:
    """A grey image of random bright ellipses on a dark, noisy ground (like callosity patches)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, (size, size), dtype=np.uint8)
    for _ in range(25):
        centre = tuple(int(v) for v in rng.integers(10, size - 10, 2))
        axes = tuple(int(v) for v in rng.integers(3, 12, 2))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(150, 255)), -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def moved(img: np.ndarray, angle: float = 12.0, scale: float = 1.1, shift=(6, -4)) -> np.ndarray:
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += shift
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def test_root_sift_is_unit_length_and_non_negative() -> None:
    d = rerank.root_sift(np.random.default_rng(0).uniform(0, 50, (7, 128)))
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
    assert (d >= 0).all()


def test_descriptors_are_stored_as_uint8_and_match_like_float_ones() -> None:
    d = rerank.root_sift(np.random.default_rng(0).uniform(0, 50, (7, 128)))
    stored = rerank.quantize(d)
    assert stored.dtype == np.uint8
    assert np.abs(rerank.as_float(stored) - d).max() <= 0.5 / 255 + 1e-7
    a, b = rerank.extract(blobs(1)), rerank.extract(moved(blobs(1)))
    assert a.desc.dtype == np.uint8 and len(a.desc) > 50

    def unquantised(img: np.ndarray) -> np.ndarray:  # extract()'s steps, RootSIFT left as float
        grey = cv2.resize(img, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC)
        grey = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(grey)
        return rerank.root_sift(cv2.SIFT_create(nfeatures=500).detectAndCompute(grey, None)[1])

    fa, fb = unquantised(blobs(1)), unquantised(moved(blobs(1)))
    assert len(fa) == len(a.desc) and len(fb) == len(b.desc)
    from_uint8 = {tuple(p) for p in rerank.ratio_matches(a.desc, [b.desc], 0.8)[0]}
    from_float = {tuple(p) for p in rerank.ratio_matches(fa, [fb], 0.8)[0]}
    assert len(from_float) >= 30
    assert len(from_uint8 & from_float) >= 0.95 * len(from_float)


def test_ratio_test_on_hand_made_descriptors() -> None:
    e = np.eye(128, dtype=np.float32)
    query = e[[0, 1]]
    # For query 0 the nearest is e0 (d=0) and the second e2 (d^2=2): kept. Query 1's two nearest
    # are both at d^2 = 1 (e1 mixed with e3 or e4 at equal weight): ratio 1, dropped.
    mix = np.sqrt(0.5).astype(np.float32)
    gallery = np.stack([e[2], e[0], mix * (e[1] + e[3]), mix * (e[1] + e[4])])
    pairs = rerank.ratio_matches(query, [gallery, gallery[:1]], 0.8)
    assert pairs[0].tolist() == [[0, 1]]
    assert pairs[1].tolist() == []  # one descriptor: no second neighbour, no match
    # Descriptors that are not unit length (quantised ones are not quite): true L2 distances.
    # Nearest of e0 is 0.8 e0 + 0.6 e1 (d^2 = 0.40), second 0.3 e0 (d^2 = 0.49): ratio 0.9, dropped.
    # (2 - 2 cos-style dot products would call the second 1.4 away and keep the match.)
    short = np.stack([0.3 * e[0], 0.8 * e[0] + 0.6 * e[1], e[2]])
    assert rerank.ratio_matches(e[[0]], [short], 0.8)[0].tolist() == []
    assert rerank.ratio_matches(e[[0]], [short], 0.95)[0].tolist() == [[0, 1]]


def _integer_ratio_test(query: np.ndarray, gallery: list[np.ndarray], ratio: float) -> list[list[list[int]]]:
    """The ratio test in exact integer distances (int64), compared as ratio_matches compares them
    (ratio^2 x d2 rounded to float32): the known answer for stored descriptors."""
    q = query.astype(np.int64)
    out = []
    for g in gallery:
        if len(g) < 2:
            out.append([])
            continue
        d = ((q[:, None, :] - g.astype(np.int64)[None]) ** 2).sum(axis=2)
        order = np.argsort(d, axis=1, kind="stable")
        d1, d2 = np.take_along_axis(d, order[:, :2], axis=1).T
        keep = d1.astype(np.float32) < np.float32(ratio ** 2) * d2.astype(np.float32)
        out.append([[i, int(order[i, 0])] for i in np.flatnonzero(keep)])
    return out


def test_ratio_matches_of_stored_descriptors_are_exact_integer_arithmetic() -> None:
    rng = np.random.default_rng(3)
    # Borderline cases: each query has a gallery descriptor at d^2 = 1 (one unit off in one
    # component) and a second at d^2 = 4 or 5, so at ratio 0.5 (ratio^2 = 0.25, exact in binary)
    # d1 < ratio^2 d2 is 1 < 1 (no match) or 1 < 1.25 (a match). Rounding in the distances, as in
    # the product of descriptors scaled to [0, 1], decides such ties either way.
    query = rng.integers(40, 200, (300, 128)).astype(np.uint8)
    sets, expected = [], []
    for i, q in enumerate(query):
        near, far = q.astype(np.int64).copy(), q.astype(np.int64).copy()
        a, b, c = rng.choice(128, 3, replace=False)
        near[a] += 1
        far[b] += 2
        if i % 2:
            far[c] += 1
        sets.append(np.stack([far, near]).astype(np.uint8))
        expected.append(i % 2 == 1)
    pairs = rerank.ratio_matches(query, sets, 0.5)
    kept = [[int(qi) for qi, _ in p] for p in pairs]
    # each set holds the one descriptor near its own query, so its match is (that query, row 1)
    assert [i in kept[i] for i in range(len(query))] == expected
    assert all(p[p[:, 0] == i, 1].tolist() == [1] for i, p in enumerate(pairs) if expected[i])
    # Random descriptors of few values (many equal distances), sets of 0 to 9 rows: the integer answer.
    query = rng.integers(0, 4, (40, 128)).astype(np.uint8)
    gallery = [rng.integers(0, 4, (n, 128)).astype(np.uint8) for n in (0, 1, 2, 9, 5)]
    gallery[3][4] = query[7]  # an exact copy: d1 = 0
    gallery[3][5] = query[7]  # twice: d1 = d2 = 0, a tie, no match
    gallery[4][0] = query[7]
    got = [p.tolist() for p in rerank.ratio_matches(query, gallery, 0.9)]
    assert got == _integer_ratio_test(query, gallery, 0.9)
    assert [7, 0] in got[4] and not any(qi == 7 for qi, _ in got[3])


def test_ratio_matches_on_a_named_device_give_the_integer_answer_for_any_query_layout() -> None:
    rng = np.random.default_rng(4)
    query = rng.integers(0, 120, (50, 128)).astype(np.uint8)
    gallery = [rng.integers(0, 120, (n, 128)).astype(np.uint8) for n in (30, 3, 1)]
    default = rerank.ratio_matches(query, gallery, 0.95)
    named = rerank.ratio_matches(query, gallery, 0.95, device="cpu")
    assert [p.tolist() for p in default] == [p.tolist() for p in named] == _integer_ratio_test(query, gallery, 0.95)
    # a reversed (negatively strided), read-only view of the same descriptors: the same matches, reversed
    view = query[::-1]
    view.flags.writeable = False
    flipped = [sorted([len(query) - 1 - i, j] for i, j in p.tolist()) for p in rerank.ratio_matches(view, gallery, 0.95)]
    assert flipped == [sorted(p.tolist()) for p in named]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not round the product
        assert [p.tolist() for p in rerank.ratio_matches(query, gallery, 0.95)] == [p.tolist() for p in named]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ratio_matches_on_cuda_are_the_cpu_matches_bit_for_bit() -> None:
    a, b = rerank.extract(blobs(1)), rerank.extract(moved(blobs(1)))
    others = [rerank.extract(blobs(s)).desc for s in (2, 3)]
    on_cpu = rerank.ratio_matches(a.desc, [b.desc, *others], 0.85, device="cpu")
    on_cuda = rerank.ratio_matches(a.desc, [b.desc, *others], 0.85, device="cuda")
    assert len(on_cpu[0]) >= 30
    assert [p.tolist() for p in on_cuda] == [p.tolist() for p in on_cpu]
    labels, gallery_labels = np.array([[7, 8]]), np.array([7, 8, 8])
    gallery = [b, rerank.extract(blobs(2)), rerank.extract(blobs(3))]
    by = {d: rerank.candidate_inliers(labels, [a], gallery, gallery_labels, device=d).tolist() for d in ("cpu", "cuda")}
    assert by["cpu"] == by["cuda"]


def test_same_marks_moved_verify_and_other_marks_do_not() -> None:
    a = rerank.extract(blobs(1))
    same = rerank.extract(moved(blobs(1)))
    other = rerank.extract(blobs(2))
    counts = rerank.verify(a, [same, other, rerank.LocalFeatures.empty()], ratio=0.8, ransac_px=4.0)
    assert counts[0] >= 20, counts
    assert counts[1] <= 6, counts
    assert counts[2] == 0


def test_translation_inliers_on_hand_made_matches() -> None:
    src = np.array([[0, 0], [10, 0], [0, 10], [50, 50], [20, 20], [7, 7]], dtype=np.float32)
    shift = np.array([[3, 4], [3, 4], [3.5, 4], [3, 5], [-20, 9], [30, 30]], dtype=np.float32)
    # Four matches agree on a shift of about (3, 4) within 1.5 px; the last two are outliers.
    assert rerank.count_translation_inliers(src, src + shift, 1.5) == 4
    assert rerank.count_translation_inliers(src, src + shift, 0.6) == 3  # (3.5, 4) and (3, 5) are 0.5 and 1 off
    assert rerank.count_translation_inliers(src, src + shift, 100.0) == 6
    assert rerank.count_translation_inliers(src[:1], src[:1], 1.0) == 1
    assert rerank.count_translation_inliers(src[:0], src[:0], 1.0) == 0
    assert rerank.count_inliers(src, src + shift, 1.5, "translation") == 4
    with pytest.raises(ValueError, match="unknown geometry 'affine'"):
        rerank.count_inliers(src, src + shift, 1.5, "affine")


def test_translation_geometry_verifies_a_shifted_copy_far_above_a_turned_one() -> None:
    a = rerank.extract(blobs(1))
    shifted = rerank.extract(moved(blobs(1), angle=0.0, scale=1.0))
    turned = rerank.extract(moved(blobs(1)))  # 12 degrees, 1.1x: only a patch of it shifts alike
    other = rerank.extract(blobs(2))
    sim = rerank.verify(a, [shifted, turned, other], ratio=0.85, ransac_px=4.0, geometry="similarity")
    shift = rerank.verify(a, [shifted, turned, other], ratio=0.85, ransac_px=12.0, geometry="translation")
    assert sim[0] >= 100 and sim[1] >= 0.4 * sim[0] and sim[2] <= 6, sim
    assert shift[0] >= 100 and shift[1] <= 0.25 * shift[0] and shift[2] <= 6, shift
    # candidate_inliers passes the geometry on: individual 7 is the turned copy
    labels, gallery_labels = np.array([[7]]), np.array([7])
    by = {g: rerank.candidate_inliers(labels, [a], [turned], gallery_labels, ratio=0.85, ransac_px=px, geometry=g)[0, 0]
          for g, px in (("similarity", 4.0), ("translation", 12.0))}
    assert by == {"similarity": sim[1], "translation": shift[1]}


def test_apply_resorts_by_known_scores_and_keeps_padding_last() -> None:
    labels = np.array([[1, 2, 3, -2]])
    scores = np.array([[0.9, 0.8, 0.7, -np.inf]], dtype=np.float32)
    inliers = np.array([[0, 20, 0, 0]])
    out_labels, out_scores, out_inliers = rerank.apply(labels, scores, inliers, weight=0.1, top=4)
    assert out_labels.tolist() == [[2, 1, 3, -2]]
    assert out_inliers.tolist() == [[20, 0, 0, 0]]
    np.testing.assert_allclose(out_scores[0, :3], [0.8 + 0.1 * np.log(21), 0.9, 0.7], rtol=1e-6)
    assert out_scores[0, 3] == -np.inf
    same, _, _ = rerank.apply(labels, scores, inliers, weight=0.0, top=4)
    assert same.tolist() == labels.tolist()


def test_candidate_inliers_takes_the_best_photo_of_each_individual_and_skips_masked_rows() -> None:
    query = rerank.extract(blobs(1))
    gallery = [rerank.extract(blobs(5)), rerank.extract(moved(blobs(1))), rerank.extract(blobs(6)),
               rerank.extract(blobs(1))]
    gallery_labels = np.array([7, 7, 8, -1])  # row 3 is masked: an identical photo that must not count
    inl = rerank.candidate_inliers(np.array([[8, 7, -2]]), [query], gallery, gallery_labels, ransac_px=4.0)
    assert inl.shape == (1, 3)
    assert inl[0, 1] >= 20 and inl[0, 0] <= 6 and inl[0, 2] == 0


def test_candidate_inliers_with_a_photo_limit_verifies_the_photos_closest_by_embedding() -> None:
    query = rerank.extract(blobs(1))
    gallery = [rerank.extract(blobs(5)), rerank.extract(moved(blobs(1)))]  # both of individual 7
    gallery_labels = np.array([7, 7])
    query_emb = np.array([[1.0, 0.0]], dtype=np.float32)
    kwargs = {"ransac_px": 4.0, "photos": 1, "query_emb": query_emb}
    # The matching photo is the closer one by embedding: verified.
    near = rerank.candidate_inliers(np.array([[7]]), [query], gallery, gallery_labels,
                                    gallery_emb=np.array([[0.0, 1.0], [1.0, 0.0]], np.float32), **kwargs)
    # It is the farther one: only the other photo is verified, so no evidence.
    far = rerank.candidate_inliers(np.array([[7]]), [query], gallery, gallery_labels,
                                   gallery_emb=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), **kwargs)
    every = rerank.candidate_inliers(np.array([[7]]), [query], gallery, gallery_labels, ransac_px=4.0)
    assert near[0, 0] >= 20 and every[0, 0] == near[0, 0]
    assert far[0, 0] <= 6
    # The closest photo has no features (an unreadable crop): it does not use up the one slot.
    unreadable = [rerank.LocalFeatures.empty(), gallery[1]]
    skipped = rerank.candidate_inliers(np.array([[7]]), [query], unreadable, gallery_labels,
                                       gallery_emb=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), **kwargs)
    assert skipped[0, 0] == near[0, 0]


def test_a_mirrored_photo_verifies_only_through_the_mirrored_query_features(tmp_path: Path) -> None:
    # The gallery photo shows the query's marks seen from the other side (mirrored, then moved).
    cv2.imwrite(str(tmp_path / "q.png"), blobs(1))
    (plain,), _ = rerank.extract_files([str(tmp_path / "q.png")], 500, 1.5, workers=1)
    (mirror,), _ = rerank.extract_files([str(tmp_path / "q.png")], 500, 1.5, workers=1, mirror=True)
    gallery = [rerank.extract(moved(cv2.flip(blobs(1), 1))), rerank.extract(moved(blobs(1)))]
    labels = np.array([7, 8])
    one_view = rerank.candidate_inliers(np.array([[7, 8]]), [plain], gallery, labels, ransac_px=4.0)
    both = rerank.candidate_inliers(np.array([[7, 8]]), [plain], gallery, labels, ransac_px=4.0, mirrored=[mirror])
    assert one_view[0, 0] <= 6 and both[0, 0] >= 20  # the mirrored side is found only with the mirror view
    assert both[0, 1] == one_view[0, 1] >= 20  # the same side still verifies, unchanged


def test_stage_04_with_rerank_on_records_the_choice_and_names_unreadable_crops(tmp_path: Path) -> None:
    make_artifacts(tmp_path)
    bad = tmp_path / "data" / "test_images" / "te_3.jpg"
    bad.write_bytes(b"not a jpeg")
    path = submit.run(config(tmp_path, "rerank.enabled=true", "rerank.candidates=6"))
    metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    record = metrics["rerank"]
    # The fixture's photos are flat colours: no keypoints, no evidence, so weight 0 ties best and wins.
    assert record["weight"] == 0.0
    assert set(record["validation_map5_by_weight"]) == {"0.0", "0.1", "0.2", "0.3", "0.5"}
    assert record["unreadable_count"] == 1 and record["unreadable"][0].endswith("te_3.jpg")
    assert record["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # `device: auto`
    with_rerank = pd.read_csv(path, dtype=str, keep_default_na=False)
    plain = pd.read_csv(submit.run(config(tmp_path)), dtype=str, keep_default_na=False)
    assert with_rerank.equals(plain)


def test_image_embeddings_average_the_rows_of_each_image_in_the_order_asked() -> None:
    vectors = np.array([[1, 0], [0, 1], [3, 4]], dtype=np.float32)  # rows: a, a (flipped), b
    out = submit._image_embeddings(vectors, np.array(["a", "a", "b"]), np.array(["b", "a"]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)
    with pytest.raises(ValueError, match="no embedding row for image c"):
        submit._image_embeddings(vectors, np.array(["a", "a", "b"]), np.array(["c"]))


@pytest.mark.parametrize(("photos", "mirror", "geometry"),
                         [(0, False, "similarity"), (1, False, "similarity"), (0, True, "similarity"),
                          (0, False, "translation")])
def test_stage_04_rerank_moves_the_individual_whose_photos_share_the_query_marks_to_first(
    tmp_path: Path, photos: int, mirror: bool, geometry: str,
) -> None:
    make_artifacts(tmp_path)
    plain = pd.read_csv(submit.run(config(tmp_path)), dtype=str, keep_default_na=False)
    first = dict(zip(plain["image"], plain["predictions"].str.split()))["te_0.jpg"]
    # A lower-ranked individual of te_0 gets photos with te_0's marks (moved): only the local
    # features can know, so only re-ranking can put it first.
    other = next(p for p in first[1:] if p not in (first[0], "new_individual"))
    data = tmp_path / "data"
    # In the mirror case the query shows the other side: its marks mirrored. With the translation
    # geometry (photos aligned to one pose) the query is only shifted.
    query = moved(cv2.flip(blobs(1), 1) if mirror else blobs(1),
                  **({"angle": 0.0, "scale": 1.0} if geometry == "translation" else {}))
    cv2.imwrite(str(data / "test_images" / "te_0.jpg"), query)
    for j in range(3):
        cv2.imwrite(str(data / "train_images" / f"tr_{int(other[2:])}_{j}.jpg"), blobs(1))

    def top(with_mirror: bool) -> str:
        sets = ("rerank.enabled=true", "rerank.candidates=6", "rerank.weights=[0.1]", f"rerank.photos={photos}",
                f"rerank.mirror={str(with_mirror).lower()}", f"rerank.geometry={geometry}",
                "rerank.ransac_px=12" if geometry == "translation" else "rerank.ransac_px=6")
        path = submit.run(config(tmp_path, *sets))
        return dict(zip(*pd.read_csv(path, dtype=str, keep_default_na=False).T.values))["te_0.jpg"].split()[0]

    assert top(mirror) == other
    record = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())["rerank"]
    assert record["weight"] == 0.1 and record["how"] == "rerank.weights (one value)"
    assert record["mirror"] is mirror and record["geometry"] == geometry
    page = (tmp_path / "out" / "04_submit" / "report.html").read_text()
    assert " inliers" in page  # the report shows each candidate's verification evidence
    if mirror:  # the mirrored side is found only by matching the query's mirror image
        assert top(False) != other


@pytest.mark.parametrize(("setting", "message"), [
    ("rerank.geometry=affine", "rerank.geometry must be one of \\['similarity', 'translation'\\], got 'affine'"),
    ("rerank.candidates=3", "rerank.candidates must be at least 5"),
    ("rerank.ratio=1.2", "0 < ratio < 1"),
    ("device=tpu", "unknown device 'tpu'"),
    *([] if torch.cuda.is_available() else [("device=cuda", "no CUDA GPU is visible")]),
])
def test_stage_04_refuses_a_bad_rerank_setting_before_any_work(tmp_path: Path, setting: str, message: str) -> None:
    make_artifacts(tmp_path)
    with pytest.raises(UserError, match=message):
        submit.run(config(tmp_path, "rerank.enabled=true", setting))
    assert not (tmp_path / "out" / "submission.csv").exists()
