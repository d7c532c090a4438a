"""Stage 04 on synthetic stage-00/03 artifacts written per docs/ARTIFACTS.md (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from whaleid import knn, submit
from whaleid.config import load_config
from whaleid.errors import UserError
from whaleid.metrics import NEW_ID

N_IDS, PER_ID, DIM = 12, 3, 32


def _write_image(path: Path, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((24, 32, 3), colour, dtype=np.uint8))


def make_artifacts(tmp: Path, flip_separate: bool = True) -> tuple[list[str], dict[str, str]]:
    """A catalogue of 12 individuals x 3 train images, 10 test images (2 new, 1 never embedded).

    Embeddings sit near one centre per individual, so a correct pipeline ranks them right.
    Returns (sample image order, test answers).
    """
    rng = np.random.default_rng(0)
    data, out = tmp / "data", tmp / "out"
    ids = [f"id{i:02d}" for i in range(N_IDS)]
    centres = knn.l2_normalize(rng.standard_normal((N_IDS + 2, DIM)))
    train = pd.DataFrame({
        "image": [f"tr_{i}_{j}.jpg" for i in range(N_IDS) for j in range(PER_ID)],
        "individual_id": [ids[i] for i in range(N_IDS) for _ in range(PER_ID)],
        "label": [i for i in range(N_IDS) for _ in range(PER_ID)],
        "species": ["beluga" if i < 6 else "gray_whale" for i in range(N_IDS) for _ in range(PER_ID)],
    })
    train["species_label"] = (train["species"] == "gray_whale").astype(int)
    # Fold 0 validates image j == 0 of individuals 0-5; individuals 10 and 11 are wholly in fold 0 (new).
    j = train["image"].str.split("_").str[2].str[0].astype(int)
    train["fold"] = np.where(((train["label"] < 6) & (j == 0)) | (train["label"] >= 10), 0, -1)
    train["fold_new"] = train["label"] >= 10
    test_truth = [0, 1, 2, 3, 4, 5, 6, 7, N_IDS, N_IDS + 1]  # the last two are new individuals
    test = pd.DataFrame({"image": [f"te_{i}.jpg" for i in range(len(test_truth))]})
    test = test.assign(individual_id="", label=-1, species="", species_label=-1, fold=-1, fold_new=False)
    cat = pd.concat([train.assign(split="train"), test.assign(split="test")], ignore_index=True)
    cat["path"] = [str(data / ("train_images" if s == "train" else "test_images") / i)
                   for s, i in zip(cat["split"], cat["image"])]
    cat["width"], cat["height"] = 32, 24
    for k, p in enumerate(cat["path"]):
        _write_image(Path(p), 20 * (k % 12))
    cols = ["image", "split", "path", "width", "height", "species", "individual_id", "label", "species_label",
            "fold", "fold_new"]
    (out / "00_prepare").mkdir(parents=True)
    cat[cols].to_csv(out / "00_prepare" / "catalogue.csv", index=False)
    (out / "00_prepare" / "label_encoders.json").write_text(json.dumps(
        {"individual_id": ids, "species": ["beluga", "gray_whale"]}))

    def noisy(c: int, n: int) -> np.ndarray:
        return knn.l2_normalize(centres[c] + 0.15 * rng.standard_normal((n, DIM)))

    flips = [0, 1] if flip_separate else [-1]
    tr_rows = [(img, "fullbody", f) for img in train["image"] for f in flips]
    tr_emb = np.concatenate([noisy(lab, len(flips)) for lab in train["label"]])
    embedded = test["image"].tolist()[:-1]  # te_9 was excluded upstream: no embedding
    te_rows = [(img, "fullbody", f) for img in embedded for f in flips]
    te_emb = np.concatenate([noisy(test_truth[k], len(flips)) for k in range(len(embedded))])
    emb_dir = out / "03_embed"
    emb_dir.mkdir(parents=True)
    np.save(emb_dir / "train_emb.npy", tr_emb.astype(np.float32))
    np.save(emb_dir / "test_emb.npy", te_emb.astype(np.float32))
    pd.DataFrame(tr_rows, columns=["image", "source", "flip"]).to_csv(emb_dir / "train_index.csv", index=False)
    pd.DataFrame(te_rows, columns=["image", "source", "flip"]).to_csv(emb_dir / "test_index.csv", index=False)
    (emb_dir / "report.json").write_text(json.dumps({"checkpoint": {"kind": "untrained", "path": None}}))

    sample = list(reversed(test["image"].tolist()))  # an order different from the index files
    data.mkdir(exist_ok=True)
    train[["image", "species", "individual_id"]].to_csv(data / "train.csv", index=False)
    pd.DataFrame({"image": sample, "predictions": ""}).to_csv(data / "sample_submission.csv", index=False)
    answers = {img: (ids[t] if t < N_IDS else NEW_ID) for img, t in zip(test["image"], test_truth)}
    pd.DataFrame({"image": list(answers), "individual_id": list(answers.values())}).to_csv(
        data / "test_labels.csv", index=False)
    return sample, answers


def config(tmp: Path, *sets: str):
    return load_config(sets=[f"paths.data={tmp / 'data'}", f"paths.outputs={tmp / 'out'}",
                             "knn.report_queries=4", "knn.backend=faiss_cpu", *sets])


def test_stage_04_end_to_end(tmp_path: Path) -> None:
    sample, answers = make_artifacts(tmp_path)
    path = submit.run(config(tmp_path))
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert sub["image"].tolist() == sample
    submit.validate_submission(sub, sample, {f"id{i:02d}" for i in range(N_IDS)})
    preds = dict(zip(sub["image"], sub["predictions"].str.split()))
    assert preds["te_9.jpg"][0] == NEW_ID  # the fallback row of the image without an embedding
    for img in [f"te_{i}.jpg" for i in range(8)]:
        assert answers[img] in preds[img][:2], (img, preds[img])
    metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    assert metrics["counts"]["fallback_rows"] == 1 and metrics["counts"]["fallback_images"] == ["te_9.jpg"]
    assert metrics["validation"]["n"] == 12 and metrics["validation"]["n_new"] == 6
    assert metrics["validation"]["map5"] > 0.8
    assert metrics["test"]["map5"] > 0.7
    assert metrics["threshold"]["how"].startswith("calibrate")
    out = tmp_path / "out" / "04_submit"
    for name in ["report.html", "contact_sheet.png", "pseudo_labels.csv", "config.resolved.yaml"]:
        assert (out / name).exists(), name
    pseudo = pd.read_csv(out / "pseudo_labels.csv")
    assert list(pseudo.columns) == ["image", "individual_id", "confidence"]
    assert (pseudo["confidence"] >= 0.8).all()


def test_refit_validates_on_the_fold_model_and_ranks_test_with_the_refit_model(tmp_path: Path) -> None:
    """fold_train_emb.npy (train.refit) gives each known validation query the vector of the next
    individual's photo, and individuals 6 and 7 random vectors: validation must get the queries
    wrong at rank 1, while the test images of 6 and 7 (ranked with train_emb.npy) stay right."""
    _, answers = make_artifacts(tmp_path, flip_separate=False)
    emb_dir = tmp_path / "out" / "03_embed"
    index = pd.read_csv(emb_dir / "train_index.csv")
    train_emb = np.load(emb_dir / "train_emb.npy")
    fold_emb = train_emb.copy()
    rows = {img: i for i, img in enumerate(index["image"])}
    for i in range(6):  # validation queries tr_i_0 take the vector of tr_{i+1 mod 6}_1
        fold_emb[rows[f"tr_{i}_0.jpg"]] = train_emb[rows[f"tr_{(i + 1) % 6}_1.jpg"]]
    for img in [f"tr_{i}_{j}.jpg" for i in (6, 7) for j in range(PER_ID)]:
        fold_emb[rows[img]] = knn.l2_normalize(np.random.default_rng(rows[img]).standard_normal((1, DIM)))[0]
    np.save(emb_dir / "fold_train_emb.npy", fold_emb.astype(np.float32))
    index.to_csv(emb_dir / "fold_train_index.csv", index=False)
    submit.run(config(tmp_path))  # report.json names no fold checkpoint: the fold files are not read
    plain = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    report = json.loads((emb_dir / "report.json").read_text())
    (emb_dir / "report.json").write_text(json.dumps(report | {"fold_checkpoint": {"kind": "best", "path": "f.pt"}}))
    sub = pd.read_csv(submit.run(config(tmp_path)), dtype=str, keep_default_na=False)
    metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    assert plain["validation"]["map5_known"] > 0.9
    assert metrics["validation"]["map5_known"] <= 0.5
    preds = dict(zip(sub["image"], sub["predictions"].str.split()))
    for img in ("te_6.jpg", "te_7.jpg"):
        assert answers[img] in preds[img][:2], (img, preds[img])


def test_refit_threshold_keeps_the_fold_models_share_of_new_individual_on_test(tmp_path: Path) -> None:
    """Under train.refit the threshold is calibrated on the fold model's scores, but the refit model
    ranks test. Here the fold model scores the test photos lower than the refit model does (its test
    vectors are noisier), so its cosine threshold, applied to the refit model's scores, puts
    new_individual first less often than it does on its own test scores. knn.refit_threshold share
    gives the refit model's scores the fold model's share."""
    make_artifacts(tmp_path, flip_separate=False)
    emb_dir = tmp_path / "out" / "03_embed"
    train_index, test_index = pd.read_csv(emb_dir / "train_index.csv"), pd.read_csv(emb_dir / "test_index.csv")
    train_emb, test_emb = np.load(emb_dir / "train_emb.npy"), np.load(emb_dir / "test_emb.npy")
    fold_test = knn.l2_normalize(test_emb + 0.6 * np.random.default_rng(1).standard_normal(test_emb.shape))
    for split, emb, index in (("train", train_emb, train_index), ("test", fold_test, test_index)):
        np.save(emb_dir / f"fold_{split}_emb.npy", emb.astype(np.float32))
        index.to_csv(emb_dir / f"fold_{split}_index.csv", index=False)
    report = json.loads((emb_dir / "report.json").read_text())
    (emb_dir / "report.json").write_text(json.dumps(report | {"fold_checkpoint": {"kind": "last", "path": "f.pt"}}))

    def new_first(*sets: str) -> tuple[int, dict]:
        sub = pd.read_csv(submit.run(config(tmp_path, *sets)), dtype=str, keep_default_na=False)
        metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
        return int((sub["predictions"].str.split().str[0] == NEW_ID).sum()), metrics

    n_cosine, cosine = new_first("knn.refit_threshold=cosine")
    n_share, share = new_first()
    t = share["threshold"]["value"]
    labels = train_index["image"].str.split("_").str[1].astype(int).to_numpy()
    fold_top1 = knn.rank_individuals(train_emb, labels, fold_test, k=10, top=5, backend="faiss_cpu")[1][:, 0]
    below = int(np.count_nonzero(fold_top1.astype(np.float64) < t))  # the fold model's new_individual-first test rows
    assert below >= 2
    assert n_share - n_cosine == below, "the refit model's scores must get the fold model's share"
    assert "test_value" not in cosine["threshold"] and share["threshold"]["test_value"] > t
    assert share["validation"] == cosine["validation"]  # the fold model validates either way
    with pytest.raises(UserError, match="knn.refit_threshold"):
        submit.run(config(tmp_path, "knn.refit_threshold=median"))


@pytest.mark.parametrize("sets", [
    ["knn.new_mode=share", "knn.new_share=0.3"],
    ["knn.new_mode=fixed", "knn.new_threshold=2.0"],
    ["knn.per_species=true", "knn.per_species_min=2"],
    ["prepare.fold=-1"],
])
def test_threshold_modes(tmp_path: Path, sets: list[str]) -> None:
    make_artifacts(tmp_path, flip_separate=False)
    sub = pd.read_csv(submit.run(config(tmp_path, *sets)), dtype=str, keep_default_na=False)
    first = sub["predictions"].str.split().str[0]
    metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    if "knn.new_mode=fixed" in sets:
        assert (first == NEW_ID).all()  # no cosine reaches 2.0
    if "knn.new_mode=share" in sets:
        assert metrics["threshold"]["how"].startswith("share")
    if "prepare.fold=-1" in sets:
        assert "validation" not in metrics
        assert "no validation fold" in metrics["threshold"]["how"]  # untrained: falls back to share
    if "knn.per_species=true" in sets:
        assert set(metrics["threshold"]["per_species"]) <= {"beluga", "gray_whale"}


def test_non_finite_embedding_is_named(tmp_path: Path) -> None:
    make_artifacts(tmp_path)
    emb_path = tmp_path / "out" / "03_embed" / "test_emb.npy"
    emb = np.load(emb_path)
    emb[3, 0] = np.nan
    np.save(emb_path, emb)
    with pytest.raises(UserError, match="te_1.jpg"):
        submit.run(config(tmp_path))


@pytest.mark.parametrize("name", ["train_emb.npy", "test_logits.npz"])
def test_truncated_embedding_file_is_named(tmp_path: Path, name: str) -> None:
    make_artifacts(tmp_path)
    emb_dir = tmp_path / "out" / "03_embed"
    np.savez(emb_dir / "test_logits.npz", classes=np.zeros((2, 3), np.int64), cosines=np.zeros((2, 3), np.float32))
    path = emb_dir / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])   # an interrupted copy
    with pytest.raises(UserError, match=rf"{name} is truncated or corrupt .*: rerun 03_embed.py"):
        submit.run(config(tmp_path))
    assert not (tmp_path / "out" / "04_submit" / "submission.csv").exists()


SAMPLE = ["a.jpg", "b.jpg"]
KNOWN = {"x1", "x2", "x3", "x4", "x5"}


@pytest.mark.parametrize("rows, message", [
    ([("a.jpg", "x1 x2 x3 x4 x5")], "lacks 1 image"),
    ([("a.jpg", "x1 x2 x3 x4 x5"), ("a.jpg", "x1 x2 x3 x4 x5")], "more than once"),
    ([("a.jpg", "x1 x2 x3 x4"), ("b.jpg", "x1 x2 x3 x4 x5")], "row 0 .*4 ids"),
    ([("a.jpg", "x1 x2 x3 x4 x5"), ("b.jpg", "x1 x1 x3 x4 x5")], "row 1 .*repeats"),
    ([("a.jpg", "x1 x2 x3 x4 x5"), ("b.jpg", "new_individual x2 x3 x4 zz")], "row 1 .*'zz'"),
    ([("a.jpg", "x1 x2 x3 x4 x5"), ("c.jpg", "x1 x2 x3 x4 x5"), ("b.jpg", "x1 x2 x3 x4 x5")], "c.jpg"),
])
def test_validate_submission_names_the_row(rows: list, message: str) -> None:
    df = pd.DataFrame(rows, columns=["image", "predictions"])
    with pytest.raises(UserError, match=message):
        submit.validate_submission(df, SAMPLE, KNOWN)


def test_validate_submission_accepts_a_good_one() -> None:
    df = pd.DataFrame([("a.jpg", "x1 x2 x3 x4 x5"), ("b.jpg", "new_individual x2 x3 x4 x5")],
                      columns=["image", "predictions"])
    submit.validate_submission(df, SAMPLE, KNOWN)


@pytest.mark.parametrize("with_list", [True, False])
def test_blend_keeps_individuals_without_a_class_on_their_knn_score(with_list: bool) -> None:
    """Stage 04 passes test_logits.npz's `untrained` list to the blend; files from before it
    existed blend every candidate."""
    cfg = load_config(sets=["knn.logit_weight=0.5"])
    images = np.array(["q.jpg"])
    r = submit.Ranking(images, np.array([[1, 2, 4]]), np.array([[0.8, 0.75, 0.5]], np.float32),
                       np.full((1, 3), -1), np.zeros(0, int))
    logits = {"images": images, "labels": np.array([[1, 4]]), "scores": np.array([[0.6, 0.9]], np.float32)}
    if with_list:
        logits["untrained"] = np.array([2])
    emb = submit.Embeddings(np.zeros((0, 2)), np.zeros((0, 2)), pd.DataFrame(), pd.DataFrame(), logits, {})
    labels, scores, note = submit._blend(cfg, emb.logits, r, "test_logits.npz", 5)
    assert note.startswith("on: weight 0.5")
    np.testing.assert_array_equal(labels[0, :3], [2, 1, 4] if with_list else [1, 4, 2])


def test_a_small_k_searches_deeper_and_gives_the_same_submission(tmp_path: Path) -> None:
    """With knn.k=1 each query's neighbours hold one individual; stage 04 searches deeper, so the
    submission, the scores and the report match knn.k=50 (before, the report crashed on padding)."""
    make_artifacts(tmp_path)
    wide = pd.read_csv(submit.run(config(tmp_path)), dtype=str)
    wide_metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    narrow = pd.read_csv(submit.run(config(tmp_path, "knn.k=1")), dtype=str)
    metrics = json.loads((tmp_path / "out" / "04_submit" / "metrics.json").read_text())
    pd.testing.assert_frame_equal(narrow, wide)
    assert metrics["validation"] == wide_metrics["validation"]
    assert metrics["counts"]["searched_deeper"] == {"test": 9, "validation": 12}
    assert wide_metrics["counts"]["searched_deeper"] == {"test": 0, "validation": 0}
    assert metrics["report"]["queries"] == 4


def test_to_ids_never_turns_padding_into_an_id() -> None:
    out = submit.to_ids(np.array([[0, knn.NEW_LABEL, 1, knn.PAD_LABEL, knn.PAD_LABEL]]), ["a", "b", "c"])
    assert out == [["a", NEW_ID, "b", "", ""]]


def _ranking(labels: list, scores: list, best: list, gallery_rows: list) -> submit.Ranking:
    return submit.Ranking(np.array([f"q{i}" for i in range(len(labels))], dtype=object), np.array(labels),
                          np.array(scores, np.float32), np.array(best), np.array(gallery_rows))


def test_pseudo_labels_use_the_knn_cosine_and_skip_new_individual_first() -> None:
    """Re-ranked scores (cosine + w log(1 + inliers)) exceed 1; the confidence is the kNN cosine of
    the submission's first individual, and a row with new_individual first is never pseudo-labelled."""
    r = _ranking([[3, 1], [2, 0], [1, 2]], [[0.85, 0.5], [0.95, 0.4], [0.9, 0.3]], [[0, 1]] * 3, [0, 1])
    pred = np.array([[1, 3, 0, 2, 4], [knn.NEW_LABEL, 2, 0, 1, 3], [1, knn.NEW_LABEL, 2, 0, 3]])
    first = pred[:, 0]  # as stage 04 does (in sample order: result.codes[:, 0])
    conf = submit.knn_scores_of(r, first)
    np.testing.assert_allclose(conf, [0.5, -np.inf, 0.9])
    out = submit.pseudo_labels(list(r.images), first, conf, ["a", "b", "c", "d", "e"], 0.8)
    assert out.to_dict("list") == {"image": ["q2"], "individual_id": ["b"], "confidence": [0.9]}


