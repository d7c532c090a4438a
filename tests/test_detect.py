"""Stage 01: box import and checks, margin maths, the built-in detector, the fallback, the stage."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from whaleid import detect, detector
from whaleid.boxes import (
    box_problem,
    fallback_box,
    from_letterbox,
    iou,
    letterbox_params,
    pad_and_clamp,
    read_box_file,
    to_letterbox,
)
from whaleid.config import load_config
from whaleid.errors import UserError
from whaleid.images import read_image, resize_square

# --- synthetic photos: a dark ellipse (the animal) on a blue-ish, noisy sea ---------------

def sea_photo(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """An RGB photo and the animal's true box (x_min, y_min, x_max, y_max)."""
    sea = np.array([30, 90, 140], np.float32) + rng.normal(0, 8, size=(h, w, 3))
    img = np.clip(sea, 0, 255).astype(np.uint8)
    aw, ah = rng.uniform(0.25, 0.6) * w, rng.uniform(0.15, 0.4) * h
    cx, cy = rng.uniform(aw / 2 + 2, w - aw / 2 - 2), rng.uniform(ah / 2 + 2, h - ah / 2 - 2)
    cv2.ellipse(img, (round(cx), round(cy)), (round(aw / 2), round(ah / 2)), 0, 0, 360, (25, 25, 30), -1)
    box = (round(cx) - round(aw / 2), round(cy) - round(ah / 2), round(cx) + round(aw / 2) + 1,
           round(cy) + round(ah / 2) + 1)
    return img, tuple(float(v) for v in box)


