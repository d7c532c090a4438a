"""Stage 03: embed every train (gallery) and test crop with the trained model.

The model is rebuilt from the checkpoint's own config (not today's config.yaml), so embeddings
match what was trained. `embed.checkpoint: untrained` embeds GeM-pooled ImageNet features of a
fresh backbone instead: the floor a trained model must beat. Flip TTA (`embed.flip_tta`):
`average` (the 1st-place TTA) or `separate` (two gallery rows per image); several crop sources
per image are averaged or kept as separate rows (`embed.sources_merge`). Under torchrun each rank
embeds a strided shard and rank 0 gathers the shards and writes every file.

With `train.refit` (stage 02 trained an all-data model in 02_train/refit), the refit model embeds
the train and test images (train_emb.npy, test_emb.npy: what stage 04 ranks the test images
with), and the fold model embeds every image once more (fold_train_emb.npy, fold_test_emb.npy):
stage 04 validates and calibrates on its train vectors, since the refit model has trained on the
fold, and carries the threshold over to the refit model's scores with its test vectors. That fold
model is the fold run's last.pt, trained as long as the refit model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from whaleid.catalogue import load_catalogue, load_encoders
from whaleid.config import Config, config_from_dict, deep_merge
from whaleid.dataset import CropDataset, eval_transform
from whaleid.distributed import Runtime, embed_sharded, init_runtime
from whaleid.errors import UserError
from whaleid.inference import FLIPS, bf16_inference
from whaleid.io import (
    EMBED_FILES,
    STAGE_DIRS,
    atomic_path,
    check_fresh,
    file_digest,
    fingerprint_config,
    fingerprint_files,
    require,
    stage_dir,
    stage_inputs_record,
    write_csv,
    write_json,
    write_npy,
    write_resolved_config,
)
from whaleid.model import build_model, load_checkpoint
from whaleid.train import REFIT_DIR, refit_active

CROP_MADE_BY = "01_detect_crop.py"
CROPS_COLUMNS = ("image", "split", "source", "crop_path")
NAMED_CHECKPOINTS = ("best", "last")
MERGES = ("average", "separate")
LOGIT_CHUNK = 4096
FOLD_FILES = ("fold_train_emb.npy", "fold_train_index.csv", "fold_test_emb.npy", "fold_test_index.csv")


@dataclass
class Loaded:
    """The model to embed with and what it came from."""

    model: nn.Module
    heads: nn.Module | None  # ArcFace heads (None for the untrained floor)
    config: Config  # the config that built the model
    raw: bool  # embed pooled backbone features (no neck)
    info: dict  # checkpoint path, kind, fingerprint, epoch, fold, threshold
    encoders: dict | None  # the label set the heads were trained on (None for the untrained floor)
    class_counts: list[int] | None = None  # training images per individual class (None for the floor)


def uses_refit(cfg: Config) -> bool:
    """Whether stage 03 embeds with the refit model (train.refit, a fold, a named checkpoint)."""
    return refit_active(cfg) and cfg.embed.checkpoint in NAMED_CHECKPOINTS


def checkpoint_path(cfg: Config, refit: bool = False) -> Path | None:
    """The checkpoint file `embed.checkpoint` names (None for `untrained`); with `refit`, the
    refit model's file of that name."""
    name = cfg.embed.checkpoint
    if name == "untrained":
        return None
    if name in NAMED_CHECKPOINTS:
        folder = Path(cfg.paths.outputs) / STAGE_DIRS["train"]
        if refit:
            path = folder / REFIT_DIR / f"{name}.pt"
            if not path.is_file():
                state = ("the refit run has not trained an epoch. Train it with `python 02_train_arcface.py "
                         "--resume` (the finished fold run is kept)" if (folder / "report.json").is_file() else
                         "stage 02 did not finish. Finish it with `python 02_train_arcface.py --resume`")
                raise UserError(f"train.refit is true but {path} does not exist: {state}, with train.refit true; "
                                "or set train.refit false to embed with the fold model")
        else:
            path = require(folder / f"{name}.pt", "02_train_arcface.py")
        if not (path.parent / "report.json").is_file():
            raise UserError(f"{path.parent / 'report.json'} is missing: that training run did not finish "
                            f"(stopped or killed), so {path.name} is a half-trained model. Finish it with "
                            "`python 02_train_arcface.py --resume`, or set embed.checkpoint to the .pt file "
                            "to embed with it anyway")
        return path
    path = Path(name)
    if not path.is_file():
        raise UserError(f"embed.checkpoint {name!r} is neither best, last, untrained nor an existing file")
    return path


