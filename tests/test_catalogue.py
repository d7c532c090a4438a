"""Stage 00: species fixes, open-set folds, image checks and schema errors on tiny generated folders."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import whaleid
from whaleid import catalogue, images
from whaleid.catalogue import (
    CATALOGUE_DTYPES,
    SPECIES_FIXES,
    assign_folds,
    fix_species,
    labels_file,
    load_catalogue,
    load_encoders,
    probe_images,
    resolve_data_dir,
)
from whaleid.config import ROOT, Config, config_from_dict, load_config
from whaleid.errors import UserError
from whaleid.io import read_json

# individual -> (species as written in train.csv, number of train images)
INDIVIDUALS = {
    "a1": ("kiler_whale", 1),
    "b2": ("bottlenose_dolpin", 2),
    "c3": ("humpback_whale", 3),
    "d4": ("globis", 4),
    "e2": ("mystery_whale", 2),
    "f3": ("beluga", 3),
    "g1": ("beluga", 1),
}
TEST_IMAGES = ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]


def _write_jpeg(path: Path, width: int = 48, height: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def make_layout(root: Path) -> Path:
    """A competition-layout folder: train.csv, sample_submission.csv, train_images/, test_images/."""
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    rows = []
    for ind, (species, n) in INDIVIDUALS.items():
        for j in range(n):
            rows.append({"image": f"{ind}_{j}.jpg", "species": species, "individual_id": ind})
    for i, row in enumerate(rows):
        _write_jpeg(root / "train_images" / row["image"], seed=i)
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    for i, name in enumerate(TEST_IMAGES):
        _write_jpeg(root / "test_images" / name, width=40, height=56, seed=100 + i)
    pd.DataFrame({"image": TEST_IMAGES, "predictions": "new_individual"}).to_csv(
        root / "sample_submission.csv", index=False
    )
    return root


def make_cfg(tmp_path: Path, data: Path, **prepare: object) -> Config:
    """The default config pointed at `data`, with outputs and the demo folder inside tmp_path."""
    raw = load_config().to_dict()
    raw["paths"].update(data=str(data), demo=str(tmp_path / "demo"), outputs=str(tmp_path / "out"))
    raw["prepare"].update({"n_folds": 2, "workers": 1, **prepare})
    return config_from_dict(raw)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return make_layout(tmp_path / "data")


# --- species -------------------------------------------------------------------------------------

def test_fix_species() -> None:
    raw = pd.Series(["kiler_whale", "bottlenose_dolpin", "globis", "pilot_whale", "beluga", "mystery"])
    fixed = fix_species(raw)
    assert fixed.tolist() == [
        "killer_whale", "bottlenose_dolphin", "short_finned_pilot_whale", "short_finned_pilot_whale",
        "beluga", "mystery",
    ]
    assert set(SPECIES_FIXES.values()) <= catalogue.HAPPYWHALE_SPECIES
    assert len(catalogue.HAPPYWHALE_SPECIES) == 26


# --- folds ---------------------------------------------------------------------------------------

def _long_tail_ids(n_individuals: int = 3000, seed: int = 0) -> pd.Series:
    """Image counts like Happywhale's: many individuals with 1-3 images, a few with dozens."""
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.geometric(0.45, n_individuals), 40)
    ids = np.repeat([f"id{i:05d}" for i in range(n_individuals)], counts)
    return pd.Series(rng.permutation(ids))


def _check_no_leaks(ids: pd.Series, fold: np.ndarray, fold_new: np.ndarray, n_folds: int) -> None:
    ids = ids.to_numpy()
    for k in range(n_folds):
        outside = set(ids[fold != k])
        val = fold == k
        assert not set(ids[val & fold_new]) & outside, f"fold {k}: a new individual has training images"
        assert set(ids[val & ~fold_new]) <= outside, f"fold {k}: a known individual has no training image"


def test_folds_split_by_individual_without_leaks() -> None:
    ids = _long_tail_ids()
    fold, fold_new = assign_folds(ids, n_folds=5, new_share=0.2, seed=42)
    _check_no_leaks(ids, fold, fold_new, 5)
    counts = ids.map(ids.value_counts())
    assert (fold[counts == 1] == -1).all(), "individuals with one image must always be in training"
    assert (fold[counts > 1] >= 0).all(), "every other image is validated in some fold"
    assert not fold_new[fold == -1].any()