def write_set(folder: Path, n_train: int, n_test: int, seed: int = 0, size: int = 128) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write PNG photos and return (catalogue, true boxes with split)."""
    rng = np.random.default_rng(seed)
    cat, boxes = [], []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        w, h = size + int(rng.integers(0, size // 2)), size
        img, box = sea_photo(rng, w, h)
        name = f"img {i} é.png"
        path = folder / split / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cat.append({"image": name, "split": split, "path": str(path), "width": w, "height": h})
        boxes.append({"image": name, "split": split, **dict(zip(["x_min", "y_min", "x_max", "y_max"], box))})
    return pd.DataFrame(cat), pd.DataFrame(boxes)


def make_cfg(tmp_path: Path, *sets: str):
    return load_config(sets=[f"paths.outputs={tmp_path / 'out'}", f"paths.data={tmp_path / 'none'}",
                             f"paths.demo={tmp_path / 'none'}", "crop.workers=0", *sets])


def write_catalogue(cfg, cat: pd.DataFrame) -> None:
    folder = Path(cfg.paths.outputs) / "00_prepare"
    folder.mkdir(parents=True, exist_ok=True)
    cat.to_csv(folder / "catalogue.csv", index=False)


# --- box maths -----------------------------------------------------------------------------

def test_box_problem_flags_degenerate_boxes():
    assert box_problem(None, 100, 50) == "no_box"
    assert box_problem((10, 10, 10, 40), 100, 50) == "degenerate_box"      # zero width
    assert box_problem((50, 10, 20, 40), 100, 50) == "degenerate_box"      # inverted
    assert box_problem((math.nan, 10, 20, 40), 100, 50) == "degenerate_box"
    assert box_problem((120, 10, 150, 40), 100, 50) == "degenerate_box"    # outside the image
    assert box_problem((-10, -5, 30, 20), 100, 50) == ""                   # partly outside: clamped
    assert box_problem((10, 10, 20, 20), 100, 50) == ""


def test_pad_and_clamp_known_answers():
    # 40 x 20 box, 10% margin: 4 px left/right, 2 px top/bottom.
    assert pad_and_clamp((20, 10, 60, 30), 0.1, 100, 50) == (16, 8, 64, 32)
    # near the corner: clamped to the image
    assert pad_and_clamp((0, 0, 50, 50), 0.5, 100, 50) == (0, 0, 75, 50)
    # fractional box: rounded outwards
    assert pad_and_clamp((10.4, 5.6, 20.2, 15.5), 0.0, 100, 50) == (10, 5, 21, 16)
    # no margin, full frame
    assert pad_and_clamp((0, 0, 100, 50), 0.0, 100, 50) == (0, 0, 100, 50)


def test_iou_known_answers():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert np.allclose(iou(a, b), [1.0, 50 / 150, 0.0])


def test_letterbox_round_trip_matches_resize_square():
    w, h, size = 300, 120, 64
    sx, sy, left, top = letterbox_params(w, h, size)
    img = np.zeros((h, w, 3), np.uint8)
    img[30:60, 100:200] = 255
    square = resize_square(img, size, keep_aspect=True)
    box01 = to_letterbox((100, 30, 200, 60), w, h, size)
    ys, xs = np.nonzero(square[:, :, 0] > 127)
    assert abs(xs.min() - box01[0] * size) <= 1 and abs(ys.max() + 1 - box01[3] * size) <= 1
    assert np.allclose(from_letterbox(box01, w, h, size), (100, 30, 200, 60))
    assert (left, top) == (0, (size - 26) // 2)          # 300x120 -> 64x26, centred
    assert (sx, sy) == (64 / 300, 26 / 120)


# --- import --------------------------------------------------------------------------------

def test_box_import_reports_bad_rows(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text(
        "image,x_min,y_min,x_max,y_max,conf\n"
        "a.jpg,1,2,30,40,0.9\n"          # line 2: fine
        "b.jpg,nan,2,30,40,0.9\n"        # line 3: NaN
        "c.jpg,1,2,30,40,-0.5\n"         # line 4: negative conf
        "zz.jpg,1,2,30,40,0.9\n"         # line 5: unknown image
        "d.jpg,1,2,thirty,40,0.9\n"      # line 6: non-numeric
        "e.jpg,1,2,30,40,0.9\n"          # lines 7-8: duplicate
        "e.jpg,1,2,31,41,0.8\n"
    )
    boxes, problems = read_box_file(path, {"a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"})
    assert boxes == {"a.jpg": ((1.0, 2.0, 30.0, 40.0), 0.9)}
    text = "\n".join(problems)
    for line, word in [(3, "x_min"), (4, "negative conf"), (5, "zz.jpg"), (6, "x_max"), (7, "more than once"),
                       (8, "more than once")]:
        assert f"line {line}:" in text and word in text, (line, word, text)


def test_box_import_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "my_boxes.csv"
    path.write_text("image,x_min,y_min,x_max,y_max\na.jpg,1,2,3,4\n")
    with pytest.raises(UserError, match=r"my_boxes\.csv.*'conf'"):
        read_box_file(path, {"a.jpg"})


# --- fallback and detector -----------------------------------------------------------------

def test_fallback_finds_the_animal():
    rng = np.random.default_rng(3)
    scores = []
    for _ in range(5):
        img, truth = sea_photo(rng, 400, 300)
        box, conf = fallback_box(img)
        assert box is not None and 0 < conf <= 1
        scores.append(iou(np.array(box), np.array(truth))[0])
    assert min(scores) > 0.5, scores


def test_fallback_plain_sea_gives_no_box():
    sea = np.full((200, 300, 3), (30, 90, 140), np.uint8)
    assert fallback_box(sea) == (None, 0.0)


@pytest.mark.slow
def test_detector_learns_boxes_and_the_stage_reuses_it(tmp_path):
    cat, truth = write_set(tmp_path / "photos", 40, 10)
    boxes_csv = tmp_path / "train_boxes.csv"
    truth.to_csv(boxes_csv, index=False)
    cfg = make_cfg(tmp_path, f"crop.detector.train_boxes={boxes_csv}", "crop.detector.image_size=128",
                   "crop.detector.epochs=20", "crop.detector.batch_size=20", "device=cpu")
    weights = Path(cfg.paths.outputs) / "01_crops" / "detector.pt"
    det, summary = detector.ensure(cfg, cat, weights)
    assert summary["trained_now"] and summary["n_train"] + summary["n_val"] == 40   # test boxes not used
    test = cat[cat["split"] == "test"]
    predicted = detector.predict(det, test["path"].tolist(), cfg)
    got = np.array([p[0] for p in predicted])
    want = truth.loc[truth["split"] == "test", ["x_min", "y_min", "x_max", "y_max"]].to_numpy()
    assert iou(got, want).mean() > 0.5, iou(got, want)

    write_catalogue(cfg, cat)
    detect.run(cfg)                                               # the stage loads the same weights
    report = detect.read_json(Path(cfg.paths.outputs) / "01_crops" / "report.json")
    assert report["detector"]["trained_now"] is False
    crops = detect.load_crops(cfg)
    assert len(crops) == 50 and set(crops["method"]) == {"detector"}


def test_detector_without_boxes_is_a_user_error(tmp_path):
    cat, _ = write_set(tmp_path / "photos", 2, 0)
    with pytest.raises(UserError, match="fallback"):
        detector.ensure(make_cfg(tmp_path), cat, tmp_path / "detector.pt")


def test_stage_without_training_boxes_crops_with_the_fallback_and_says_so(tmp_path, capsys):
    # the competition's own data folder: no boxes.csv, crop.detector.train_boxes empty (the defaults)
    cat, _ = write_set(tmp_path / "photos", 4, 2)
    cfg = make_cfg(tmp_path, "crop.image_size=48")
    assert cfg.crop.box_source.fullbody == "detector" and cfg.crop.detector.train_boxes == ""
    write_catalogue(cfg, cat)
    detect.run(cfg)
    assert "uses the training-free fallback" in capsys.readouterr().out
    crops = detect.load_crops(cfg)
    assert len(crops) == 6 and set(crops["method"]) == {"fallback"}
    report = detect.read_json(Path(cfg.paths.outputs) / "01_crops" / "report.json")
    info = report["sources"]["fullbody"]
    assert info["method"] == "fallback" and info["requested"] == "detector" and "boxes.csv" in info["note"]
    # a box file the user names is never replaced: a missing one is an error
    with pytest.raises(UserError, match="does not exist"):
        detect.run(make_cfg(tmp_path, "crop.image_size=48", f"crop.detector.train_boxes={tmp_path / 'gone.csv'}"))


# --- the stage -----------------------------------------------------------------------------

def test_stage_end_to_end_and_rerun_skips(tmp_path, capsys):
    cat, truth = write_set(tmp_path / "photos", 6, 4)
    box_csv = tmp_path / "imported.csv"
    imported = truth.drop(columns="split").assign(conf=0.9)
    imported.loc[0, "x_max"] = imported.loc[0, "x_min"]           # degenerate
    imported.loc[1, "conf"] = 0.1                                 # below min_conf
    imported.iloc[:-1].to_csv(box_csv, index=False)                # last image: no box
    bad = tmp_path / "photos" / "test" / "broken.jpg"
    bad.write_bytes(b"not an image")
    cat = pd.concat([cat, pd.DataFrame([{"image": "broken.jpg", "split": "test", "path": str(bad),
                                         "width": 10, "height": 10}])], ignore_index=True)
    cfg = make_cfg(tmp_path, "crop.sources=[fullbody, whole, seg]", "crop.box_source.fullbody=import",
                   f"crop.box_files.fullbody={box_csv}", "crop.box_source.whole=full",
                   "crop.box_source.seg=fallback", "crop.min_conf=0.5", "crop.image_size=64")
    write_catalogue(cfg, cat)
    path = detect.run(cfg)
    crops = detect.load_crops(cfg)
    assert path.is_file() and len(crops) == 3 * 10                 # one row per decodable image per set
    assert crops.groupby("source").size().to_dict() == {"fullbody": 10, "seg": 10, "whole": 10}
    assert all(Path(p).is_file() for p in crops["crop_path"])
    flags = crops[crops["source"] == "fullbody"].set_index("image")["flag"]
    names = cat["image"]
    assert flags[names[0]] == "degenerate_box" and flags[names[1]] == "low_conf" and flags[names[9]] == "no_box"
    assert (flags[names[2:9]] == "").all()
    whole = crops[crops["source"] == "whole"].iloc[0]
    row = cat.set_index("image").loc[whole["image"]]
    assert (whole["x_min"], whole["y_min"], whole["x_max"], whole["y_max"]) == (0, 0, row["width"], row["height"])
    assert set(crops.loc[crops["source"] == "seg", "method"]) == {"fallback"}
    report = detect.read_json(Path(cfg.paths.outputs) / "01_crops" / "report.json")
    assert [u["image"] for u in report["undecodable"]] == ["broken.jpg"] * 3
    assert report["sources"]["fullbody"]["import_problem_count"] == 0
    assert report["sources"]["fullbody"]["by_flag"] == {"ok": 7, "degenerate_box": 1, "low_conf": 1, "no_box": 1}
    mtimes = {p: Path(p).stat().st_mtime_ns for p in crops["crop_path"]}
    capsys.readouterr()

    detect.run(cfg)                                               # nothing changed: everything reused
    assert "(0 made now, 30 up to date)" in capsys.readouterr().out
    again = detect.load_crops(cfg)
    pd.testing.assert_frame_equal(again, crops)
    assert {p: Path(p).stat().st_mtime_ns for p in again["crop_path"]} == mtimes
    report = detect.read_json(Path(cfg.paths.outputs) / "01_crops" / "report.json")
    assert [report["sources"][s]["reused"] for s in ("fullbody", "whole", "seg")] == [10, 10, 10]

    cfg2 = make_cfg(tmp_path, "crop.sources=[fullbody, whole, seg]", "crop.box_source.fullbody=import",
                    f"crop.box_files.fullbody={box_csv}", "crop.box_source.whole=full",
                    "crop.box_source.seg=fallback", "crop.min_conf=0.5", "crop.image_size=48")
    detect.run(cfg2)                                              # new crop size: everything redone
    report = detect.read_json(Path(cfg.paths.outputs) / "01_crops" / "report.json")
    assert report["sources"]["whole"]["reused"] == 0
    assert cv2.imread(detect.load_crops(cfg2)["crop_path"][0]).shape == (48, 48, 3)


def test_missing_catalogue_says_run_stage_00(tmp_path):
    with pytest.raises(UserError, match="run 00_prepare_data.py first"):
        detect.run(make_cfg(tmp_path, "crop.box_source.fullbody=full"))


def test_unknown_box_source_lists_valid_ones(tmp_path):
    cfg = make_cfg(tmp_path, "crop.box_source.fullbody=magic")
    write_catalogue(cfg, write_set(tmp_path / "photos", 1, 0)[0])
    with pytest.raises(UserError, match="import, detector, fallback, full"):
        detect.run(cfg)


def test_missing_box_file_is_named_before_any_work(tmp_path):
    cfg = make_cfg(tmp_path, "crop.box_source.fullbody=import",
                   f"crop.box_files.fullbody={tmp_path / 'nowhere.csv'}")
    write_catalogue(cfg, write_set(tmp_path / "photos", 1, 0)[0])
    with pytest.raises(UserError, match=r"box file .*nowhere\.csv not found \(crop\.box_files\.fullbody\)"):
        detect.run(cfg)
    assert not (Path(cfg.paths.outputs) / "01_crops" / "crops.csv").exists()


def test_detector_features_follow_crop_detector_amp(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with native bf16 (patched on) the frozen backbone runs under bf16 autocast unless
    `crop.detector.amp` is false, which gives float32 exactly."""
    import torch

    from whaleid import inference

    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    feats = {}
    for amp in (True, False):
        cfg = load_config(sets=["crop.detector.pretrained=none", f"crop.detector.amp={str(amp).lower()}"])
        torch.manual_seed(0)
        feats[amp] = detector.Detector(cfg.crop.detector, torch.device("cpu")).features(images)
    assert all(f.dtype == torch.float32 for f in feats[True] + feats[False])
    assert not torch.equal(feats[True][1], feats[False][1]), "bf16 autocast ran"
    cosine = torch.nn.functional.cosine_similarity(feats[True][1].flatten(1), feats[False][1].flatten(1))
    assert cosine.min() > 0.99, cosine