def fold_stand_in(cfg: Config) -> Config:
    """`cfg` with embed.checkpoint `last`: the fold model that validates for a refit model."""
    return config_from_dict(deep_merge(cfg.to_dict(), {"embed": {"checkpoint": "last"}}))


def load_model(cfg: Config, refit: bool = False) -> Loaded:
    """The model per `embed.checkpoint` (the refit model's with `refit`), rebuilt from the
    checkpoint's own config."""
    path = checkpoint_path(cfg, refit)
    if path is None:
        model = build_model(cfg, pretrained=True)
        info = {"kind": "untrained", "path": None, "pretrained": cfg.model.pretrained,
                "backbone": cfg.model.backbone}
        return Loaded(model.eval(), None, cfg, True, info, None)
    model, heads, ckpt = load_checkpoint(path)
    info = {
        "kind": (f"refit {cfg.embed.checkpoint}" if refit else cfg.embed.checkpoint)
        if cfg.embed.checkpoint in NAMED_CHECKPOINTS else "path",
        "path": str(path.resolve()),
        "fingerprint": file_digest(path),
        "epoch": int(ckpt["epoch"]),
        "fold": int(ckpt["fold"]),
        "best_metric": float(ckpt["best_metric"]),
        "threshold": float(ckpt["threshold"]),
    }
    return Loaded(model, heads, config_from_dict(ckpt["config"]), False, info, ckpt["label_encoders"],
                  list(ckpt["class_counts"]))


def check_checkpoint_inputs(cfg: Config, loaded: Loaded) -> list[str]:
    """Warnings (or a UserError) when the checkpoint was trained on other data than today's.

    A checkpoint of stage 02 (`best`/`last`) is compared with the catalogue and crops it was
    trained from (02_train/report.json). Any checkpoint trained on another label set than
    label_encoders.json is reported; with `embed.logits_topk > 0` that is an error, since the
    class codes of test_logits.npz would name the wrong individuals in stage 04.
    """
    stale = []
    if cfg.embed.checkpoint in NAMED_CHECKPOINTS:
        stale = check_fresh(Path(cfg.paths.outputs) / STAGE_DIRS["train"] / "report.json", "02_train_arcface.py")
    if loaded.encoders is None:
        return stale
    current = load_encoders(cfg)
    if loaded.encoders != current:
        ids, now = loaded.encoders["individual_id"], current["individual_id"]
        msg = (f"checkpoint {loaded.info['path']} was trained on another label set ({len(ids)} individuals, "
               f"{len(set(ids) & set(now))} of them in label_encoders.json, which has {len(now)})")
        if cfg.embed.logits_topk > 0:
            raise UserError(f"{msg}: its ArcFace logits cannot be used; retrain (02_train_arcface.py) "
                            "or set embed.logits_topk=0")
        print(f"warning: {msg}; the embeddings are still usable for kNN")
        stale.append(msg)
    return stale


def crop_rows(cfg: Config) -> tuple[pd.DataFrame, dict]:
    """One row per (image, crop source) to embed, train then test: image, split, source, crop_path.

    Only catalogue images are embedded (crops of excluded images are skipped); catalogue images
    without a crop are counted, and stage 04 gives such test images its fallback row.
    """
    path = require(Path(cfg.paths.outputs) / STAGE_DIRS["crop"] / "crops.csv", CROP_MADE_BY)
    crops = pd.read_csv(path, dtype=str, keep_default_na=False)
    lacking = [c for c in CROPS_COLUMNS if c not in crops.columns]
    if lacking:
        raise UserError(f"{path} lacks column(s) {lacking}: rerun {CROP_MADE_BY}")
    unknown = sorted(set(cfg.crop.sources) - set(crops["source"]))
    if unknown:
        raise UserError(f"crop source(s) {unknown} of crop.sources are not in {path}: rerun {CROP_MADE_BY}")
    catalogue = load_catalogue(cfg)[["image", "split"]]
    crops = crops[crops["source"].isin(cfg.crop.sources) & (crops["crop_path"] != "")]
    rows = catalogue.merge(crops[list(CROPS_COLUMNS)], on=["image", "split"], how="inner")
    rows = rows.sort_values(["split", "image", "source"], key=_train_first, kind="stable").reset_index(drop=True)
    missing = catalogue[~catalogue.set_index(["image", "split"]).index.isin(rows.set_index(["image", "split"]).index)]
    counts = {
        split: {"images": int(rows.loc[rows["split"] == split, "image"].nunique()),
                "without_crop": int((missing["split"] == split).sum())}
        for split in ("train", "test")
    }
    if len(missing):
        print(f"note: {len(missing)} catalogue image(s) have no crop in {path} and are not embedded, "
              f"e.g. {missing['image'].iat[0]} ({missing['split'].iat[0]})")
    return rows, counts