def test_folds_meet_new_share_and_balance() -> None:
    ids = _long_tail_ids()
    fold, fold_new = assign_folds(ids, n_folds=5, new_share=0.2, seed=1)
    sizes = np.array([(fold == k).sum() for k in range(5)])
    shares = np.array([fold_new[fold == k].mean() for k in range(5)])
    assert sizes.max() / sizes.min() < 1.05, sizes
    assert np.abs(shares - 0.2).max() < 0.02, shares


def test_folds_known_individuals_spread_over_distinct_folds() -> None:
    ids = pd.Series(["x"] * 3 + ["y"] * 7 + ["z"] * 2)
    fold, fold_new = assign_folds(ids, n_folds=5, new_share=0.0, seed=0)
    assert not fold_new.any()
    assert len(set(fold[:3])) == 3 and len(set(fold[3:10])) == 5 and len(set(fold[10:])) == 2


def test_folds_are_deterministic() -> None:
    ids = _long_tail_ids(500)
    first = assign_folds(ids, 5, 0.2, seed=3)
    again = assign_folds(ids.copy(), 5, 0.2, seed=3)
    other = assign_folds(ids, 5, 0.2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_folds_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n_folds"):
        assign_folds(pd.Series(["a", "a"]), 1, 0.2, 0)
    with pytest.raises(ValueError, match="new_share"):
        assign_folds(pd.Series(["a", "a"]), 2, 1.5, 0)


# --- the stage on a tiny folder ------------------------------------------------------------------

def test_run_writes_the_contract(tmp_path: Path, data: Path) -> None:
    cfg = make_cfg(tmp_path, data)
    path = catalogue.run(cfg)
    assert path == tmp_path / "out" / "00_prepare" / "catalogue.csv"
    raw = pd.read_csv(path, keep_default_na=False)
    assert list(raw.columns) == list(CATALOGUE_DTYPES)

    cat = load_catalogue(cfg)
    enc = load_encoders(cfg)
    train, test = cat[cat.split == "train"], cat[cat.split == "test"]
    assert len(train) == sum(n for _, n in INDIVIDUALS.values()) and len(test) == len(TEST_IMAGES)
    assert enc["individual_id"] == sorted(INDIVIDUALS)
    assert enc["species"] == sorted({"killer_whale", "bottlenose_dolphin", "humpback_whale",
                                     "short_finned_pilot_whale", "mystery_whale", "beluga"})
    assert (train.individual_id.map(enc["individual_id"].index) == train.label).all()
    assert (train.species.map(enc["species"].index) == train.species_label).all()
    assert (train[["width", "height"]] == (48, 32)).all().all()
    assert (test[["width", "height"]] == (40, 56)).all().all()
    assert (test.species == "").all() and (test.individual_id == "").all()
    assert (test[["label", "species_label", "fold"]] == -1).all().all() and not test.fold_new.any()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in cat.path)
    assert pd.api.types.is_bool_dtype(cat.fold_new) and pd.api.types.is_integer_dtype(cat.width)

    out = tmp_path / "out" / "00_prepare"
    report = read_json(out / "report.json")
    assert report["species_fixes"] == {
        "bottlenose_dolpin -> bottlenose_dolphin": 2,
        "globis -> short_finned_pilot_whale": 4,
        "kiler_whale -> killer_whale": 1,
    }
    assert report["species_not_in_happywhale_list"] == {"mystery_whale": 2}
    assert report["counts"]["train"] == {"listed": 16, "usable": 16, "excluded": 0}
    assert set(report["fingerprints"]) == {"inputs", "config"}
    assert (out / "config.resolved.yaml").is_file()