class Killed(Exception):
    """Stands in for a SIGKILL of the stage."""


def test_crops_a_killed_run_rewrote_without_logging_are_not_reused(tmp_path, monkeypatch, capsys):
    """Run A (margin 0.1) finishes; run B (margin 0.4) is killed after its workers rewrote every
    crop file but before the main process logged more than the first row (Pool.imap hands the
    results back in chunks); run C, at margin 0.1 again, must remake them, not take B's files
    for A's because crops.csv still lists them under A's settings."""
    cat, truth = write_set(tmp_path / "photos", 6, 0)
    box_csv = tmp_path / "boxes.csv"
    truth.drop(columns="split").assign(conf=0.9).to_csv(box_csv, index=False)
    sets = ["crop.box_source.fullbody=import", f"crop.box_files.fullbody={box_csv}", "crop.image_size=32"]
    cfg = make_cfg(tmp_path, *sets, "crop.margin=0.1")
    write_catalogue(cfg, cat)
    detect.run(cfg)
    made_by_a = {p: Path(p).read_bytes() for p in detect.load_crops(cfg)["crop_path"]}

    def killed_after_one_row(tasks, workers, on_result):
        results = [detect.crop_one(task) for task in tasks]   # every file rewritten...
        on_result(tasks[0], results[0])                        # ...one row logged, then the kill
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(detect, "run_tasks", killed_after_one_row)
        with pytest.raises(Killed):
            detect.run(make_cfg(tmp_path, *sets, "crop.margin=0.4"))
    assert sum(Path(p).read_bytes() != b for p, b in made_by_a.items()) == 6   # B's files are in place
    capsys.readouterr()
    detect.run(cfg)
    assert "(6 made now, 0 up to date)" in capsys.readouterr().out
    assert {p: Path(p).read_bytes() for p in detect.load_crops(cfg)["crop_path"]} == made_by_a