def _train_first(col: pd.Series) -> pd.Series:
    return col.map({"train": 0, "test": 1}) if col.name == "split" else col


def embed_all(model: nn.Module, dataset: CropDataset, cfg: Config, rt: Runtime, raw: bool) -> np.ndarray | None:
    """Embeddings of `dataset` in order per `embed.*`, each rank embedding a shard; rank 0 gets
    them all, other ranks None."""
    out = embed_sharded(model, dataset, rt, batch_size=cfg.embed.batch_size, workers=cfg.embed.workers,
                        amp=cfg.embed.amp, flip=cfg.embed.flip_tta, desc=f"embed rank {rt.rank}",
                        shift=cfg.embed.shift_tta, features=model.pooled if raw else None)
    return out if rt.main else None


def expand_flips(rows: pd.DataFrame, emb: np.ndarray, flip: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Index rows with their `flip` column: (N,2,D) separate flips become 2N rows (flip 0 then 1);
    averaged flips get flip -1, no TTA flip 0."""
    if flip == "separate":
        rows = pd.concat([rows.assign(flip=0), rows.assign(flip=1)]).sort_index(kind="stable")
        return rows.reset_index(drop=True), emb.reshape(-1, emb.shape[-1])
    return rows.assign(flip=-1 if flip == "average" else 0), emb


def merge_sources(rows: pd.DataFrame, emb: np.ndarray, merge: str) -> tuple[pd.DataFrame, np.ndarray]:
    """With `average`, one row per (split, image, flip): the mean of its sources, renormalised
    (source named by its sources joined with '+'). With `separate`, rows are kept."""
    if merge not in MERGES:
        raise UserError(f"unknown embed.sources_merge {merge!r}; valid: {list(MERGES)}")
    if merge == "separate" or not rows.duplicated(["split", "image", "flip"]).any():
        return rows, emb
    keys = rows[["split", "image", "flip"]].astype(str).agg("\x1f".join, axis=1)
    codes, uniques = pd.factorize(keys, sort=False)
    summed = np.zeros((len(uniques), emb.shape[1]), dtype=np.float64)
    np.add.at(summed, codes, emb)
    merged = (summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    first = rows.groupby(codes, sort=True).head(1).sort_index()
    sources = rows.groupby(codes, sort=True)["source"].agg("+".join).to_numpy()
    out = first.assign(source=sources[codes[first.index]]).reset_index(drop=True)
    return out, merged[codes[first.index]]


def check_finite(rows: pd.DataFrame, emb: np.ndarray) -> None:
    """A NaN or infinite embedding is an error naming the image (e.g. a blank crop under fp16)."""
    bad = np.flatnonzero(~np.isfinite(emb.reshape(len(emb), -1)).all(axis=1))
    if len(bad):
        r = rows.iloc[bad[0]]
        raise UserError(f"the embedding of {r['split']} image {r['image']} (crop {r['crop_path']}) is not finite; "
                        f"{len(bad)} row(s) affected: check that crop, or set embed.amp false")


@torch.no_grad()
def top_logits(heads: nn.Module, emb: np.ndarray, k: int, untrained: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k individual-class cosines of each embedding row: (labels int64, scores float32).
    Classes in `untrained` (no training image: their centres are untrained) are left out."""
    untrained = torch.from_numpy(untrained if untrained is not None else np.zeros(0, np.int64))
    k = min(k, heads.individual.n_classes - len(untrained))
    labels, scores = [], []
    for start in range(0, len(emb), LOGIT_CHUNK):
        cos = heads.individual.cosine(torch.from_numpy(emb[start:start + LOGIT_CHUNK]))
        cos[:, untrained] = -torch.inf
        s, i = torch.topk(cos, k, dim=1)
        labels.append(i.numpy().astype(np.int64))
        scores.append(s.numpy().astype(np.float32))
    if not labels:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    return np.concatenate(labels), np.concatenate(scores)


def _write_logits(out: Path, name: str, loaded: Loaded, rows: pd.DataFrame, emb: np.ndarray, k: int) -> str:
    """`name` (test_logits.npz, train_logits.npz): per image (its rows averaged) the top-k class
    cosines, over the classes the checkpoint trained (`untrained` lists the others); returns a
    note. When none is written, an earlier run's file is removed, so stage 04 cannot blend with
    another model's logits."""
    if k <= 0 or loaded.heads is None:
        (out / name).unlink(missing_ok=True)
        return "off (embed.logits_topk = 0)" if k <= 0 else "skipped: the untrained backbone has no ArcFace head"
    codes, images = pd.factorize(rows["image"], sort=False)
    summed = np.zeros((len(images), emb.shape[1]), dtype=np.float32)
    np.add.at(summed, codes, emb)
    untrained = np.flatnonzero(np.asarray(loaded.class_counts) == 0).astype(np.int64)
    labels, scores = top_logits(loaded.heads, summed, k, untrained)
    with atomic_path(out / name) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=np.asarray(images, dtype=str), labels=labels, scores=scores, untrained=untrained)
    return (f"top {labels.shape[1]} class cosines for {len(images)} images "
            f"({len(untrained)} classes without training images left out)")


