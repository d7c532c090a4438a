"""Stage 00: check the data (or generate the demo set), fix species, split folds, write the catalogue.

The catalogue is the only view of the data the later stages get: one row per usable image, with
its size, labels and validation fold (schema in docs/ARTIFACTS.md). Everything a user can get
wrong in the input (a misspelt column, a duplicate row, a missing or corrupt photo) is found
here, named in one sentence or in `report.json`, and never silently dropped.
"""

from __future__ import annotations

import difflib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from whaleid import images
from whaleid.config import Config
from whaleid.errors import UserError
from whaleid.images import image_size, read_image
from whaleid.io import (
    STAGE_DIRS,
    fingerprint_config,
    fingerprint_files,
    read_json,
    require,
    stage_dir,
    stage_inputs_record,
    write_csv,
    write_json,
    write_resolved_config,
)

# Misspelt or merged species names of the Happywhale train.csv (as fixed by most top solutions).
SPECIES_FIXES = {
    "kiler_whale": "killer_whale",
    "bottlenose_dolpin": "bottlenose_dolphin",
    "globis": "short_finned_pilot_whale",
    "pilot_whale": "short_finned_pilot_whale",
}

# The 26 species of the Happywhale data after SPECIES_FIXES; others are kept but reported.
HAPPYWHALE_SPECIES = frozenset({
    "beluga", "blue_whale", "bottlenose_dolphin", "brydes_whale", "commersons_dolphin",
    "common_dolphin", "cuviers_beaked_whale", "dusky_dolphin", "false_killer_whale", "fin_whale",
    "frasiers_dolphin", "gray_whale", "humpback_whale", "killer_whale", "long_finned_pilot_whale",
    "melon_headed_whale", "minke_whale", "pantropic_spotted_dolphin", "pygmy_killer_whale",
    "rough_toothed_dolphin", "sei_whale", "short_finned_pilot_whale", "southern_right_whale",
    "spinner_dolphin", "spotted_dolphin", "white_sided_dolphin",
})

CATALOGUE_NAME = "catalogue.csv"
ENCODERS_NAME = "label_encoders.json"
MADE_BY = "00_prepare_data.py"
CATALOGUE_DTYPES = {
    "image": str, "split": str, "path": str, "width": int, "height": int, "species": str,
    "individual_id": str, "label": int, "species_label": int, "fold": int, "fold_new": bool,
}
TRAIN_COLUMNS = ("image", "species", "individual_id")
SUBMISSION_COLUMNS = ("image",)
SPLIT_FOLDERS = {"train": "train_images", "test": "test_images"}
EXAMPLES = 10  # how many names a report or message lists before summarising the rest


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def resolve_data_dir(cfg: Config) -> Path:
    """`paths.data` when it holds a train.csv; the demo set folder `paths.demo` when `paths.data`
    does not exist; a UserError listing it when it exists without a train.csv (a wrong folder
    given is not a reason to run the demo)."""
    data, demo = Path(cfg.paths.data), Path(cfg.paths.demo)
    if (data / "train.csv").is_file():
        return data
    if data.exists() and data.resolve() != demo.resolve():
        found = sorted(p.name for p in data.iterdir())[:EXAMPLES] if data.is_dir() else []
        raise UserError(f"paths.data {data} holds no train.csv (found: {', '.join(found) or 'nothing'}); point it at "
                        "a Happywhale-layout folder (train.csv, train_images/, test_images/, sample_submission.csv), "
                        "or at a path that does not exist to run the built-in demo set")
    return demo


def labels_file(cfg: Config) -> Path | None:
    """The test answers used only for scoring: `paths.labels`, else `<data>/test_labels.csv`, else None."""
    if cfg.paths.labels:
        path = Path(cfg.paths.labels)
        if not path.is_file():
            raise UserError(f"paths.labels is set to {path}, but that file does not exist")
        return path
    path = resolve_data_dir(cfg) / "test_labels.csv"
    return path if path.is_file() else None