def test_crops_are_redone_for_another_copy_of_the_photos_however_old(tmp_path, capsys):
    """Reuse checks the photo a crop came from (path, size, modification time), not only that
    the crop is newer: a copy of the data elsewhere with the same names and older times (unzip,
    cp -p, rsync -a), or a file replaced by an older one, has its crops redone. A crops.csv
    without these columns (an older version) is read, and all its crops redone."""
    cat, _ = write_set(tmp_path / "photos", 4, 0)
    cfg = make_cfg(tmp_path, "crop.box_source.fullbody=full", "crop.image_size=32")
    write_catalogue(cfg, cat)
    detect.run(cfg)
    copy, _ = write_set(tmp_path / "copy", 4, 0, seed=1)             # same names, other pixels
    for path in copy["path"]:
        os.utime(path, ns=(10**18, 10**18))                          # 2001: older than every crop
    write_catalogue(cfg, copy)
    capsys.readouterr()
    detect.run(cfg)
    assert "(4 made now, 0 up to date)" in capsys.readouterr().out
    crops = detect.load_crops(cfg)
    assert crops["photo_path"].tolist() == copy["path"].tolist()
    for row in crops.itertuples():
        want = resize_square(read_image(row.photo_path)[0], 32, keep_aspect=False).astype(int)
        assert np.abs(read_image(row.crop_path)[0].astype(int) - want).mean() < 4, row.image

    replaced = Path(copy["path"][0])                                 # in place, by an older file
    cv2.imwrite(str(replaced), np.zeros((40, 50, 3), np.uint8))
    os.utime(replaced, ns=(10**18 - 10**9, 10**18 - 10**9))
    detect.run(cfg)
    assert "(1 made now, 3 up to date)" in capsys.readouterr().out

    crops_csv = Path(cfg.paths.outputs) / "01_crops" / "crops.csv"
    pd.read_csv(crops_csv).drop(columns=detect.PHOTO_COLUMNS).to_csv(crops_csv, index=False)
    detect.run(cfg)
    assert "(4 made now, 0 up to date)" in capsys.readouterr().out