def _input_paths(cfg: Config, *models: Loaded | None) -> list[Path]:
    """The files the embeddings depend on: catalogue, crops.csv and the checkpoint(s)."""
    out = Path(cfg.paths.outputs)
    paths = [out / STAGE_DIRS["prepare"] / "catalogue.csv", out / STAGE_DIRS["crop"] / "crops.csv"]
    return paths + [Path(m.info["path"]) for m in models if m is not None and m.info["path"]]


def _check_embed_config(cfg: Config) -> None:
    e = cfg.embed
    if e.flip_tta not in FLIPS:
        raise UserError(f"unknown embed.flip_tta {e.flip_tta!r}; valid: {list(FLIPS)}")
    if e.sources_merge not in MERGES:
        raise UserError(f"unknown embed.sources_merge {e.sources_merge!r}; valid: {list(MERGES)}")
    if e.batch_size < 1 or e.image_size < 0 or e.logits_topk < 0 or e.workers < 0:
        raise UserError("embed.batch_size must be >= 1 and embed.image_size, logits_topk, workers >= 0")
    if not isinstance(e.shift_tta, int) or e.shift_tta < 0:
        raise UserError(f"embed.shift_tta must be a whole number of pixels >= 0, got {e.shift_tta!r}")


def run(cfg: Config) -> Path:
    """Stage 03: write train/test embeddings, their index files, optional test logits and a report.

    Returns the stage folder. Under torchrun only rank 0 writes.
    """
    _check_embed_config(cfg)
    rt = init_runtime(cfg)
    try:
        return _run(cfg, rt)
    finally:
        if rt.world > 1:
            dist.destroy_process_group()


def input_size(cfg: Config, loaded: Loaded) -> int:
    """The model's input side: `embed.image_size`, or the size the checkpoint trained at."""
    return cfg.embed.image_size or loaded.config.train.image_size


def _embed_rows(cfg: Config, rt: Runtime, loaded: Loaded, rows: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, int, float]:
    """Embed `rows` with `loaded`: (index rows, embeddings) after flips and sources are merged
    (None on ranks other than 0), the number of crops and the seconds the model took."""
    size = input_size(cfg, loaded)
    # shift TTA: resized 2 x shift px larger, then cut into five crops of `size` (whaleid.inference)
    dataset = CropDataset(rows["crop_path"].tolist(), transform=eval_transform(size + 2 * cfg.embed.shift_tta))
    t0 = time.perf_counter()
    emb = embed_all(loaded.model, dataset, cfg, rt, loaded.raw)
    seconds = time.perf_counter() - t0
    if not rt.main:
        return rows, None, len(dataset), seconds
    check_finite(rows, emb)
    rows, emb = expand_flips(rows, emb, cfg.embed.flip_tta)
    rows, emb = merge_sources(rows, emb, cfg.embed.sources_merge)
    return rows, emb, len(dataset), seconds


def _write_split(out: Path, prefix: str, rows: pd.DataFrame, emb: np.ndarray, split: str) -> None:
    mask = (rows["split"] == split).to_numpy()
    write_npy(out / f"{prefix}{split}_emb.npy", np.ascontiguousarray(emb[mask], dtype=np.float32))
    write_csv(out / f"{prefix}{split}_index.csv", rows.loc[mask, ["image", "source", "flip"]])