def test_checkpoint_threshold_is_not_applied_to_re_ranked_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submit, "_checkpoint_threshold", lambda report: (0.6, "threshold stored in checkpoint x"))
    cfg = load_config(sets=["prepare.fold=-1", "knn.new_share=0.5"])
    top1 = np.array([0.9, 1.4, 1.1, 0.7], np.float32)
    assert submit.choose_threshold(cfg, None, top1, {}).value == 0.6
    t = submit.choose_threshold(cfg, None, top1, {}, rescored=True)
    assert t.how.startswith("share") and "re-ranked" in t.how
    assert t.value == pytest.approx(1.1) and (top1 < t.value).mean() == 0.5  # 0.7 and 0.9 go new


def test_faiss_gpu_backend_without_a_gpu_is_a_clear_error() -> None:
    if knn.faiss_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    with pytest.raises(UserError, match="faiss_gpu but faiss sees no GPU"):
        submit._check_knn_config(load_config(sets=["knn.backend=faiss_gpu"]))


def test_report_tiles_show_gallery_photos_and_the_query_threshold() -> None:
    """A candidate without a kNN neighbour (brought in by the blend) shows one of its gallery
    photos, never a photo outside the gallery (a validation fold image, maybe the query itself)."""
    train_images = np.array(["fold.jpg", "g1.jpg", "g2.jpg", "g3.jpg"], dtype=object)
    train_labels = np.array([2, 1, 2, 0])
    r = _ranking([[1, 0]], [[0.9, 0.6]], [[0, 2]], [1, 2, 3])  # gallery: train rows 1-3
    crop_of = {("train", i): f"crops/{i}" for i in train_images}
    tiles = submit._candidate_tiles(r, 0, np.array([1, knn.NEW_LABEL, 2, 0, knn.PAD_LABEL]),
                                    np.array([[1, 2, 0]]), np.array([[0.9, 0.7, 0.6]]), 0.65, train_images,
                                    train_labels, crop_of, ["x", "y", "z"], "z")
    assert [t.label for t in tiles] == ["y", NEW_ID, "z", "x"]
    assert [t.path for t in tiles] == ["crops/g1.jpg", None, "crops/g2.jpg", "crops/g3.jpg"]
    assert tiles[1].score == 0.65 and [t.correct for t in tiles] == [False, False, True, False]