@pytest.mark.parametrize("expr", [
    "crop.image_size=0", "crop.margin=-0.1", "crop.min_conf=1.5", "crop.jpeg_quality=101", "crop.workers=-1",
    "crop.sources=[]", "crop.sources=[a, a]", "crop.detector.epochs=0", "crop.detector.batch_size=0",
    "crop.detector.image_size=16", "crop.detector.lr=0", "crop.detector.max_train_images=0",
])
def test_bad_crop_setting_stops_naming_the_key_before_any_work(tmp_path, expr):
    cfg = make_cfg(tmp_path, "crop.box_source.fullbody=full", "crop.box_source.a=full", expr)
    write_catalogue(cfg, write_set(tmp_path / "photos", 2, 0)[0])
    with pytest.raises(UserError, match=re.escape(expr.split("=")[0])):
        detect.run(cfg)
    assert not (Path(cfg.paths.outputs) / "01_crops").exists()


def test_detector_batches_are_pinned_only_for_a_gpu() -> None:
    """Pinned host memory speeds copies to a GPU and only costs on the CPU, also on a box that has
    a GPU but runs with `device: cpu`."""
    import torch

    from whaleid.inference import resolve_device

    cfg = load_config()
    dataset = detector.LetterboxDataset([], 64, (0.5,) * 3, (0.25,) * 3)
    assert detector._loader(dataset, cfg, torch.device("cuda")).pin_memory is True
    assert detector._loader(dataset, cfg, torch.device("cpu")).pin_memory is False
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        resolve_device(load_config(sets=["device=tpu"]).device)