def _run(cfg: Config, rt: Runtime) -> Path:
    start = time.time()
    refit = uses_refit(cfg)
    loaded = load_model(cfg, refit=refit)
    # The fold model stands in for the refit model in validation and calibration, so it is the fold
    # run's last epoch: as long trained as the refit model, whose best.pt is its last (it has no
    # validation to pick by). An earlier epoch that validated better would calibrate the threshold
    # on another model's scores.
    fold_model = load_model(fold_stand_in(cfg)) if refit else None
    stale = check_checkpoint_inputs(cfg, loaded) if rt.main else []
    all_rows, counts = crop_rows(cfg)
    if all_rows.empty:
        raise UserError(f"no crop of a catalogue image to embed: rerun {CROP_MADE_BY}")
    rows, emb, n_crops, seconds = _embed_rows(cfg, rt, loaded, all_rows)
    if fold_model is not None:  # the images once more, with the fold model: stage 04 validates and
        # calibrates on its train vectors, and its test vectors carry the threshold over to the refit model
        # (knn.refit_threshold share; with cosine, the train images only)
        fold_input = all_rows if cfg.knn.refit_threshold == "share" else all_rows[all_rows["split"] == "train"]
        fold_rows, fold_emb, n_fold, fold_seconds = _embed_rows(cfg, rt, fold_model, fold_input.reset_index(drop=True))
        n_crops, seconds = n_crops + n_fold, seconds + fold_seconds
    out = stage_dir(cfg, "embed")
    if not rt.main:
        return out
    # report.json goes last and lists what this run wrote: until then a killed run's mix of new
    # and old files has no report, and stage 04 refuses it
    (out / "report.json").unlink(missing_ok=True)
    write_resolved_config(cfg, out)
    for split in ("train", "test"):
        _write_split(out, "", rows, emb, split)
    if fold_model is not None:
        _write_split(out, "fold_", fold_rows, fold_emb, "train")
        if cfg.knn.refit_threshold == "share":
            _write_split(out, "fold_", fold_rows, fold_emb, "test")
        else:  # an earlier run's would be read as this run's
            for name in ("fold_test_emb.npy", "fold_test_index.csv"):
                (out / name).unlink(missing_ok=True)
    else:
        for name in FOLD_FILES:  # those of an earlier refit run would be read as this run's
            (out / name).unlink(missing_ok=True)
    test = (rows["split"] == "test").to_numpy()
    k = cfg.embed.logits_topk
    logits_note = _write_logits(out, "test_logits.npz", loaded, rows[test], emb[test], k)
    # the train images' logits by the model stage 04 validates with, so that it calibrates the
    # new_individual threshold on blended scores as the test images will have them
    if fold_model is not None:
        fold_train = (fold_rows["split"] == "train").to_numpy()
        _write_logits(out, "train_logits.npz", fold_model, fold_rows[fold_train], fold_emb[fold_train], k)
    else:
        _write_logits(out, "train_logits.npz", loaded, rows[~test], emb[~test], k)
    report = {
        "checkpoint": loaded.info,
        "fold_checkpoint": fold_model.info if fold_model is not None else None,
        "image_size": input_size(cfg, loaded),
        "flip_tta": cfg.embed.flip_tta,
        "shift_tta": cfg.embed.shift_tta,
        "sources": list(cfg.crop.sources),
        "sources_merge": cfg.embed.sources_merge,
        "device": str(rt.device),
        "precision": "bf16 autocast" if bf16_inference(rt.device, cfg.embed.amp) else "float32",
        "world_size": rt.world,
        "counts": counts | {"train_rows": int((~test).sum()), "test_rows": int(test.sum()),
                            "crops_embedded": n_crops, "dim": int(emb.shape[1])},
        "images_per_s": round(n_crops / max(seconds, 1e-9), 2),
        "embed_seconds": round(seconds, 2),
        "logits": logits_note,
        "fingerprints": {
            "inputs": fingerprint_files([Path(cfg.paths.outputs) / STAGE_DIRS["crop"] / "crops.csv"]),
            "config": fingerprint_config({"embed": cfg.embed.to_dict(), "crop.sources": cfg.crop.sources}),
        },
        "input_files": stage_inputs_record(_input_paths(cfg, loaded, fold_model), cfg.paths.outputs),
        "output_files": stage_inputs_record([out / name for name in EMBED_FILES if (out / name).is_file()],
                                            cfg.paths.outputs),
        "stale_inputs": stale,
        "seconds": round(time.time() - start, 2),
    }
    write_json(out / "report.json", report)
    print(f"embedded {n_crops} crops at {report['images_per_s']:.1f} img/s with {loaded.info['kind']} "
          f"checkpoint: {report['counts']['train_rows']} train rows, {report['counts']['test_rows']} test rows, "
          f"dim {emb.shape[1]} -> {out}")
    return out