def test_run_excludes_and_names_bad_images(tmp_path: Path, data: Path) -> None:
    (data / "train_images" / "c3_1.jpg").write_bytes(b"this is not a jpeg")
    truncated = (data / "train_images" / "d4_0.jpg").read_bytes()
    (data / "train_images" / "d4_0.jpg").write_bytes(truncated[: len(truncated) // 3])
    (data / "train_images" / "f3_2.jpg").unlink()
    (data / "test_images" / "t2.jpg").unlink()
    _write_jpeg(data / "train_images" / "unlisted.jpg")

    path = catalogue.run(make_cfg(tmp_path, data))
    cat = pd.read_csv(path, keep_default_na=False)
    report = read_json(path.parent / "report.json")
    excluded = {(e["split"], e["image"]): e["reason"] for e in report["excluded"]}
    assert set(excluded) == {("train", "c3_1.jpg"), ("train", "d4_0.jpg"),
                             ("train", "f3_2.jpg"), ("test", "t2.jpg")}
    assert "not a decodable image" in excluded[("train", "c3_1.jpg")]
    assert "not found" in excluded[("train", "f3_2.jpg")]
    assert "not found" in excluded[("test", "t2.jpg")]
    assert all(excluded.values())
    assert report["test_missing"] == ["t2.jpg"]
    assert report["counts"]["train"] == {"listed": 16, "usable": 13, "excluded": 3}
    assert report["extra_files"]["train"] == {"count": 1, "examples": ["unlisted.jpg"]}
    assert not set(cat.image) & {"c3_1.jpg", "d4_0.jpg", "f3_2.jpg", "t2.jpg", "unlisted.jpg"}


def test_header_only_check_still_excludes_unreadable_files(tmp_path: Path, data: Path) -> None:
    (data / "train_images" / "c3_1.jpg").write_bytes(b"")
    path = catalogue.run(make_cfg(tmp_path, data, check_decode=False))
    report = read_json(path.parent / "report.json")
    assert [e["image"] for e in report["excluded"]] == ["c3_1.jpg"]


def test_folds_in_the_catalogue_have_no_leaks(tmp_path: Path, data: Path) -> None:
    cfg = make_cfg(tmp_path, data)
    catalogue.run(cfg)
    cat = load_catalogue(cfg)
    train = cat[cat.split == "train"]
    _check_no_leaks(train.individual_id, train.fold.to_numpy(), train.fold_new.to_numpy(), 2)
    assert (train.loc[train.individual_id.isin(["a1", "g1"]), "fold"] == -1).all()


def test_probe_images_in_worker_processes(tmp_path: Path) -> None:
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.jpg")
        _write_jpeg(paths[-1], width=20 + i, height=10, seed=i)
    paths[5].write_bytes(b"broken")
    result = probe_images([str(p) for p in paths], check_decode=True, workers=2)
    assert [r[0] for i, r in enumerate(result) if i != 5] == [20 + i for i in range(12) if i != 5]
    assert result[5][:2] == (0, 0) and result[5][2]


# --- schema errors: one sentence, nothing written -------------------------------------------------

def _edit_train_csv(data: Path, edit) -> None:
    df = pd.read_csv(data / "train.csv", keep_default_na=False)
    edit(df).to_csv(data / "train.csv", index=False)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda df: df.rename(columns={"individual_id": "individual_ID"}),
         ["train.csv", "'individual_id'", "individual_ID", "did you mean"]),
        (lambda df: df.drop(columns="species"), ["train.csv", "'species'", "columns found"]),
        (lambda df: pd.concat([df, df.iloc[[3, 5]]], ignore_index=True),
         ["train.csv", "more than once", "'c3_0.jpg' on lines 5, 18", "'c3_2.jpg' on lines 7, 19"]),
        (lambda df: df.assign(individual_id=df.individual_id.where(df.index != 2, "")),
         ["train.csv", "empty 'individual_id'", "line(s) 4"]),
    ],
    ids=["misspelt-column", "missing-column", "duplicate-image", "empty-id"],
)
def test_schema_errors_name_the_problem_and_write_nothing(
    tmp_path: Path, data: Path, edit, expected: list[str]
) -> None:
    _edit_train_csv(data, edit)
    with pytest.raises(UserError) as err:
        catalogue.run(make_cfg(tmp_path, data))
    for part in expected:
        assert part in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_sample_submission_needs_an_image_column(tmp_path: Path, data: Path) -> None:
    pd.DataFrame({"img": TEST_IMAGES}).to_csv(data / "sample_submission.csv", index=False)
    with pytest.raises(UserError, match="sample_submission.csv has no column 'image'"):
        catalogue.run(make_cfg(tmp_path, data))
    assert not (tmp_path / "out").exists()


