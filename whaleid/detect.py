"""Stage 01: one box per image and crop set, then a cached square crop per image, so later
stages never decode a full-size photo again.

Each crop set (`crop.sources`, e.g. fullbody, backfin) takes its boxes from one source
(`crop.box_source`): `import` (a CSV per set, `crop.box_files`), `detector` (the built-in
learned detector, `whaleid.detector`), `fallback` (training-free segmentation against the sea,
`boxes.fallback_box`; coarse, for when no boxes exist to train on) or `full` (the whole frame,
for sets that are already crops). Nothing is lost: without a usable box an image gets the full
frame and a flag saying why. Decoding, cropping and saving run in worker processes; a rerun
reuses every crop that is still up to date, including those of a run that was killed: each
finished crop is appended to a journal (`crops.partial.jsonl`) until crops.csv is written.
A crop is up to date while its photo has the path, size and modification time it was made from.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import pandas as pd
from tqdm import tqdm

from whaleid.boxes import BOX_COLUMNS, Box, box_problem, clamp_box, fallback_box, pad_and_clamp, read_box_file
from whaleid.config import Config
from whaleid.errors import UserError
from whaleid.images import read_image, resize_square, write_jpeg
from whaleid.io import (
    check_fresh,
    file_digest,
    fingerprint_config,
    fingerprint_files,
    read_json,
    require,
    stage_dir,
    stage_inputs_record,
    write_bytes,
    write_csv,
    write_json,
    write_resolved_config,
)

if TYPE_CHECKING:
    from whaleid.detector import Detector

METHODS = ("import", "detector", "fallback", "full")
FLAGS = ("no_box", "degenerate_box", "low_conf")
CATALOGUE_COLUMNS = ["image", "split", "path", "width", "height"]
CROP_COLUMNS = ["image", "split", "source", "crop_path", *BOX_COLUMNS, "conf", "method", "flag"]
PHOTO_COLUMNS = ["photo_path", "photo_bytes", "photo_mtime_ns"]  # the photo a crop was made from
ROW_KEY = ["image", "split", "source"]
FALLBACK_VERSION = 1  # bump when boxes.fallback_box changes, so its crops are redone
CHUNK = 16            # images per worker task
JOURNAL_NAME = "crops.partial.jsonl"  # finished crops of an unfinished run (read only by this stage)


# --- inputs --------------------------------------------------------------------------------

def read_catalogue(cfg: Config) -> pd.DataFrame:
    """Stage 00's catalogue, with the columns this stage needs checked."""
    path = require(Path(cfg.paths.outputs) / "00_prepare" / "catalogue.csv", "00_prepare_data.py")
    cat = pd.read_csv(path, dtype={"image": str, "split": str, "path": str}, keep_default_na=False)
    missing = [c for c in CATALOGUE_COLUMNS if c not in cat.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}: rerun 00_prepare_data.py")
    return cat.reset_index(drop=True)


def check_sources(cfg: Config) -> dict[str, str]:
    """{crop set: method}, with every set given a known method (and a file for import)."""
    methods = {}
    for source in cfg.crop.sources:
        method = cfg.crop.box_source.get(source)
        if method not in METHODS:
            raise UserError(f"crop.box_source.{source} must be one of {', '.join(METHODS)}, got {method!r}")
        box_file = cfg.crop.box_files.get(source)
        if method == "import" and not box_file:
            raise UserError(f"crop set {source} imports boxes: set crop.box_files.{source} to a CSV")
        if method == "import" and not Path(box_file).is_file():
            raise UserError(f"box file {box_file} not found (crop.box_files.{source})")
        methods[source] = method
    if list(methods.values()).count("detector") > 1:
        raise UserError("the built-in detector learns one kind of box: give at most one crop set "
                        "box_source detector, and import boxes for the others")
    return methods


