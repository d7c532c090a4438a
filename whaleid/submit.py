"""Stage 04: rank individuals by kNN over the stage-03 embeddings, insert new_individual, write
`submission.csv`, pseudo-labels, metrics and the visual report.

The maths (search, per-individual max, thresholds, MAP@5) lives in `whaleid.knn` and
`whaleid.metrics`; this module reads the artifacts, wires them together and checks the result.

Threshold for new_individual (`knn.new_mode`):
- `calibrate`: the best MAP@5 on the validation fold (`prepare.fold`), optionally per predicted
  species (`knn.per_species`; the species of the top-1 individual, so it works on test images
  whose species is unknown). With no fold (`prepare.fold: -1`, trained on all data) the
  checkpoint's own threshold is used, else the `share` rule, and metrics.json says which.
- `share`: the threshold that puts new_individual first for `knn.new_share` of the test images,
  as the 1st-place solution did.
- `fixed`: `knn.new_threshold`.
The ArcFace-logit blend (`knn.logit_weight`) needs `test_logits.npz` and `train_logits.npz`
(stage 03, `embed.logits_topk > 0`): the validation ranking is blended as the test ranking is,
with the validating model's class cosines, so the threshold is calibrated on blended scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from whaleid import knn, rerank
from whaleid.catalogue import labels_file as answers_file
from whaleid.catalogue import load_catalogue, load_encoders, resolve_data_dir
from whaleid.config import Config
from whaleid.errors import UserError
from whaleid.io import (
    EMBED_FILES,
    STAGE_DIRS,
    check_fresh,
    check_outputs,
    fingerprint_config,
    fingerprint_files,
    load_array,
    require,
    stage_dir,
    stage_inputs_record,
    write_csv,
    write_json,
    write_resolved_config,
)
from whaleid.metrics import NEW_ID, map5_report
from whaleid.report import QueryRow, Tile, write_report

EMBED_MADE_BY = "03_embed.py"
NEW_MODES = ("calibrate", "share", "fixed")
REFIT_THRESHOLDS = ("share", "cosine")
INDEX_COLUMNS = ("image", "source", "flip")
FALLBACK_IDS = 4  # a missing test image gets new_individual + this many most frequent train ids
BLEND_CANDIDATES = 20  # kNN individuals kept per query before the logit blend re-ranks them


@dataclass
class Embeddings:
    """The stage-03 artifacts: embedding rows and, per row, its image, crop source and flip."""

    train: np.ndarray
    test: np.ndarray
    train_index: pd.DataFrame
    test_index: pd.DataFrame
    logits: dict | None
    report: dict
    # train.refit: the fold model's train embeddings, which validation and calibration use
    fold_train: np.ndarray | None = None
    fold_train_index: pd.DataFrame | None = None
    # ... and its test embeddings, which carry the threshold over to the refit model's scores
    fold_test: np.ndarray | None = None
    fold_test_index: pd.DataFrame | None = None
    # the train images' class cosines by the validating model (train_logits.npz), for the blend
    train_logits: dict | None = None


@dataclass
class Ranking:
    """Ranked individuals of each query image, with the merged neighbour lists (for the report)."""

    images: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    best_index: np.ndarray  # per ranked individual, its best neighbour: an index into gallery_rows
    gallery_rows: np.ndarray  # rows of train_emb that formed the gallery
    deepened: int = 0  # queries searched beyond knn.k to find enough individuals


# ---------------------------------------------------------------------------------------------
# Reading and checking the inputs
# ---------------------------------------------------------------------------------------------

def _read_index(path: Path, rows: int) -> pd.DataFrame:
    df = pd.read_csv(require(path, EMBED_MADE_BY), dtype={"image": str, "source": str}, keep_default_na=False)
    missing = [c for c in INDEX_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {missing}: rerun {EMBED_MADE_BY}")
    if len(df) != rows:
        raise UserError(f"{path} has {len(df)} rows but its .npy has {rows}: rerun {EMBED_MADE_BY}")
    return df


def _read_emb(path: Path, index_path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    emb = load_array(path, EMBED_MADE_BY)
    if emb.ndim != 2:
        raise UserError(f"{path} must be a 2-D array, got shape {emb.shape}: rerun {EMBED_MADE_BY}")
    index = _read_index(index_path, len(emb))
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if len(bad):
        raise UserError(f"{path} has non-finite values in row {bad[0]} (image {index['image'].iat[bad[0]]}): "
                        f"rerun {EMBED_MADE_BY}")
    return knn.l2_normalize(emb), index


def load_embeddings(folder: Path) -> Embeddings:
    """Read and check the stage-03 folder: a finished run's files only (report.json and the
    digests it records), shapes, index rows, finite values, optional logits."""
    report = check_outputs(folder / "report.json", EMBED_FILES, EMBED_MADE_BY)
    train, train_index = _read_emb(folder / "train_emb.npy", folder / "train_index.csv")
    test, test_index = _read_emb(folder / "test_emb.npy", folder / "test_index.csv")
    if len(train) == 0:
        raise UserError(f"{folder / 'train_emb.npy'} is empty: no gallery to search")
    if len(test) and test.shape[1] != train.shape[1]:
        raise UserError(f"train and test embeddings differ in size ({train.shape[1]} vs {test.shape[1]}): "
                        f"rerun {EMBED_MADE_BY}")
    logits, train_logits = (load_array(folder / name, EMBED_MADE_BY) if (folder / name).exists() else None
                            for name in ("test_logits.npz", "train_logits.npz"))
    fold_train = fold_index = fold_test = fold_test_index = None
    if report.get("fold_checkpoint"):  # train.refit: written by the same stage-03 run as the rest
        fold_train, fold_index = _read_emb(folder / "fold_train_emb.npy", folder / "fold_train_index.csv")
        if fold_train.shape[1] != train.shape[1]:
            raise UserError(f"{folder / 'fold_train_emb.npy'} and train_emb.npy differ in size: rerun {EMBED_MADE_BY}")
        if (folder / "fold_test_emb.npy").exists():  # a run before the share transfer wrote none
            fold_test, fold_test_index = _read_emb(folder / "fold_test_emb.npy", folder / "fold_test_index.csv")
            if len(fold_test) != len(test) or (len(test) and fold_test.shape[1] != test.shape[1]):
                raise UserError(f"{folder / 'fold_test_emb.npy'} does not match test_emb.npy: rerun {EMBED_MADE_BY}")
    return Embeddings(train, test, train_index, test_index, logits, report, fold_train=fold_train,
                      fold_train_index=fold_index, fold_test=fold_test, fold_test_index=fold_test_index,
                      train_logits=train_logits)


def _train_lookup(catalogue: pd.DataFrame, images: pd.Series, what: str) -> pd.DataFrame:
    """The catalogue train rows of `images` (in that order), or a UserError naming a stray image."""
    train = catalogue[catalogue["split"] == "train"].set_index("image")
    unknown = ~images.isin(train.index)
    if unknown.any():
        raise UserError(f"{what} lists image {images[unknown].iat[0]!r}, which is not a train image of the "
                        f"catalogue: rerun {EMBED_MADE_BY} after 00_prepare_data.py")
    return train.loc[images.to_numpy()].reset_index()


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------

def rank(
    emb: np.ndarray, labels: np.ndarray, gallery_rows: np.ndarray, queries: np.ndarray,
    query_images: np.ndarray, cfg: Config, top: int = 5,
) -> Ranking:
    """kNN of `queries` among the train rows `gallery_rows` (labels: codes of all train rows),
    rows of one query image merged (flips, crop sources), then the per-individual max; a query
    whose `knn.k` neighbours hold fewer than `top` individuals is searched deeper."""
    k = cfg.knn
    if len(queries) == 0:
        empty = np.zeros((0, top), dtype=np.float32)
        codes = np.full((0, top), knn.PAD_LABEL, dtype=np.int64)
        return Ranking(np.array([], dtype=object), codes, empty, np.full((0, top), -1), gallery_rows)
    images, ranked, agg, best, deepened = knn.rank_queries(
        emb[gallery_rows], labels[gallery_rows], queries, query_images, k.k, top,
        backend=knn.backend_for_device(k.backend, cfg.device),
        index=k.index, nlist=k.ivf_nlist, nprobe=k.ivf_nprobe)
    return Ranking(images, ranked, agg, best, gallery_rows, deepened)


def _species_of_labels(train: pd.DataFrame, n_labels: int) -> np.ndarray:
    """Species code of each individual code (the most frequent one; -1 for unused codes)."""
    out = np.full(max(n_labels, 1), -1, dtype=np.int64)
    modes = train.groupby("label")["species_label"].agg(lambda s: s.value_counts().index[0])
    out[modes.index.to_numpy()] = modes.to_numpy()
    return out


def _predicted_species(labels: np.ndarray, label_species: np.ndarray) -> np.ndarray:
    top1 = labels[:, 0] if labels.size else np.zeros(0, dtype=np.int64)
    return np.where(top1 >= 0, label_species[np.clip(top1, 0, None)], -1)


# ---------------------------------------------------------------------------------------------
# new_individual threshold
# ---------------------------------------------------------------------------------------------

@dataclass
class Threshold:
    """The global threshold, optional per-species ones (species code -> value) and how chosen."""

    value: float
    how: str
    per_species: dict[int, float] | None = None

    def for_queries(self, species: np.ndarray) -> np.ndarray | float:
        if not self.per_species:
            return self.value
        return knn.thresholds_for_groups(species, self.per_species, self.value)


def _checkpoint_threshold(report: dict) -> tuple[float | None, str]:
    """The threshold stored in the checkpoint that stage 03 embedded with, or None and why not."""
    ckpt = report.get("checkpoint", {})
    path = ckpt.get("path")
    if not path or ckpt.get("kind") == "untrained":
        return None, "the embeddings come from the untrained backbone, which has no threshold"
    if not Path(path).exists():
        return None, f"checkpoint {path} named by the embed report no longer exists"
    from whaleid.model import read_checkpoint  # torch is only needed on this path

    value = read_checkpoint(path)["threshold"]
    if value is None or not np.isfinite(value):
        return None, f"checkpoint {path} holds no finite threshold"
    return float(value), f"threshold stored in checkpoint {path}"


def choose_threshold(cfg: Config, val: dict | None, test_top1: np.ndarray, report: dict,
                     rescored: bool = False) -> Threshold:
    """Apply `knn.new_mode` (module docstring) to the validation ranking and the test top-1 scores.
    `rescored`: the scores were re-ranked by local features, so a checkpoint's threshold (a cosine)
    does not apply to them."""
    k = cfg.knn
    if k.new_mode not in NEW_MODES:
        raise UserError(f"unknown knn.new_mode {k.new_mode!r}; valid: {list(NEW_MODES)}")
    if k.new_mode == "fixed":
        note = (" (a cosine, compared with re-ranked scores: cosine + weight x log(1 + inliers))"
                if rescored else "")
        if rescored:
            print(f"note: knn.new_threshold{note}")
        return Threshold(k.new_threshold, f"fixed: knn.new_threshold{note}")
    share = Threshold(knn.threshold_for_share(test_top1, k.new_share),
                      f"share: new_individual first for {k.new_share:.0%} of test images")
    if k.new_mode == "share":
        return share
    if val is None:
        value, why = _checkpoint_threshold(report)
        if value is not None and rescored:
            value, why = None, "the checkpoint's threshold is a cosine, not a re-ranked score"
        if value is None:
            share.how += f" (calibrate asked, but there is no validation fold and {why})"
            print(f"note: no validation fold to calibrate on and {why}; using the share rule")
            return share
        return Threshold(value, f"calibrate: no validation fold, so the {why}")
    value, _ = knn.calibrate_threshold(val["labels"], val["scores"], val["truth"])
    how = f"calibrate: best MAP@5 on fold {cfg.prepare.fold} ({len(val['truth'])} queries)"
    table = None
    if k.per_species:
        table = knn.calibrate_per_group(val["labels"], val["scores"], val["truth"], val["species"],
                                        k.per_species_min, value)
        how += f", per predicted species with >= {k.per_species_min} queries, else global"
    return Threshold(value, how, table)


def refit_threshold(cfg: Config, threshold: Threshold, emb: Embeddings, val: dict | None,
                    test_top1: np.ndarray, rescored: bool, blended: bool) -> Threshold:
    """The threshold for the test ranking. Under train.refit it was calibrated on the fold model's
    scores, but the refit model ranks test, and it scores higher (it has trained on more photos
    and on the fold's own animals). With knn.refit_threshold `share`, the fold model ranks the test
    images too, and each threshold becomes the one that puts new_individual first for the same
    share of them on the refit model's scores (demo: `new` 0.70-0.81 -> 0.85-0.86 on folds 0-2).
    Per-species thresholds move by the share over all test images, not per species."""
    calibrated = cfg.knn.new_mode == "calibrate" and val is not None
    if emb.fold_train is None or not calibrated or cfg.knn.refit_threshold == "cosine":
        return threshold
    if rescored or blended:
        why = "re-ranked" if rescored else "logit-blended"
        print(f"note: knn.refit_threshold share compares kNN cosines and these scores are {why}; the fold "
              "model's threshold is applied as it is")
        return threshold
    if emb.fold_test is None:
        print(f"note: knn.refit_threshold share needs fold_test_emb.npy, which {EMBED_MADE_BY} did not write (an "
              "earlier version, or knn.refit_threshold cosine then); the fold model's threshold is applied as it is")
        return threshold
    # the validation's gallery: the fold model's train vectors and their catalogue rows (`rank_all`)
    fold = rank(val["emb"], val["rows"]["label"].to_numpy(), np.arange(len(val["emb"])), emb.fold_test,
                emb.fold_test_index["image"].to_numpy(), cfg, 5)
    source = fold.scores[:, 0]

    def move(t: float) -> float:
        return knn.transfer_threshold(t, source, test_top1)

    share = float(np.mean(source < threshold.value)) if len(source) else 0.0
    table = {g: move(t) for g, t in threshold.per_species.items()} if threshold.per_species else None
    return Threshold(move(threshold.value),
                     f"{threshold.how}: {threshold.value:.4f} on the fold model's scores puts new_individual first "
                     f"for {share:.1%} of the test images, the same share on the refit model's (knn.refit_threshold)",
                     table)


# ---------------------------------------------------------------------------------------------
# Validation fold
# ---------------------------------------------------------------------------------------------

def validation_ranking(cfg: Config, train_emb: np.ndarray, rows: pd.DataFrame, label_species: np.ndarray,
                       top: int = 5) -> dict | None:
    """Rank the fold's train images against the other train images; None when there is no fold.

    `rows` are the catalogue rows of the train embedding rows `train_emb`, aligned with them (with
    train.refit, the fold model's embeddings: the refit model has trained on the fold).
    """
    fold = cfg.prepare.fold
    if fold < 0:
        return None
    is_query = (rows["fold"] == fold).to_numpy()
    if not is_query.any() or is_query.all():
        print(f"note: fold {fold} has no usable validation split among the embedded images; skipping validation")
        return None
    r = rank(train_emb, rows["label"].to_numpy(), np.flatnonzero(~is_query), train_emb[is_query],
             rows["image"].to_numpy()[is_query], cfg, top)
    truth_rows = rows[is_query].drop_duplicates("image").set_index("image").loc[r.images]
    truth = np.where(truth_rows["fold_new"].to_numpy(), knn.NEW_LABEL, truth_rows["label"].to_numpy())
    return {"ranking": r, "labels": r.labels, "scores": r.scores, "truth": truth, "is_query": is_query,
            "species": _predicted_species(r.labels, label_species), "emb": train_emb, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Local-feature re-ranking (whaleid.rerank)
# ---------------------------------------------------------------------------------------------

def _check_rerank_config(cfg: Config) -> None:
    r = cfg.rerank
    if r.candidates < 5:
        raise UserError(f"rerank.candidates must be at least 5 (the submission's 5 ranks), got {r.candidates}")
    if r.features < 8 or r.upscale <= 0 or not 0 < r.ratio < 1 or r.ransac_px <= 0 or r.photos < 0:
        raise UserError("rerank needs features >= 8, upscale > 0, 0 < ratio < 1, ransac_px > 0 and photos >= 0; "
                        f"got features={r.features}, upscale={r.upscale}, ratio={r.ratio}, ransac_px={r.ransac_px}, "
                        f"photos={r.photos}")
    if not r.weights or any(not isinstance(w, (int, float)) or w < 0 for w in r.weights):
        raise UserError(f"rerank.weights must be a non-empty list of numbers >= 0, got {r.weights}")
    if r.geometry not in rerank.GEOMETRIES:
        raise UserError(f"rerank.geometry must be one of {list(rerank.GEOMETRIES)}, got {r.geometry!r}")
    from whaleid.inference import resolve_device

    resolve_device(cfg.device)  # the descriptors are matched there: a bad `device` fails before the kNN


def _features_of(cfg: Config, catalogue: pd.DataFrame, keys: list[tuple[str, str]],
                 mirror: bool = False) -> tuple[dict, list[str]]:
    """(split, image) -> RootSIFT features of the crop the report shows (stage 01's first source),
    or of its mirror image."""
    crop_of = _crop_paths(cfg, catalogue)
    unique = list(dict.fromkeys(keys))
    paths = [crop_of.get(key) for key in unique]
    missing = [f"{s}/{i}" for (s, i), p in zip(unique, paths) if p is None]
    if missing:
        raise UserError(f"no crop or photo is catalogued for {missing[0]}: rerun 00_prepare_data.py and 01_detect_crop.py")
    r = cfg.rerank
    feats, bad = rerank.extract_files(paths, r.features, r.upscale, r.workers, mirror=mirror,
                                      desc="local features (mirrored)" if mirror else "local features")
    for path in [] if mirror else bad[:10]:  # a mirrored pass re-reads images already reported
        print(f"warning: cannot read {path}: re-ranked with no local features (embedding score unchanged)")
    return dict(zip(unique, feats)), bad


def _image_embeddings(vectors: np.ndarray, row_images: np.ndarray, images: np.ndarray) -> np.ndarray:
    """One unit vector per image of `images`: the mean of its embedding rows (flips, crop sources)."""
    codes, unique = pd.factorize(pd.Series(row_images))
    sums = np.zeros((len(unique), vectors.shape[1]), dtype=np.float32)
    np.add.at(sums, codes, vectors)
    where = pd.Index(unique).get_indexer(images)
    if (where < 0).any():
        raise ValueError(f"no embedding row for image {np.asarray(images)[where < 0][0]}")
    return knn.l2_normalize(sums[where])


def rerank_rankings(
    cfg: Config, catalogue: pd.DataFrame, emb: Embeddings, rows: pd.DataFrame, val: dict | None,
    test_images: np.ndarray, labels: np.ndarray, scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Verify the candidates of the validation and test queries, choose the weight on the fold,
    re-sort both (val in place, with its inlier counts as val["inliers"]); returns the test
    (labels, scores, inlier counts), re-sorted, and a metrics record."""
    from whaleid.inference import resolve_device  # imports torch: only when re-ranking

    r = cfg.rerank
    device = str(resolve_device(cfg.device))  # descriptors are matched there (the same matches on either)
    start = time.time()
    # The gallery is one entry per train image (its embedding rows may be several: flips, sources).
    first = ~rows["image"].duplicated().to_numpy()
    gallery_images = rows["image"].to_numpy()[first]
    gallery_labels = rows["label"].to_numpy()[first]
    gallery_emb = _image_embeddings(emb.train, rows["image"].to_numpy(), gallery_images)
    needed = set(np.unique(labels[labels >= 0]))
    if val is not None:
        needed |= set(np.unique(val["labels"][val["labels"] >= 0]))
    gallery_keys = [("train", i) for i in gallery_images]
    val_images = val["ranking"].images if val is not None else np.array([], dtype=object)
    val_keys = [("train", i) for i in val_images]
    feats, bad = _features_of(cfg, catalogue, [k for k, code in zip(gallery_keys, gallery_labels) if code in needed]
                              + val_keys + [("test", i) for i in test_images])
    empty = rerank.LocalFeatures.empty()
    gallery = [feats.get(k, empty) for k in gallery_keys]
    opts = {"ratio": r.ratio, "ransac_px": r.ransac_px, "geometry": r.geometry, "photos": r.photos,
            "gallery_emb": gallery_emb, "device": device}
    # Queries are also matched as their mirror image (rerank.mirror): either side of a fin.
    mirrored = (_features_of(cfg, catalogue, val_keys + [("test", i) for i in test_images], mirror=True)[0]
                if r.mirror else {})

    record: dict = {"candidates": r.candidates, "features": r.features, "upscale": r.upscale, "photos": r.photos,
                    "ratio": r.ratio, "geometry": r.geometry, "ransac_px": r.ransac_px, "mirror": bool(r.mirror),
                    "unreadable": bad[:10], "unreadable_count": len(bad), "device": device}
    weight, how = r.default_weight, "rerank.default_weight (no validation fold)"
    if val is not None:
        val_first = ~val["rows"]["image"].duplicated().to_numpy()
        val_gallery_emb = (gallery_emb if val["emb"] is emb.train  # without refit: the same vectors
                           else _image_embeddings(val["emb"], val["rows"]["image"].to_numpy(), gallery_images))
        is_query = pd.Index(val["rows"]["image"].to_numpy()[val_first & val["is_query"]])
        masked = np.where(is_query.get_indexer(gallery_images) >= 0, -1, gallery_labels)  # a fold image never verifies its fold
        inl = rerank.candidate_inliers(val["labels"], [feats[k] for k in val_keys], gallery, masked,
                                       desc="verify validation",
                                       mirrored=[mirrored[k] for k in val_keys] if r.mirror else None,
                                       query_emb=val_gallery_emb[pd.Index(gallery_images).get_indexer(val_images)],
                                       **(opts | {"gallery_emb": val_gallery_emb}))
        by_weight = {}
        for w in r.weights:
            lab, sc, _ = rerank.apply(val["labels"], val["scores"], inl, w)
            by_weight[float(w)] = knn.calibrate_threshold(lab, sc, val["truth"])[1]
        weight = max(by_weight, key=lambda w: (by_weight[w], -w))  # ties: the smaller weight
        how = ("rerank.weights (one value)" if len(r.weights) == 1 else
               f"best validation MAP@5 (threshold calibrated per weight) on fold {cfg.prepare.fold}")
        val["labels"], val["scores"], val["inliers"] = rerank.apply(val["labels"], val["scores"], inl, weight)
        record["validation_map5_by_weight"] = by_weight
        # inliers of the re-ranked first candidate
        record["validation_top1_inliers_median"] = float(np.median(val["inliers"][:, 0])) if len(inl) else 0.0
    test_emb = _image_embeddings(emb.test, emb.test_index["image"].to_numpy(), test_images)
    inl = rerank.candidate_inliers(labels, [feats[("test", i)] for i in test_images], gallery, gallery_labels,
                                   desc="verify test", query_emb=test_emb, **opts,
                                   mirrored=[mirrored[("test", i)] for i in test_images] if r.mirror else None)
    labels, scores, inl = rerank.apply(labels, scores, inl, weight)
    record |= {"weight": float(weight), "how": how, "seconds": round(time.time() - start, 2)}
    print(f"re-ranked {len(test_images)} test and {len(val_keys)} validation queries by local features: "
          f"weight {weight} ({how}), descriptors matched on {device}, {record['seconds']:.0f} s")
    return labels, scores, inl, record


# ---------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------

def to_ids(codes: np.ndarray, id_names: list[str]) -> list[list[str]]:
    """Label codes to individual ids (NEW_LABEL -> new_individual, PAD_LABEL -> "", which matches
    no answer; a submission row keeping one fails `validate_submission`)."""
    names = np.asarray(list(id_names) + [NEW_ID, ""], dtype=object)
    codes = np.asarray(codes)
    where = np.where(codes == knn.NEW_LABEL, len(id_names), np.where(codes < 0, len(id_names) + 1, codes))
    return [list(row) for row in names[where]]


def validate_submission(df: pd.DataFrame, sample_images: list[str], known_ids: set[str]) -> None:
    """Check a submission before it is written: every sample image once and in order, 5 distinct
    ids each, each a train id or new_individual. Raises a UserError naming the first bad row."""
    if list(df.columns) != ["image", "predictions"]:
        raise UserError(f"submission columns must be ['image', 'predictions'], got {list(df.columns)}")
    dup = df["image"].duplicated()
    if dup.any():
        raise UserError(f"submission row {int(np.flatnonzero(dup)[0])}: image {df['image'][dup].iat[0]!r} "
                        "appears more than once")
    missing = sorted(set(sample_images) - set(df["image"]))
    if missing:
        raise UserError(f"submission lacks {len(missing)} image(s) of sample_submission.csv, e.g. {missing[0]!r}")
    extra = sorted(set(df["image"]) - set(sample_images))
    if extra:
        raise UserError(f"submission has image {extra[0]!r}, which is not in sample_submission.csv")
    for row, (image, pred) in enumerate(zip(df["image"], df["predictions"])):
        ids = str(pred).split()
        where = f"submission row {row} (image {image!r})"
        if len(ids) != 5:
            raise UserError(f"{where} has {len(ids)} ids, needs 5: {pred!r}")
        if len(set(ids)) != 5:
            raise UserError(f"{where} repeats an id: {pred!r}")
        unknown = [i for i in ids if i != NEW_ID and i not in known_ids]
        if unknown:
            raise UserError(f"{where} has id {unknown[0]!r}, which is neither a train id nor {NEW_ID}")


def _sample_images(cfg: Config) -> list[str]:
    path = resolve_data_dir(cfg) / "sample_submission.csv"
    df = pd.read_csv(require(path, "the data download (or 00_prepare_data.py for the demo set)"),
                     dtype=str, keep_default_na=False)
    if "image" not in df.columns:
        raise UserError(f"{path} has no column 'image' (columns: {list(df.columns)})")
    return df["image"].tolist()


def _blend(cfg: Config, logits: dict | None, r: Ranking, name: str, top: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The ranking `r` after the optional ArcFace-logit blend with `logits` (stage 03's `name`),
    `top` individuals a query, and a note on what happened."""
    w = cfg.knn.logit_weight
    if w <= 0:
        return r.labels[:, :top], r.scores[:, :top], "off (knn.logit_weight = 0)"
    if logits is None:
        print(f"note: knn.logit_weight > 0 but 03_embed wrote no {name} "
              "(set embed.logits_topk > 0 and rerun it); ranking by kNN only")
        return r.labels[:, :top], r.scores[:, :top], f"skipped: no {name}"
    pos = pd.Series(np.arange(len(logits["images"])), index=logits["images"])
    missing = ~np.isin(r.images, pos.index)
    if missing.any():
        raise UserError(f"{name} lacks image {r.images[missing][0]!r}: rerun {EMBED_MADE_BY}")
    rows = pos.loc[r.images].to_numpy()
    untrained = logits["untrained"] if "untrained" in logits else None  # older stage-03 files lack it
    labels, scores = knn.blend_logits(r.labels, r.scores, logits["labels"][rows],
                                      logits["scores"][rows].astype(np.float32), w, top=top, unblended=untrained)
    return labels, scores, f"on: weight {w} over {logits['labels'].shape[1]} class cosines"


def _blend_validation(cfg: Config, emb: Embeddings, val: dict | None, top: int, label_species: np.ndarray) -> str:
    """Blend the validation ranking in place as the test ranking is blended, so the threshold is
    calibrated on the scores it will meet; returns a note."""
    if val is None or cfg.knn.logit_weight <= 0:
        return "off"
    val["labels"], val["scores"], note = _blend(cfg, emb.train_logits, val["ranking"], "train_logits.npz", top)
    val["species"] = _predicted_species(val["labels"], label_species)
    return note


@dataclass
class SubmissionResult:
    """The submission table and what it was made of."""

    submission: pd.DataFrame
    codes: np.ndarray  # (n_sample, 5) label codes in sample order; fallback rows included
    ranked: np.ndarray  # (n_sample,) bool: the image had embeddings (False = fallback row)


def build_submission(
    sample_images: list[str], ranked_images: np.ndarray, pred_codes: np.ndarray, id_names: list[str],
    frequent: np.ndarray,
) -> SubmissionResult:
    """Submission rows in sample order; images without embeddings get new_individual followed by
    the most frequent train ids (documented fallback)."""
    pos = pd.Series(np.arange(len(ranked_images)), index=ranked_images, dtype=np.int64)
    found = np.isin(np.asarray(sample_images, dtype=object), ranked_images)
    fallback = np.concatenate([[knn.NEW_LABEL], frequent[:FALLBACK_IDS]])
    codes = np.tile(fallback, (len(sample_images), 1)).astype(np.int64)
    rows = pos.loc[np.asarray(sample_images, dtype=object)[found]].to_numpy()
    codes[found] = knn.fill_missing(pred_codes[rows], frequent)
    preds = [" ".join(ids) for ids in to_ids(codes, id_names)]
    return SubmissionResult(pd.DataFrame({"image": sample_images, "predictions": preds}), codes, found)


def pseudo_labels(images: list[str], codes: np.ndarray, scores: np.ndarray, id_names: list[str],
                  min_conf: float) -> pd.DataFrame:
    """Test images whose submission row puts a known individual `codes` first (a negative code:
    new_individual) with a kNN cosine `scores` of at least `min_conf`."""
    keep = np.isfinite(scores) & (scores >= min_conf) & (codes >= 0)
    return pd.DataFrame({
        "image": np.asarray(images, dtype=object)[keep],
        "individual_id": np.asarray(id_names, dtype=object)[codes[keep]] if keep.any() else [],
        "confidence": np.round(scores[keep].astype(np.float64), 6),
    })


def read_answers(cfg: Config) -> pd.Series | None:
    """Test answers (image -> individual_id, with new_individual) for scoring, when a file exists."""
    path = answers_file(cfg)
    if path is None:
        return None
    truth = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("image", "individual_id"):
        if col not in truth.columns:
            raise UserError(f"answers file {path} has no column {col!r} (columns: {list(truth.columns)})")
    return truth.drop_duplicates("image").set_index("image")["individual_id"].rename(str(path))


def score_test(submission: pd.DataFrame, answers: pd.Series | None) -> dict | None:
    """MAP@5 report of the submission rows that have an answer (None without answers)."""
    if answers is None:
        return None
    known = submission[submission["image"].isin(answers.index)]
    if known.empty:
        print(f"note: answers file {answers.name} shares no image with the submission; no test score")
        return None
    truth = answers.loc[known["image"]].tolist()
    return map5_report([p.split() for p in known["predictions"]], truth) | {"answers": answers.name}


# ---------------------------------------------------------------------------------------------
# Visual report
# ---------------------------------------------------------------------------------------------

def _crop_paths(cfg: Config, catalogue: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(split, image) -> the crop to show: stage 01's crop of the first crop source, else the photo."""
    paths = {(s, i): p for s, i, p in zip(catalogue["split"], catalogue["image"], catalogue["path"])}
    crops_csv = Path(cfg.paths.outputs) / STAGE_DIRS["crop"] / "crops.csv"
    if crops_csv.exists():
        crops = pd.read_csv(crops_csv, dtype=str, keep_default_na=False)
        if {"split", "image", "source", "crop_path"} <= set(crops.columns):
            order = {name: i for i, name in enumerate(cfg.crop.sources)}
            crops = crops.assign(rank=crops["source"].map(order).fillna(len(order))).sort_values("rank")
            crops = crops.drop_duplicates(["split", "image"])
            paths.update({(s, i): p for s, i, p in zip(crops["split"], crops["image"], crops["crop_path"])})
    return paths


def _candidate_tiles(
    r: Ranking, q: int, codes: np.ndarray, labels: np.ndarray, scores: np.ndarray, threshold: float,
    train_images: np.ndarray, train_labels: np.ndarray, crop_of: dict, id_names: list[str], truth: str | None,
    inliers: np.ndarray | None = None,
) -> list[Tile]:
    """Tiles of query `q`: per predicted code its best-matching gallery crop and score (and, after
    re-ranking, the inlier count of its best-verified photo; `inliers` aligned with `labels`).
    The crop is the individual's best kNN neighbour; a candidate the logit blend brought in shows
    one of its gallery photos. Padding (a gallery of fewer than 5 individuals) gets no tile."""
    tiles = []
    for code in codes:
        if code == knn.NEW_LABEL:
            tiles.append(Tile(NEW_ID, threshold, None, None if truth is None else truth == NEW_ID))
            continue
        if code < 0:
            continue
        name = id_names[code]
        at = np.flatnonzero(r.labels[q] == code)
        nbr = int(r.best_index[q][at[0]]) if len(at) else -1
        if nbr < 0:
            own = np.flatnonzero(train_labels[r.gallery_rows] == code)
            nbr = int(own[0]) if len(own) else -1
        crop = crop_of.get(("train", train_images[r.gallery_rows[nbr]])) if nbr >= 0 else None
        score = scores[q][labels[q] == code]
        verified = inliers[q][labels[q] == code] if inliers is not None else []
        tiles.append(Tile(name, float(score[0]) if len(score) else None, crop, None if truth is None else name == truth,
                          int(verified[0]) if len(verified) else None))
    return tiles


def report_rows(
    cfg: Config, source: str, r: Ranking, pred: np.ndarray, labels: np.ndarray, scores: np.ndarray,
    thresholds: np.ndarray, truth: list[str | None], rows: pd.DataFrame, crop_of: dict, id_names: list[str],
    inliers: np.ndarray | None = None,
) -> list[QueryRow]:
    """QueryRows for a seeded random sample of `knn.report_queries` queries of one ranking
    (`thresholds`: each query's new_individual threshold, shown on its new_individual tile)."""
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.knn.report_queries, len(r.images))
    chosen = np.sort(rng.choice(len(r.images), size=n, replace=False)) if n else []
    split = "test" if source == "test" else "train"
    train_images, train_labels = rows["image"].to_numpy(), rows["label"].to_numpy()
    return [
        QueryRow(str(r.images[q]), crop_of.get((split, r.images[q])), truth[q],
                 _candidate_tiles(r, q, pred[q], labels, scores, float(thresholds[q]), train_images, train_labels,
                                  crop_of, id_names, truth[q], inliers))
        for q in chosen
    ]


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def _check_knn_config(cfg: Config) -> None:
    k = cfg.knn
    if k.k < 1:
        raise UserError(f"knn.k must be at least 1, got {k.k}")
    if k.backend not in knn.BACKENDS:
        raise UserError(f"unknown knn.backend {k.backend!r}; valid: {list(knn.BACKENDS)}")
    if k.index not in ("flat", "ivf"):
        raise UserError(f"unknown knn.index {k.index!r}; valid: ['flat', 'ivf']")
    if k.new_mode not in NEW_MODES:
        raise UserError(f"unknown knn.new_mode {k.new_mode!r}; valid: {list(NEW_MODES)}")
    if k.refit_threshold not in REFIT_THRESHOLDS:
        raise UserError(f"unknown knn.refit_threshold {k.refit_threshold!r}; valid: {list(REFIT_THRESHOLDS)}")
    if not 0.0 <= k.new_share <= 1.0:
        raise UserError(f"knn.new_share must be within [0, 1], got {k.new_share}")
    if not 0.0 <= k.logit_weight <= 1.0:
        raise UserError(f"knn.logit_weight must be within [0, 1], got {k.logit_weight}")
    if k.backend == "faiss_gpu" and knn.faiss_gpus() == 0:
        raise UserError("knn.backend is faiss_gpu but faiss sees no GPU (faiss-cpu installed, or no CUDA device); "
                        "use knn.backend: auto")
    if k.index == "ivf" and knn.resolve_backend(knn.backend_for_device(k.backend, cfg.device)) == "torch":
        print("note: knn.index ivf applies to the faiss backends; the torch backend searches exactly")


def _print_table(metrics: dict) -> None:
    print(f"{'split':<12}{'MAP@5':>8}{'known':>8}{'new':>8}{'acc@1':>8}{'n':>8}")
    for name in ("validation", "test"):
        m = metrics.get(name)
        if m:
            print(f"{name:<12}{m['map5']:>8.4f}{m['map5_known']:>8.4f}{m['map5_new']:>8.4f}"
                  f"{m['acc1']:>8.4f}{m['n']:>8d}")
    t = metrics["threshold"]
    print(f"new_individual threshold {t['value']:.4f} ({t['how']})")
    if "test_value" in t:
        print(f"test ranking (all-data refit model): new_individual threshold {t['test_value']:.4f}")


def _validation_metrics(val: dict, threshold: Threshold, id_names: list[str], fold: int) -> dict:
    """MAP@5 of the fold at the threshold in use, and the best threshold for comparison."""
    pred = knn.insert_new(val["labels"], val["scores"], threshold.for_queries(val["species"]))
    truth_ids = [NEW_ID if t == knn.NEW_LABEL else id_names[t] for t in val["truth"]]
    best_t, best_map = knn.calibrate_threshold(val["labels"], val["scores"], val["truth"])
    val["pred"], val["truth_ids"] = pred, truth_ids
    return map5_report(to_ids(pred, id_names), truth_ids) | {
        "fold": fold, "best_threshold": best_t, "best_map5": best_map}


def _write_visual_report(
    cfg: Config, out: Path, catalogue: pd.DataFrame, rows: pd.DataFrame, val: dict | None,
    test: tuple[Ranking, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray], threshold: Threshold,
    test_threshold: Threshold, answers: pd.Series | None, id_names: list[str],
) -> dict:
    """Show test queries, marked when answers exist; else validation queries (always marked).
    `test` is (ranking, predictions, candidate labels, scores, inlier counts or None, each query's
    threshold); `threshold` is the validation's, `test_threshold` the test ranking's."""
    crop_of = _crop_paths(cfg, catalogue)
    r, pred, labels, scores, inliers, thresholds = test
    if answers is None and val is not None:
        source = "validation"
        r, pred, labels, scores = val["ranking"], val["pred"], val["labels"], val["scores"]
        rows = val["rows"]  # the rows the validation ranking indexes (the fold model's with train.refit)
        inliers = val.get("inliers")
        truth = list(val["truth_ids"])
        thresholds = threshold.for_queries(val["species"])
    else:
        source, threshold = "test", test_threshold
        truth = [answers.get(i) if answers is not None else None for i in r.images]
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64).reshape(-1), (len(r.images),))
    qrows = report_rows(cfg, source, r, pred, labels, scores, thresholds, truth, rows, crop_of, id_names,
                        inliers)
    notes = [f"{len(qrows)} {source} queries (seeded sample); new_individual threshold {threshold.value:.4f} "
             f"({threshold.how}); the new_individual tile shows the query's threshold as its score."]
    paths = write_report(qrows, out, f"whaleid stage 04: {source} queries", notes)
    return {"queries_from": source, "queries": len(qrows)} | paths


def _counts(sample: list[str], result: SubmissionResult, test_rank: Ranking, n_pseudo: int, gallery_rows: int,
            val: dict | None) -> dict:
    fallback = [img for img, ok in zip(sample, result.ranked) if not ok]
    if fallback:
        print(f"note: {len(fallback)} test image(s) have no embedding (excluded upstream); their rows are "
              f"new_individual + the {FALLBACK_IDS} most frequent train ids, e.g. {fallback[0]}")
    return {
        "test_rows": len(sample),
        "fallback_rows": len(fallback),
        "fallback_images": fallback[:10],
        "embedded_test_images_not_in_sample": int((~np.isin(test_rank.images, sample)).sum()),
        "new_first_share": float((result.codes[:, 0] == knn.NEW_LABEL).mean()) if sample else 0.0,
        "pseudo_labels": n_pseudo,
        "gallery_rows": gallery_rows,
        # queries whose knn.k neighbours held fewer individuals than ranked, searched deeper
        "searched_deeper": {"test": test_rank.deepened, "validation": val["ranking"].deepened if val else 0},
    }


@dataclass
class Ranked:
    """Stage 04's rankings before new_individual is inserted: the validation fold's (None without
    one), the test images' kNN ranking, and their final candidates after the logit blend and the
    local-feature re-ranking (with each candidate's inlier count when re-ranked)."""

    val: dict | None
    test: Ranking
    labels: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray | None
    notes: dict  # what the blend and the re-ranking did, for metrics.json

    @property
    def rescored(self) -> bool:
        """Whether re-ranking changed the scores' scale (a weight above 0 was chosen)."""
        return isinstance(self.notes["rerank"], dict) and self.notes["rerank"]["weight"] > 0


def rank_all(cfg: Config, emb: Embeddings, catalogue: pd.DataFrame, rows: pd.DataFrame,
             label_species: np.ndarray) -> Ranked:
    """Validation fold and test images ranked the same way: kNN, then the optional logit blend,
    then the optional re-ranking (whose weight the validation fold chooses)."""
    candidates = cfg.rerank.candidates if cfg.rerank.enabled else 5
    top = max(BLEND_CANDIDATES if cfg.knn.logit_weight > 0 else 5, candidates)
    if emb.fold_train is not None:  # train.refit: validate with the model that did not train on the fold
        val = validation_ranking(cfg, emb.fold_train, _train_lookup(catalogue, emb.fold_train_index["image"],
                                                                    "fold_train_index.csv"), label_species, top)
    else:
        val = validation_ranking(cfg, emb.train, rows, label_species, top)
    val_blend_note = _blend_validation(cfg, emb, val, candidates, label_species)
    test_rank = rank(emb.train, rows["label"].to_numpy(), np.arange(len(emb.train)), emb.test,
                     emb.test_index["image"].to_numpy(), cfg, top)
    labels, scores, blend_note = _blend(cfg, emb.logits, test_rank, "test_logits.npz", candidates)
    rerank_note: dict | str = "off (rerank.enabled = false)"
    inliers = None
    if cfg.rerank.enabled:
        labels, scores, inliers, rerank_note = rerank_rankings(
            cfg, catalogue, emb, rows, val, test_rank.images, labels[:, :candidates], scores[:, :candidates])
        if val is not None:  # the top-1 individual may have changed, and with it its species
            val["species"] = _predicted_species(val["labels"], label_species)
    notes = {"logit_blend": blend_note, "logit_blend_validation": val_blend_note, "rerank": rerank_note}
    return Ranked(val, test_rank, labels, scores, inliers, notes)


def _provenance(cfg: Config, embed_dir: Path, emb_report: dict, stale: list) -> dict:
    """What this submission was made from: input fingerprints, file records, stale inputs. The
    stage-03 files' digests are those its report records, which `load_embeddings` checked."""
    embeddings = sorted(embed_dir.glob("*_emb.npy")) + sorted(embed_dir.glob("*_index.csv"))
    prepared = Path(cfg.paths.outputs) / STAGE_DIRS["prepare"]
    recorded = emb_report.get("output_files")
    return {
        "fingerprints": {
            "inputs": fingerprint_files(embeddings),
            "config": fingerprint_config({"knn": cfg.knn.to_dict(), "rerank": cfg.rerank.to_dict(),
                                          "fold": cfg.prepare.fold}),
        },
        "input_files": (recorded if recorded is not None else stage_inputs_record(embeddings, cfg.paths.outputs))
        | stage_inputs_record([prepared / "catalogue.csv", prepared / "label_encoders.json",
                               resolve_data_dir(cfg) / "sample_submission.csv"], cfg.paths.outputs),
        "stale_inputs": stale,
    }


def run(cfg: Config) -> Path:
    """Stage 04: validate on the fold, rank the test images, write submission.csv and the rest.

    Returns the path of submission.csv (written last).
    """
    start = time.time()
    _check_knn_config(cfg)
    if cfg.rerank.enabled:
        _check_rerank_config(cfg)
    embed_dir = Path(cfg.paths.outputs) / STAGE_DIRS["embed"]
    stale = check_fresh(embed_dir / "report.json", EMBED_MADE_BY)
    emb = load_embeddings(embed_dir)
    catalogue = load_catalogue(cfg)
    encoders = load_encoders(cfg)
    id_names = encoders["individual_id"]
    rows = _train_lookup(catalogue, emb.train_index["image"], "train_index.csv")
    train_cat = catalogue[catalogue["split"] == "train"]
    label_species = _species_of_labels(train_cat, len(id_names))
    frequent = train_cat["label"].value_counts(sort=True).index.to_numpy()

    ranked = rank_all(cfg, emb, catalogue, rows, label_species)
    val, test_rank, labels, scores = ranked.val, ranked.test, ranked.labels, ranked.scores
    threshold = choose_threshold(cfg, val, scores[:, 0], emb.report, ranked.rescored)
    metrics: dict = {"threshold": {"value": threshold.value, "how": threshold.how, "mode": cfg.knn.new_mode}}
    if threshold.per_species:
        metrics["threshold"]["per_species"] = {
            encoders["species"][s] if s >= 0 else "unknown": t for s, t in threshold.per_species.items()}
    if val is not None:
        metrics["validation"] = _validation_metrics(val, threshold, id_names, cfg.prepare.fold)

    test_threshold = refit_threshold(cfg, threshold, emb, val, scores[:, 0], ranked.rescored,
                                     str(ranked.notes["logit_blend"]).startswith("on"))
    if test_threshold is not threshold:
        metrics["threshold"] |= {"test_value": test_threshold.value, "test_how": test_threshold.how}
        if test_threshold.per_species:
            metrics["threshold"]["test_per_species"] = {
                encoders["species"][s] if s >= 0 else "unknown": t for s, t in test_threshold.per_species.items()}
    test_thresholds = test_threshold.for_queries(_predicted_species(labels, label_species))
    pred = knn.insert_new(labels, scores, test_thresholds)
    sample = _sample_images(cfg)
    result = build_submission(sample, test_rank.images, pred, id_names, frequent)
    validate_submission(result.submission, sample, set(id_names))
    answers = read_answers(cfg)
    test_metrics = score_test(result.submission, answers)
    if test_metrics:
        metrics["test"] = test_metrics

    out = stage_dir(cfg, "submit")
    write_resolved_config(cfg, out)
    # Pseudo-labels: the submission's first id when it is a known individual, scored by its kNN
    # cosine (blended and re-ranked scores are on other scales than knn.pseudo_conf).
    pseudo = pseudo_labels(sample, result.codes[:, 0], _in_sample_order(test_rank.images, knn_scores_of(
        test_rank, pred[:, 0]), sample), id_names, cfg.knn.pseudo_conf)
    write_csv(out / "pseudo_labels.csv", pseudo)
    metrics["counts"] = _counts(sample, result, test_rank, len(pseudo), len(emb.train), val)
    metrics.update(ranked.notes)
    metrics["report"] = _write_visual_report(cfg, out, catalogue, rows, val,
                                             (test_rank, pred, labels, scores, ranked.inliers, test_thresholds),
                                             threshold, test_threshold, answers, id_names)
    metrics.update(_provenance(cfg, embed_dir, emb.report, stale))
    metrics["seconds"] = round(time.time() - start, 2)
    write_json(out / "metrics.json", metrics)
    path = Path(cfg.paths.outputs) / "submission.csv"
    write_csv(path, result.submission)
    _print_table(metrics)
    print(f"wrote {path} ({len(result.submission)} rows) and {out}")
    return path


def _in_sample_order(ranked_images: np.ndarray, values: np.ndarray, sample: list[str]) -> np.ndarray:
    """Per sample image, its value among the ranked images' `values` (NaN for images without
    embeddings)."""
    pos = pd.Series(np.arange(len(ranked_images)), index=ranked_images, dtype=np.int64)
    names = np.asarray(sample, dtype=object)
    found = np.isin(names, ranked_images)
    out = np.full(len(sample), np.nan)
    out[found] = values[pos.loc[names[found]].to_numpy()]
    return out


def knn_scores_of(r: Ranking, codes: np.ndarray) -> np.ndarray:
    """Each query's kNN score (the max cosine over the individual's photos) of the individual
    `codes[q]` in the ranking `r`; -inf where `r` does not rank it."""
    hit = r.labels == np.asarray(codes)[:, None]
    return np.where(hit, r.scores, -np.inf).max(axis=1, initial=-np.inf)