def test_cli_bad_csv_exits_2_with_one_line(tmp_path: Path, data: Path) -> None:
    _edit_train_csv(data, lambda df: df.drop(columns="image"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "00_prepare_data.py"),
         "--set", f"paths.data={data}", "--set", f"paths.outputs={tmp_path / 'out'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.csv" in lines[0] and "'image'" in lines[0]
    assert not (tmp_path / "out").exists()


# --- data folder resolution and readers ----------------------------------------------------------

def test_resolve_data_dir_and_labels_file(tmp_path: Path, data: Path) -> None:
    cfg = make_cfg(tmp_path, data)
    assert resolve_data_dir(cfg) == data
    assert labels_file(cfg) is None
    (data / "test_labels.csv").write_text("image,individual_id\nt0.jpg,new_individual\n")
    assert labels_file(cfg) == data / "test_labels.csv"

    answers = tmp_path / "answers.csv"
    answers.write_text("image,individual_id\n")
    cfg.paths.labels = str(answers)
    assert labels_file(cfg) == answers
    cfg.paths.labels = str(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="paths.labels"):
        labels_file(cfg)

    no_data = make_cfg(tmp_path, tmp_path / "nothing")
    assert resolve_data_dir(no_data) == tmp_path / "demo"


def test_demo_set_is_generated_when_there_is_no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def generate(cfg: Config, out: Path) -> None:
        calls.append(Path(out))
        if not (Path(out) / "train.csv").exists():
            make_layout(Path(out))

    fake = types.ModuleType("whaleid.demo_data")
    fake.generate = generate
    monkeypatch.setitem(sys.modules, "whaleid.demo_data", fake)
    monkeypatch.setattr(whaleid, "demo_data", fake, raising=False)

    cfg = make_cfg(tmp_path, tmp_path / "nothing")
    catalogue.run(cfg)
    catalogue.run(cfg)
    assert calls == [tmp_path / "demo"] * 2, "the generator decides whether the set is up to date"
    report = read_json(tmp_path / "out" / "00_prepare" / "report.json")
    assert report["demo"] is True and report["data_dir"] == str((tmp_path / "demo").resolve())


def test_existing_data_folder_without_train_csv_is_an_error_not_the_demo(tmp_path: Path, data: Path) -> None:
    (data / "train.csv").rename(data / "train_v2.csv")              # e.g. the parent folder or another layout
    with pytest.raises(UserError, match=r"paths.data .* holds no train.csv \(found: .*train_v2.csv"):
        catalogue.run(make_cfg(tmp_path, data))
    assert not (tmp_path / "demo").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value"), [("n_folds", 1), ("fold", 2), ("fold", -2), ("new_share", 1.0)])
def test_bad_prepare_settings_name_the_key(tmp_path: Path, data: Path, key: str, value: object) -> None:
    with pytest.raises(UserError, match=f"prepare.{key}"):
        catalogue.run(make_cfg(tmp_path, data, **{key: value}))
    assert not (tmp_path / "out").exists()


def test_fold_minus_one_is_allowed(tmp_path: Path, data: Path) -> None:
    assert catalogue.run(make_cfg(tmp_path, data, fold=-1)).is_file()


def test_load_catalogue_before_stage_00(tmp_path: Path, data: Path) -> None:
    cfg = make_cfg(tmp_path, data)
    with pytest.raises(UserError, match="run 00_prepare_data.py first"):
        load_catalogue(cfg)
    with pytest.raises(UserError, match="run 00_prepare_data.py first"):
        load_encoders(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("check_decode", [True, False])
def test_a_photo_above_the_pixel_limit_is_refused_with_or_without_the_decode_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, check_decode: bool) -> None:
    """The header-only probe (prepare.check_decode: false) refuses what a decode would refuse,
    so a photo above MAX_PIXELS never reaches a stage that decodes it."""
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))
    monkeypatch.setattr(images, "MAX_PIXELS", 30 * 20 - 1)
    (w, h, reason), = probe_images([str(path)], check_decode=check_decode, workers=1)
    assert (w, h) == (0, 0) and reason.startswith("image too large") and "big.png" in reason
    monkeypatch.setattr(images, "MAX_PIXELS", 30 * 20)
    assert probe_images([str(path)], check_decode=check_decode, workers=1) == [(30, 20, "")]