def detector_or_fallback(cfg: Config, cat: pd.DataFrame, methods: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The built-in detector learns from boxes of train images. Where the data folder has no
    `boxes.csv` with any and `crop.detector.train_boxes` names no file (the competition's own
    download has no boxes), its crop set uses the training-free fallback instead, with a printed
    note, rather than stopping: (methods, {crop set: note}). A named box file is always used."""
    if "detector" not in methods.values() or cfg.crop.detector.train_boxes:
        return methods, {}
    from whaleid import detector  # torch and timm load only when a set needs the detector
    from whaleid.catalogue import resolve_data_dir

    if not detector.training_boxes(cfg, cat)[0].empty:
        return methods, {}
    notes = {}
    for source, method in methods.items():
        if method == "detector":
            methods = methods | {source: "fallback"}
            notes[source] = (f"no training boxes for the built-in detector ({resolve_data_dir(cfg) / 'boxes.csv'} "
                             f"holds none for train images, and crop.detector.train_boxes is empty): crop set "
                             f"{source} uses the training-free fallback (README: 'Boxes on the real data')")
            print(f"note: {notes[source]}")
    return methods, notes


def _check_crop_config(cfg: Config) -> None:
    """Reject settings of the `crop` section that make no sense, naming the key, before any work
    (they would fail inside the workers, or after the detector trained, with a traceback)."""
    c, d = cfg.crop, cfg.crop.detector
    if not c.sources or len(set(c.sources)) < len(c.sources) or not all(isinstance(s, str) and s for s in c.sources):
        raise UserError(f"crop.sources must list one or more distinct crop set names, got {c.sources}")
    if c.image_size < 1:
        raise UserError(f"crop.image_size must be at least 1 pixel, got {c.image_size}")
    if not 0.0 <= c.margin < math.inf:
        raise UserError(f"crop.margin must be 0 or more (a share of the box side), got {c.margin}")
    if not 0.0 <= c.min_conf <= 1.0:
        raise UserError(f"crop.min_conf must be within [0, 1], got {c.min_conf}")
    if not 0 <= c.jpeg_quality <= 100:
        raise UserError(f"crop.jpeg_quality must be within 0..100, got {c.jpeg_quality}")
    if c.workers < 0:
        raise UserError(f"crop.workers must be 0 or more, got {c.workers}")
    # The detector's coarsest feature map has stride 32: a smaller input has no cell to predict from.
    for key, least in (("image_size", 32), ("epochs", 1), ("batch_size", 1), ("max_train_images", 1)):
        if d[key] < least:
            raise UserError(f"crop.detector.{key} must be at least {least}, got {d[key]}")
    if not 0.0 < d.lr < math.inf:
        raise UserError(f"crop.detector.lr must be a positive number, got {d.lr}")


def crop_names(cat: pd.DataFrame) -> pd.Series:
    """The crop file name of each catalogue row: the image stem + .jpg, or the full image name
    + .jpg where two images of a split share a stem (a.jpg and a.png)."""
    stems = cat["image"].map(lambda name: Path(name).stem)
    clash = stems.groupby(cat["split"]).transform(lambda s: s.duplicated(keep=False))
    return (stems.where(~clash, cat["image"]) + ".jpg").rename("crop_name")


def crop_settings(cfg: Config) -> dict:
    """The settings every crop file depends on (a change redoes all crops)."""
    c = cfg.crop
    return {"margin": c.margin, "image_size": c.image_size, "keep_aspect": c.keep_aspect,
            "jpeg_quality": c.jpeg_quality, "min_conf": c.min_conf}


# --- worker: decode, box checks, crop, save ------------------------------------------------

def photo_identity(path: str) -> dict | None:
    """The photo as its crop records it (PHOTO_COLUMNS): path, size in bytes and modification
    time, or None when it cannot be stat'ed. Another copy of the data (unzip, cp -p, rsync -a)
    differs in the path, a file replaced in place in its size or time, even an older time."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"photo_path": path, "photo_bytes": stat.st_size, "photo_mtime_ns": stat.st_mtime_ns}


def crop_one(task: dict) -> dict:
    """Decode one image, settle its box (computing the fallback box when asked), save the crop.

    Returns the crops.csv row, or {"error": reason} when the image no longer decodes.
    """
    photo = photo_identity(task["path"])  # before decoding: a file replaced meanwhile is redone next run
    rgb, reason = read_image(task["path"])
    if rgb is None or photo is None:
        return {"error": reason or "file not found"}
    h, w = rgb.shape[:2]
    box, conf = task["box"], task["conf"]
    if task["method"] == "full":
        box, conf = (0.0, 0.0, float(w), float(h)), 1.0
    elif task["method"] == "fallback":
        box, conf = fallback_box(rgb)
    s = task["settings"]
    flag = box_problem(box, w, h) or ("low_conf" if conf < s["min_conf"] else "")
    used: Box = (0.0, 0.0, float(w), float(h)) if flag else clamp_box(box, w, h)
    left, top, right, bottom = pad_and_clamp(used, 0.0 if flag else s["margin"], w, h)
    crop = resize_square(rgb[top:bottom, left:right], s["image_size"], s["keep_aspect"])
    write_bytes(task["crop_path"], write_jpeg(task["crop_path"], crop, s["jpeg_quality"]))
    return {"crop_path": task["crop_path"], **dict(zip(BOX_COLUMNS, used)),
            "conf": float(conf) if box is not None else 0.0, "flag": flag, **photo}


def run_tasks(tasks: list[dict], workers: int,
              on_result: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """`crop_one` over the tasks, in `workers` processes (in this one when workers <= 1).

    `on_result(task, result)` is called in this process as each result arrives, in task order.
    """
    bar = {"total": len(tasks), "desc": "crops", "unit": "img", "smoothing": 0.1}
    results = []
    if workers <= 1 or len(tasks) < 2 * CHUNK:
        for task in tqdm(tasks, **bar):
            results.append(crop_one(task))
            if on_result is not None:
                on_result(task, results[-1])
        return results
    with get_context("fork").Pool(workers) as pool:
        for task, result in zip(tasks, tqdm(pool.imap(crop_one, tasks, chunksize=CHUNK), **bar)):
            results.append(result)
            if on_result is not None:
                on_result(task, result)
    return results


def crop_row(task: dict, result: dict) -> dict:
    """The crops.csv row of a finished task (`result` of `crop_one` without an error)."""
    image, split, source = task["row"]
    return {"image": image, "split": split, "source": source, "method": task["method"], **result}


# --- reuse of up-to-date crops -------------------------------------------------------------

def reuse_key(recipe: str, settings: dict) -> str:
    """What a crop depends on besides its image: the set's box recipe and the crop settings."""
    return json.dumps([recipe, settings], sort_keys=True)


def load_previous(out: Path) -> pd.DataFrame:
    """Crops of earlier runs, each with the `key` (reuse_key) it was made under: the last
    finished run's crops.csv and report.json, then the journal of a run killed since (newer, so
    it wins for an image listed in both, and a crop a run in it set out to redo is void in
    crops.csv even when the run was killed before logging it). Empty when there are none."""
    parts = [pd.DataFrame(columns=[*CROP_COLUMNS, *PHOTO_COLUMNS, "key"])]
    crops, report = out / "crops.csv", out / "report.json"
    logged, redone = replay_journal(out / JOURNAL_NAME)
    if crops.is_file() and report.is_file():
        info = read_json(report)
        recipes = {s: reuse_key(i.get("recipe", ""), info.get("settings")) for s, i in info.get("sources", {}).items()}
        done = _read_crops_csv(crops)
        void = np.array([row in redone for row in zip(done["image"], done["split"], done["source"])], bool)
        parts.append(done[~void].assign(key=done["source"].map(recipes)))
    previous = _with_photo(pd.concat([*parts, logged], ignore_index=True))
    return previous.drop_duplicates(ROW_KEY, keep="last").reset_index(drop=True)


def replay_journal(path: Path) -> tuple[pd.DataFrame, set[tuple[str, str, str]]]:
    """The rows a crop journal still vouches for, each with the `key` of the header line above
    it, and the (image, split, source) of every crop a run in it set out to redo: its header
    lists them before any worker starts, and voids the older rows of each (in crops.csv too,
    see load_previous), since a worker may rewrite a crop file and the run be killed before the
    row is logged. A line cut short by a kill (the last one) is skipped; every complete row
    names a crop file written whole."""
    rows: dict[tuple, dict] = {}
    redone: set[tuple[str, str, str]] = set()
    if path.is_file():
        keys: dict[str, str] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                continue
            if "recipes" in entry:
                keys = {s: reuse_key(r, entry["settings"]) for s, r in entry["recipes"].items()}
                for row in map(tuple, entry.get("redo", [])):
                    rows.pop(row, None)
                    redone.add(row)
            elif "row" in entry and entry["row"].get("source") in keys:
                row = entry["row"]
                rows[tuple(row.get(c) for c in ROW_KEY)] = {**row, "key": keys[row["source"]]}
    # dtype object: a nanosecond time must not pass through a float
    logged = pd.DataFrame(list(rows.values()), columns=[*CROP_COLUMNS, *PHOTO_COLUMNS, "key"], dtype=object)
    return _with_photo(logged), redone


class CropJournal:
    """Append-only log of the crops finished by this run, so a killed run's work is reused.

    A header line gives the recipes and settings the rows below it were made with, and (`redo`)
    every crop this run is about to make, whose earlier records it voids. Each entry starts with
    a newline and is flushed at once, so a kill can only cut the last entry short, and the next
    run's header still starts on a line of its own.
    """

    def __init__(self, path: Path, recipes: dict[str, str], settings: dict, tasks: list[dict]) -> None:
        self.path = path
        self.fh: TextIO = open(path, "a", encoding="utf-8")
        self._write({"recipes": recipes, "settings": settings, "redo": [list(task["row"]) for task in tasks]})

    def _write(self, entry: dict) -> None:
        self.fh.write("\n" + json.dumps(entry))
        self.fh.flush()

    def record(self, task: dict, result: dict) -> None:
        """Log a finished crop (`run_tasks` callback); failed decodes are not logged."""
        if "error" not in result:
            self._write({"row": crop_row(task, result)})

    def close(self) -> None:
        self.fh.close()


def up_to_date(rows: pd.DataFrame, previous: pd.DataFrame) -> pd.Series:
    """Which rows (image, split, source, crop_path, path) have a previous crop still valid:
    same crop file, which still exists, made from the same photo (photo_identity: same path,
    size and modification time; rows recorded without it, by an older version, are redone).
    The caller checks beforehand that the set's box recipe and the crop settings are unchanged."""
    on = [*ROW_KEY, "crop_path"]
    prev = previous.dropna(subset=PHOTO_COLUMNS)[[*on, *PHOTO_COLUMNS]]
    merged = rows[[*on, "path"]].merge(prev, on=on, how="left")
    ok = np.zeros(len(merged), bool)
    for i in np.flatnonzero(merged["photo_path"].notna().to_numpy()):
        recorded = (merged.at[i, "photo_path"], int(merged.at[i, "photo_bytes"]), int(merged.at[i, "photo_mtime_ns"]))
        photo = photo_identity(merged.at[i, "path"])
        ok[i] = photo is not None and tuple(photo.values()) == recorded and Path(merged.at[i, "crop_path"]).is_file()
    return pd.Series(ok, index=rows.index)


# --- the stage -----------------------------------------------------------------------------

def run(cfg: Config) -> Path:
    """Crop every catalogue image for every crop set; write crops.csv and report.json."""
    start = time.perf_counter()
    _check_crop_config(cfg)
    out = stage_dir(cfg, "crop")
    stale = check_fresh(Path(cfg.paths.outputs) / "00_prepare" / "report.json", "00_prepare_data.py")
    cat = read_catalogue(cfg)
    methods, substituted = detector_or_fallback(cfg, cat, check_sources(cfg))
    cat["crop_name"] = crop_names(cat)
    previous = load_previous(out)
    timing = {"detector_s": 0.0}
    kept, tasks, sources_report, det_summary = [], [], {}, None
    for source, method in methods.items():
        reused, todo, info, summary = _plan_source(cfg, out, cat, source, method, previous, timing)
        kept.append(reused)
        tasks += todo
        sources_report[source] = info | ({"requested": "detector", "note": substituted[source]}
                                         if source in substituted else {})
        det_summary = summary or det_summary
    t0 = time.perf_counter()
    journal = CropJournal(out / JOURNAL_NAME, {s: i["recipe"] for s, i in sources_report.items()}, crop_settings(cfg),
                          tasks)
    try:
        results = run_tasks(tasks, cfg.crop.workers, journal.record)
    finally:
        journal.close()
    timing["crop_s"] = time.perf_counter() - t0
    crops, undecodable = _collect(tasks, results)
    crops = _with_photo(pd.concat([*kept, crops], ignore_index=True))[[*CROP_COLUMNS, *PHOTO_COLUMNS]]
    crops = crops.sort_values(["source", "split", "image"], kind="stable").reset_index(drop=True)
    path = out / "crops.csv"
    write_csv(path, crops)
    timing["total_s"] = time.perf_counter() - start
    timing["crops_per_s"] = len(tasks) / timing["crop_s"] if tasks and timing["crop_s"] > 0 else None
    _write_report(cfg, out, crops, sources_report, undecodable, det_summary, timing, stale)
    write_resolved_config(cfg, out)
    (out / JOURNAL_NAME).unlink(missing_ok=True)  # its rows are all in crops.csv now
    _print_summary(crops, undecodable, timing, len(tasks) - len(undecodable))
    return path


def _plan_source(cfg: Config, out: Path, cat: pd.DataFrame, source: str, method: str, previous: pd.DataFrame,
                 timing: dict) -> tuple[pd.DataFrame, list[dict], dict, dict | None]:
    """For one crop set: the previous rows still up to date, the crop tasks for the rest (with
    their boxes where known before decoding), the set's report entry and the detector summary."""
    rows = cat.assign(source=source, crop_path=[str((out / source / s / n).resolve())
                                                for s, n in zip(cat["split"], cat["crop_name"])])
    det, det_summary = None, None
    if method == "detector":
        from whaleid import detector  # torch and timm load only when a set needs the detector

        t0 = time.perf_counter()
        det, det_summary = detector.ensure(cfg, cat, out / "detector.pt")
        timing["detector_s"] += time.perf_counter() - t0
        recipe = f"detector:{det_summary['weights_id']}"
    elif method == "import":
        # A content hash: a touched-but-equal box file keeps its crops.
        recipe = f"import:{file_digest(cfg.crop.box_files[source])}"
    else:
        recipe = f"{method}:{FALLBACK_VERSION if method == 'fallback' else 0}"
    settings = crop_settings(cfg)
    previous = previous[previous["key"] == reuse_key(recipe, settings)]
    reuse = up_to_date(rows, previous)
    kept = previous.merge(rows.loc[reuse, ["image", "split", "source"]], on=["image", "split", "source"])
    todo = rows.loc[~reuse].reset_index(drop=True)
    boxes, problems = _boxes_for(method, source, todo, cfg, cat, det, timing)
    tasks = [{"path": r.path, "crop_path": r.crop_path, "method": method, "box": b[0] if b else None,
              "conf": b[1] if b else 0.0, "settings": settings, "row": (r.image, r.split, source)}
             for r, b in zip(todo.itertuples(index=False), boxes)]
    info = {"method": method, "recipe": recipe, "reused": int(reuse.sum()), "import_problems": problems}
    return kept, tasks, info, det_summary


def _boxes_for(method: str, source: str, todo: pd.DataFrame, cfg: Config, cat: pd.DataFrame,
               det: Detector | None, timing: dict) -> tuple[list[tuple[Box, float] | None], list[str]]:
    """Per todo row, (box, conf) known before cropping, or None (full/fallback: the worker
    decides; import: no box listed); plus the import problems found."""
    if method == "import":
        found, problems = read_box_file(cfg.crop.box_files[source], set(cat["image"]))
        return [found.get(image) for image in todo["image"]], problems
    if method == "detector" and len(todo):
        from whaleid import detector

        t0 = time.perf_counter()
        predicted = detector.predict(det, todo["path"].tolist(), cfg)
        timing["detector_s"] += time.perf_counter() - t0
        return predicted, []
    return [None] * len(todo), []


def _collect(tasks: list[dict], results: list[dict]) -> tuple[pd.DataFrame, list[dict]]:
    """crops.csv rows of the finished tasks, and the images that failed to decode."""
    rows, undecodable = [], []
    for task, result in zip(tasks, results):
        image, split, source = task["row"]
        if "error" in result:
            undecodable.append({"image": image, "split": split, "source": source, "reason": result["error"]})
            continue
        rows.append(crop_row(task, result))
    return pd.DataFrame(rows, columns=[*CROP_COLUMNS, *PHOTO_COLUMNS]), undecodable


def _write_report(cfg: Config, out: Path, crops: pd.DataFrame, sources: dict, undecodable: list[dict],
                  det_summary: dict | None, timing: dict, stale: list[str]) -> None:
    """report.json: per set counts by method and flag, undecodable images, timings, fingerprints,
    the input files' digests and the stale-input warnings."""
    for source, info in sources.items():
        part = crops[crops["source"] == source]
        info["rows"] = int(len(part))
        info["by_method"] = dict(Counter(part["method"]))
        info["by_flag"] = dict(Counter(part["flag"].replace("", "ok")))
        info["import_problem_count"] = len(info["import_problems"])
        info["import_problems"] = info["import_problems"][:100]
    box_files = [cfg.crop.box_files[s] for s, i in sources.items() if i["method"] == "import"]
    write_json(out / "report.json", {
        "sources": sources,
        "undecodable": undecodable,
        "detector": det_summary,
        "settings": crop_settings(cfg),
        "timing": timing,
        "fingerprints": {
            "catalogue": fingerprint_files([Path(cfg.paths.outputs) / "00_prepare" / "catalogue.csv"]),
            "box_files": fingerprint_files(box_files) if box_files else None,
            "crop_config": fingerprint_config(cfg.crop.to_dict()),
        },
        "input_files": stage_inputs_record([Path(cfg.paths.outputs) / "00_prepare" / "catalogue.csv", *box_files],
                                           cfg.paths.outputs),
        "stale_inputs": stale,
    })


def _print_summary(crops: pd.DataFrame, undecodable: list[dict], timing: dict, n_done: int) -> None:
    flags = crops["flag"].replace("", "ok")
    table = pd.crosstab([crops["source"], crops["method"]], flags)
    print(f"stage 01: {len(crops)} crops ({n_done} made now, {len(crops) - n_done} up to date) "
          f"in {timing['total_s']:.1f}s\n{table.to_string()}")
    if undecodable:
        print(f"warning: {len(undecodable)} image(s) no longer decode, see report.json "
              f"(first: {undecodable[0]['image']})")


def _read_crops_csv(path: Path) -> pd.DataFrame:
    """crops.csv with its dtypes; the PHOTO_COLUMNS are NA where absent (an older file)."""
    crops = pd.read_csv(path, dtype={"image": str, "split": str, "source": str, "crop_path": str,
                                     "method": str, "flag": str, "photo_path": str,
                                     "photo_bytes": "Int64", "photo_mtime_ns": "Int64"}, keep_default_na=False,
                        na_values={c: ["", "nan", "NaN"] for c in [*BOX_COLUMNS, "conf", *PHOTO_COLUMNS]})
    return _with_photo(crops)


def _with_photo(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the PHOTO_COLUMNS (NA where unknown), the integers as Int64: exact, since a
    modification time in nanoseconds does not fit a float."""
    df = df.reindex(columns=[*df.columns, *[c for c in PHOTO_COLUMNS if c not in df.columns]])
    return df.astype({"photo_bytes": "Int64", "photo_mtime_ns": "Int64"})


def load_crops(cfg: Config) -> pd.DataFrame:
    """Stage 01's crops.csv (for stages 02 and 03), with its columns checked."""
    path = require(Path(cfg.paths.outputs) / "01_crops" / "crops.csv", "01_detect_crop.py")
    crops = _read_crops_csv(path)
    missing = [c for c in CROP_COLUMNS if c not in crops.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}: rerun 01_detect_crop.py")
    return crops