def _ensure_data(cfg: Config) -> Path:
    """The data folder to use; without real data the demo set is generated or refreshed first.

    The demo generator skips the work when `paths.demo` already holds a set made from the same
    `demo` config section, and regenerates it when that section changed.
    """
    data = resolve_data_dir(cfg)  # a wrong folder stops here
    if (Path(cfg.paths.data) / "train.csv").is_file():  # real data: resolve_data_dir returned paths.data
        print(f"data: {data.resolve()}")
        return data
    demo = data  # paths.data does not exist: resolve_data_dir returned paths.demo
    print(f"data: no train.csv in {cfg.paths.data}; using the demo set at {demo.resolve()} (generated when absent or stale)")
    from whaleid import demo_data  # imported here: only needed when there is no real data

    demo_data.generate(cfg, demo)
    if not (demo / "train.csv").is_file():
        raise UserError(f"demo generation did not write {demo / 'train.csv'}")
    return demo


# ---------------------------------------------------------------------------------------------
# Reading and checking the CSVs
# ---------------------------------------------------------------------------------------------

def _lines(positions: np.ndarray | list[int]) -> str:
    """File line numbers of data rows (line 1 is the header), as text."""
    return ", ".join(str(int(p) + 2) for p in positions)


def read_listing(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV of image names as strings, checking its required columns and rows.

    Values are kept verbatim (no NA parsing: an id like "NA" stays a string). Raises a
    UserError naming the file and the column or lines at fault.
    """
    if not path.is_file():
        raise UserError(f"missing input file {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError as err:
        raise UserError(f"{path} is empty: it needs a header with columns {list(required)}") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a readable CSV file: {err}") from err
    df.columns = [str(c).strip() for c in df.columns]
    for col in required:
        if col not in df.columns:
            close = difflib.get_close_matches(col, df.columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"{path} has no column {col!r} (columns found: {list(df.columns)}){hint}"
            )
    for col in required:
        empty = np.flatnonzero(df[col].str.strip() == "")
        if len(empty):
            raise UserError(
                f"{path} has {len(empty)} row(s) with an empty {col!r}, on line(s) "
                f"{_lines(empty[:EXAMPLES])}"
            )
    _check_unique(df, path)
    return df


def _check_unique(df: pd.DataFrame, path: Path) -> None:
    """Raise a UserError naming the first image names listed more than once, with their lines."""
    dup = df["image"].duplicated(keep=False)
    if not dup.any():
        return
    groups = df.index[dup].to_series().groupby(df.loc[dup, "image"], sort=False)
    parts = [f"{name!r} on lines {_lines(rows.to_numpy())}" for name, rows in list(groups)[:3]]
    raise UserError(
        f"{path} lists {groups.ngroups} image name(s) more than once ({'; '.join(parts)}): "
        "image names must be unique"
    )


def fix_species(series: pd.Series) -> pd.Series:
    """Replace the misspelt Happywhale species names by their fixed names (SPECIES_FIXES)."""
    return series.replace(SPECIES_FIXES)


# ---------------------------------------------------------------------------------------------
# Checking the image files
# ---------------------------------------------------------------------------------------------

def _probe_decode(path: str) -> tuple[int, int, str]:
    """(width, height, "") of a fully decoded image, or (0, 0, reason)."""
    rgb, reason = read_image(path)
    if rgb is None:
        return 0, 0, reason
    return rgb.shape[1], rgb.shape[0], ""


def _probe_header(path: str) -> tuple[int, int, str]:
    """(width, height, "") from the image header only, or (0, 0, reason); a photo above
    `images.MAX_PIXELS` is refused here too, as a decode would refuse it."""
    size = image_size(path)
    if size is None:
        return 0, 0, "not a readable image (header)"
    if size[0] * size[1] > images.MAX_PIXELS:
        return 0, 0, (f"image too large: {Path(path).name} is {size[0]} x {size[1]} pixels, above the "
                      f"{images.MAX_PIXELS:,} pixel limit (decompression bomb)")
    return size[0], size[1], ""


def probe_images(
    paths: list[str], check_decode: bool, workers: int, desc: str = "images"
) -> list[tuple[int, int, str]]:
    """Size of every image, or why it is unusable, decoding in `workers` processes when asked."""
    probe = _probe_decode if check_decode else _probe_header
    desc = f"{desc}: {'decode check' if check_decode else 'headers'}"
    if workers <= 1 or len(paths) < 2 * workers:
        return [probe(p) for p in tqdm(paths, desc=desc, unit="img")]
    chunk = max(1, min(64, len(paths) // (8 * workers)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(probe, paths, chunksize=chunk), total=len(paths), desc=desc, unit="img"))


def _files_in(folder: Path) -> set[str]:
    """Names of the regular, non-hidden files directly in `folder` (empty when it is absent)."""
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.is_file() and not e.name.startswith(".")}


def _check_split(
    listed: pd.DataFrame, split: str, data_dir: Path, cfg: Config
) -> tuple[pd.DataFrame, list[dict], dict]:
    """Keep the listed images of one split that exist and decode.

    Returns (usable rows with path/width/height, excluded [{image, split, reason}], extra-file summary).
    """
    folder = data_dir / SPLIT_FOLDERS[split]
    on_disk = _files_in(folder)
    names = listed["image"].tolist()
    paths = [folder / name for name in names]
    exists = np.array([name in on_disk or path.is_file() for name, path in zip(names, paths)], dtype=bool)
    reasons = np.where(exists, "", f"file not found in {folder}").astype(object)
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    present = np.flatnonzero(exists)
    probed = probe_images(
        [str(paths[i]) for i in present], cfg.prepare.check_decode, cfg.prepare.workers, split
    )
    for i, (w, h, reason) in zip(present, probed):
        sizes[i] = (w, h)
        reasons[i] = reason
    ok = reasons == ""
    usable = listed[ok].copy()
    usable["path"] = [str(paths[i].resolve()) for i in np.flatnonzero(ok)]
    usable["width"] = sizes[ok, 0]
    usable["height"] = sizes[ok, 1]
    excluded = [
        {"image": names[i], "split": split, "reason": reasons[i]}
        for i in np.flatnonzero(~ok)
    ]
    extra = sorted(on_disk - set(names))
    return usable, excluded, {"count": len(extra), "examples": extra[:EXAMPLES]}


# ---------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------

def assign_folds(
    individual_ids: pd.Series, n_folds: int, new_share: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validation fold per row and whether the row's individual is new in that fold.

    Open-set K-fold split by individual (as in wildlife-datasets' open-set splits):
    - individuals with one image get fold -1: always training, never validated (they could only
      ever be validated as `new_individual`, and are more useful as gallery images);
    - a random subset of the other individuals, holding about `new_share` of their images, is put
      wholly inside one fold each, so they are `new_individual` when that fold is validated;
    - the images of every remaining individual are spread over distinct folds, so each of its
      validation images has images of the same animal in the training part (known).
    Folds are balanced greedily (largest individuals first, least-loaded fold first).
    Returns (fold: int64 array, fold_new: bool array), aligned with the rows of `individual_ids`.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if not 0.0 <= new_share <= 1.0:
        raise ValueError(f"new_share must be within [0, 1], got {new_share}")
    ids = individual_ids.astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    groups = pd.Series(np.arange(len(ids))).groupby(ids).indices
    multi = [k for k in sorted(groups) if len(groups[k]) >= 2]
    multi = [multi[i] for i in rng.permutation(len(multi))]

    target = new_share * sum(len(groups[k]) for k in multi)
    new_ids, known_ids, taken = [], [], 0
    for k in multi:
        if taken + len(groups[k]) <= target:
            new_ids.append(k)
            taken += len(groups[k])
        else:
            known_ids.append(k)

    fold = np.full(len(ids), -1, dtype=np.int64)
    new_load = np.zeros(n_folds, dtype=np.int64)
    total_load = np.zeros(n_folds, dtype=np.int64)
    # A stable sort keeps the random order among individuals of equal size.
    for k in sorted(new_ids, key=lambda k: -len(groups[k])):
        f = int(np.argmin(new_load))
        fold[groups[k]] = f
        new_load[f] += len(groups[k])
        total_load[f] += len(groups[k])
    for k in sorted(known_ids, key=lambda k: -len(groups[k])):
        order = np.argsort(total_load, kind="stable")
        for j, row in enumerate(rng.permutation(groups[k])):
            f = order[j % n_folds]
            fold[row] = f
            total_load[f] += 1
    return fold, fold_is_new(ids, fold)


def fold_is_new(ids: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """True for rows in a fold (>= 0) whose individual has no image outside that fold."""
    df = pd.DataFrame({"id": ids, "fold": fold})
    per_pair = df.groupby(["id", "fold"])["id"].transform("size").to_numpy()
    per_id = df.groupby("id")["id"].transform("size").to_numpy()
    return (fold >= 0) & (per_pair == per_id)


def fold_summary(fold: np.ndarray, fold_new: np.ndarray, ids: np.ndarray, n_folds: int) -> list[dict]:
    """Validation size, individuals and share of new images of each fold."""
    rows = []
    for k in range(n_folds):
        val = fold == k
        n_val = int(val.sum())
        n_new = int((fold_new & val).sum())
        rows.append({
            "fold": k,
            "val_images": n_val,
            "val_individuals": int(len(np.unique(ids[val]))),
            "val_new_images": n_new,
            "new_share": round(n_new / n_val, 4) if n_val else 0.0,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def _check_prepare_config(cfg: Config) -> None:
    """Reject settings of the `prepare` section that make no sense, naming the key."""
    p = cfg.prepare
    if p.n_folds < 2:
        raise UserError(f"prepare.n_folds must be at least 2, got {p.n_folds}")
    if not -1 <= p.fold < p.n_folds:
        raise UserError(f"prepare.fold must be -1 (no validation) or within 0..{p.n_folds - 1} "
                        f"(prepare.n_folds), got {p.fold}")
    if not 0.0 <= p.new_share < 1.0:
        raise UserError(f"prepare.new_share must be within [0, 1), got {p.new_share}")
    if p.workers < 0:
        raise UserError(f"prepare.workers must be 0 or more, got {p.workers}")


def _species_report(raw: pd.Series, fixed: pd.Series) -> tuple[dict, dict]:
    """Counts of each fix applied, and of species outside the Happywhale list."""
    changed = raw != fixed
    fixes = {f"{a} -> {b}": int(n) for (a, b), n in
             pd.DataFrame({"a": raw[changed], "b": fixed[changed]}).value_counts().sort_index().items()}
    counts = fixed.value_counts()
    unlisted = {str(s): int(n) for s, n in counts.sort_index().items() if s not in HAPPYWHALE_SPECIES}
    return fixes, unlisted


def _encode(train: pd.DataFrame) -> dict:
    """Sorted unique individual ids and species: a label is the index in these lists."""
    return {
        "individual_id": sorted(train["individual_id"].unique().tolist()),
        "species": sorted(train["species"].unique().tolist()),
    }


def _build_catalogue(train: pd.DataFrame, test: pd.DataFrame, encoders: dict) -> pd.DataFrame:
    """Train and test rows in the column order and dtypes of the artifact contract."""
    ind_code = {k: i for i, k in enumerate(encoders["individual_id"])}
    sp_code = {k: i for i, k in enumerate(encoders["species"])}
    train = train.assign(
        split="train",
        label=train["individual_id"].map(ind_code),
        species_label=train["species"].map(sp_code),
    )
    test = test.assign(
        split="test", species="", individual_id="", label=-1, species_label=-1, fold=-1, fold_new=False
    )
    cat = pd.concat([train, test], ignore_index=True)[list(CATALOGUE_DTYPES)]
    return cat.astype(CATALOGUE_DTYPES)


def _print_summary(report: dict, fold: int) -> None:
    """A few lines a user reads after the stage: counts, exclusions, the validation fold."""
    for split, c in report["counts"].items():
        print(f"{split}: {c['listed']} listed, {c['usable']} usable, {c['excluded']} excluded, "
              f"{report['extra_files'][split]['count']} extra file(s) on disk not listed")
    excluded = report["excluded"]
    if excluded:
        names = ", ".join(f"{e['image']} ({e['reason']})" for e in excluded[:3])
        print(f"excluded {len(excluded)} image(s), e.g. {names}: all names and reasons in report.json")
    t = report["train"]
    print(f"individuals: {t['individuals']} ({t['singletons']} with one image, always in training), "
          f"{t['species']} species")
    if fold == -1:
        print("prepare.fold is -1: stages 02/04 train on every image and validate on none")
    else:
        f = report["folds"][fold]
        print(f"fold {fold} (validated by stages 02/04): {f['val_images']} images, "
              f"{f['val_new_images']} of them new ({f['new_share']:.0%})")
    for w in report["warnings"]:
        print(f"warning: {w}")


class SplitCheck(NamedTuple):
    """What the file checks of one split found."""

    listed: int  # rows of the CSV
    usable: pd.DataFrame  # rows kept, with path/width/height
    excluded: list[dict]  # [{image, split, reason}]
    extra: dict  # files on disk not listed: {count, examples}


def _warnings(checks: dict[str, SplitCheck], folds: list[dict], sub_csv: Path) -> list[str]:
    """Problems worth a line on the console that do not stop the stage."""
    warnings = []
    test = checks["test"]
    if test.excluded:
        warnings.append(f"{len(test.excluded)} of {test.listed} test image(s) of {sub_csv.name} are not "
                        "usable (report.json: test_missing); stage 04 still writes a row for each")
    if test.listed == 0:
        warnings.append(f"{sub_csv} lists no test images")
    empty = [f["fold"] for f in folds if f["val_images"] == 0]
    if empty:
        warnings.append(f"fold(s) {empty} have no validation images: too few individuals with 2+ images")
    return warnings


def _report(cfg: Config, data_dir: Path, checks: dict[str, SplitCheck], train: pd.DataFrame,
            species_counts: tuple[dict, dict], encoders: dict) -> dict:
    """report.json of the stage: counts, exclusions, species, folds and fingerprints."""
    train_csv, sub_csv = data_dir / "train.csv", data_dir / "sample_submission.csv"
    fold, fold_new = train["fold"].to_numpy(), train["fold_new"].to_numpy()
    folds = fold_summary(fold, fold_new, train["individual_id"].to_numpy(), cfg.prepare.n_folds)
    id_counts = train["individual_id"].value_counts()
    return {
        "data_dir": str(data_dir.resolve()),
        "demo": data_dir == Path(cfg.paths.demo),
        "counts": {
            split: {"listed": c.listed, "usable": len(c.usable), "excluded": len(c.excluded)}
            for split, c in checks.items()
        },
        "train": {
            "individuals": int(len(id_counts)),
            "singletons": int((id_counts == 1).sum()),
            "species": len(encoders["species"]),
            "images_per_species": {str(k): int(v) for k, v in train["species"].value_counts().sort_index().items()},
        },
        "excluded": checks["train"].excluded + checks["test"].excluded,
        "test_missing": [e["image"] for e in checks["test"].excluded],
        "extra_files": {split: c.extra for split, c in checks.items()},
        "species_fixes": species_counts[0],
        "species_not_in_happywhale_list": species_counts[1],
        "folds": folds,
        "always_train_images": int((fold == -1).sum()),
        "new_share_target": cfg.prepare.new_share,
        "warnings": _warnings(checks, folds, sub_csv),
        "fingerprints": {
            "inputs": fingerprint_files([train_csv, sub_csv]),
            "config": fingerprint_config({"prepare": cfg.prepare.to_dict(), "seed": cfg.seed}),
        },
        "input_files": stage_inputs_record([train_csv, sub_csv], cfg.paths.outputs),
    }


def _read_inputs(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The listings of train.csv and sample_submission.csv, schema-checked (nothing written yet)."""
    train_csv = data_dir / "train.csv"
    train_list = read_listing(train_csv, TRAIN_COLUMNS)[list(TRAIN_COLUMNS)]
    test_list = read_listing(data_dir / "sample_submission.csv", SUBMISSION_COLUMNS)[["image"]]
    if not (data_dir / SPLIT_FOLDERS["train"]).is_dir():
        raise UserError(f"missing folder {data_dir / SPLIT_FOLDERS['train']} (the images of {train_csv})")
    return train_list, test_list


def run(cfg: Config) -> Path:
    """Stage 00: check the data, fix species, assign folds; write the catalogue and its report.

    Returns the path of the catalogue (written last, so its presence means the stage finished).
    """
    start = time.time()
    _check_prepare_config(cfg)
    data_dir = _ensure_data(cfg)
    train_list, test_list = _read_inputs(data_dir)
    raw_species = train_list["species"]
    train_list = train_list.assign(species=fix_species(raw_species))
    checks = {
        split: SplitCheck(len(listed), *_check_split(listed, split, data_dir, cfg))
        for split, listed in (("train", train_list), ("test", test_list))
    }
    train = checks["train"].usable
    if train.empty:
        raise UserError(f"none of the {len(train_list)} images of {data_dir / 'train.csv'} is usable: "
                        f"see the files in {data_dir / SPLIT_FOLDERS['train']}")

    p = cfg.prepare
    fold, fold_new = assign_folds(train["individual_id"], p.n_folds, p.new_share, cfg.seed)
    train = train.assign(fold=fold, fold_new=fold_new)
    encoders = _encode(train)
    catalogue = _build_catalogue(train, checks["test"].usable, encoders)
    species_counts = _species_report(raw_species, train_list["species"])
    report = _report(cfg, data_dir, checks, train, species_counts, encoders)
    report["seconds"] = round(time.time() - start, 2)

    out = stage_dir(cfg, "prepare")
    write_resolved_config(cfg, out)
    write_json(out / ENCODERS_NAME, encoders)
    write_json(out / "report.json", report)
    path = out / CATALOGUE_NAME
    write_csv(path, catalogue)
    _print_summary(report, p.fold)
    print(f"wrote {path} ({len(catalogue)} rows) in {report['seconds']:.1f} s")
    return path


# ---------------------------------------------------------------------------------------------
# Readers for the later stages
# ---------------------------------------------------------------------------------------------

def _prepare_dir(cfg: Config) -> Path:
    """Stage 00's folder, without creating it (readers must not leave empty folders behind)."""
    return Path(cfg.paths.outputs) / STAGE_DIRS["prepare"]


def load_catalogue(cfg: Config) -> pd.DataFrame:
    """The catalogue of stage 00 with the dtypes of the artifact contract (empty strings kept)."""
    path = require(_prepare_dir(cfg) / CATALOGUE_NAME, MADE_BY)
    text_cols = {k: str for k, v in CATALOGUE_DTYPES.items() if v is str}
    df = pd.read_csv(path, dtype=text_cols, keep_default_na=False)
    missing = [c for c in CATALOGUE_DTYPES if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {missing}: rerun {MADE_BY}")
    df["fold_new"] = df["fold_new"].astype(str).map({"True": True, "False": False})
    if df["fold_new"].isna().any():
        raise UserError(f"{path} has fold_new values other than True/False: rerun {MADE_BY}")
    return df[list(CATALOGUE_DTYPES)].astype(CATALOGUE_DTYPES)


def load_encoders(cfg: Config) -> dict:
    """label_encoders.json of stage 00: {"individual_id": [...], "species": [...]}, sorted."""
    return read_json(require(_prepare_dir(cfg) / ENCODERS_NAME, MADE_BY))
