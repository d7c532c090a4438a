"""The demo set: deterministic, in the Happywhale layout, with answer files that match the images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from whaleid import demo_data
from whaleid.config import load_config
from whaleid.errors import UserError
from whaleid.images import image_size

TINY = [
    "demo.n_individuals=8",
    "demo.n_new_individuals=2",
    "demo.images_per_individual_max=5",
    "demo.min_size=160",
    "demo.max_size=240",
    "demo.test_share=0.4",
]


def _tiny(*extra: str):
    return load_config(sets=[*TINY, *extra])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.generate(_tiny("demo.workers=2"), tmp_path_factory.mktemp("demo"))


def test_same_seed_same_bytes_whatever_the_workers(tiny_set: Path, tmp_path: Path) -> None:
    again = demo_data.generate(_tiny("demo.workers=1"), tmp_path / "again")
    assert _files(again) == _files(tiny_set)


def test_other_seed_differs(tiny_set: Path, tmp_path: Path) -> None:
    other = demo_data.generate(_tiny("demo.workers=1", "demo.seed=8"), tmp_path / "other")
    a, b = _files(tiny_set), _files(other)
    assert a["train.csv"] != b["train.csv"]
    assert not set(a.values()) & {v for k, v in b.items() if k.endswith(".jpg")}


def test_layout_and_columns(tiny_set: Path) -> None:
    for name in ("train.csv", "sample_submission.csv", "test_labels.csv", "boxes.csv", "demo_sample.png"):
        assert (tiny_set / name).is_file(), name
    train = pd.read_csv(tiny_set / "train.csv")
    assert list(train.columns) == ["image", "species", "individual_id"]
    assert set(train["species"]) <= set(demo_data.SPECIES)
    sub = pd.read_csv(tiny_set / "sample_submission.csv")
    assert list(sub.columns) == ["image", "predictions"]
    assert all(len(set(p.split())) == 5 for p in sub["predictions"])
    labels = pd.read_csv(tiny_set / "test_labels.csv")
    assert list(labels.columns) == ["image", "individual_id", "true_id", "species"]
    assert list(pd.read_csv(tiny_set / "boxes.csv").columns) == [
        "image", "split", "x_min", "y_min", "x_max", "y_max"]
    assert all(len(Path(n).stem) == 8 and int(Path(n).stem, 16) >= 0 for n in train["image"])


def test_every_image_listed_once(tiny_set: Path) -> None:
    train = pd.read_csv(tiny_set / "train.csv")
    labels = pd.read_csv(tiny_set / "test_labels.csv")
    sub = pd.read_csv(tiny_set / "sample_submission.csv")
    on_disk_train = {p.name for p in (tiny_set / "train_images").iterdir()}
    on_disk_test = {p.name for p in (tiny_set / "test_images").iterdir()}
    assert train["image"].is_unique and labels["image"].is_unique
    assert set(train["image"]) == on_disk_train
    assert set(labels["image"]) == on_disk_test == set(sub["image"])
    assert not on_disk_train & on_disk_test


def test_boxes_cover_every_image_and_fit(tiny_set: Path) -> None:
    boxes = pd.read_csv(tiny_set / "boxes.csv")
    listed = {("train", n) for n in pd.read_csv(tiny_set / "train.csv")["image"]}
    listed |= {("test", n) for n in pd.read_csv(tiny_set / "test_labels.csv")["image"]}
    assert set(zip(boxes["split"], boxes["image"])) == listed and len(boxes) == len(listed)
    fractions = []
    for row in boxes.itertuples():
        w, h = image_size(tiny_set / f"{row.split}_images" / row.image)
        assert 0 <= row.x_min < row.x_max <= w and 0 <= row.y_min < row.y_max <= h, row
        assert row.x_max - row.x_min >= 8 and row.y_max - row.y_min >= 4, row
        fractions.append((row.x_max - row.x_min) * (row.y_max - row.y_min) / (w * h))
    assert 0.03 <= min(fractions) and max(fractions) <= 0.7, (min(fractions), max(fractions))
    assert 0.1 <= float(np.median(fractions)) <= 0.5


def test_image_sizes_follow_config(tiny_set: Path) -> None:
    sizes = [image_size(p) for p in (tiny_set / "train_images").iterdir()]
    assert all(160 <= s <= 240 for wh in sizes for s in wh)


def test_new_individuals_are_exactly_those_absent_from_train(tiny_set: Path) -> None:
    train = pd.read_csv(tiny_set / "train.csv")
    labels = pd.read_csv(tiny_set / "test_labels.csv")
    absent = ~labels["true_id"].isin(set(train["individual_id"]))
    assert ((labels["individual_id"] == demo_data.NEW_ID) == absent).all()
    assert (labels.loc[~absent, "individual_id"] == labels.loc[~absent, "true_id"]).all()
    assert labels.loc[absent, "true_id"].nunique() == 2
    known = dict(zip(train["individual_id"], train["species"]))
    assert all(known[i] == s for i, s in zip(labels.loc[~absent, "true_id"], labels.loc[~absent, "species"]))


def test_new_share_near_target() -> None:
    photos = demo_data.plan(load_config().demo)
    test = [p for p in photos if p.split == "test"]
    share = sum(p.individual.is_new for p in test) / len(test)
    assert 0.12 <= share <= 0.35, share
    counts = pd.Series([p.individual.individual_id for p in photos]).value_counts()
    assert (counts == 1).mean() > 0.3 and counts.max() > 5  # a long tail


def test_known_singletons_stay_in_train() -> None:
    photos = demo_data.plan(load_config().demo)
    for ind in {p.individual for p in photos}:
        if not ind.is_new:
            assert ind.n_train >= 1
            if ind.n_train + ind.n_test == 1:
                assert ind.n_test == 0


def test_second_call_rewrites_nothing(tiny_set: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_set.rglob("*") if p.is_file()}
    demo_data.generate(_tiny("demo.workers=1"), tiny_set)  # workers do not change the files
    after = {p: p.stat().st_mtime_ns for p in tiny_set.rglob("*") if p.is_file()}
    assert before == after


def test_changed_config_regenerates_and_drops_stale_images(tmp_path: Path) -> None:
    out = demo_data.generate(_tiny("demo.workers=1"), tmp_path)
    old = {p.name for p in (out / "train_images").iterdir()}
    demo_data.generate(_tiny("demo.workers=1", "demo.n_individuals=5"), out)
    now = set(pd.read_csv(out / "train.csv")["image"])
    assert {p.name for p in (out / "train_images").iterdir()} == now
    assert now != old


def test_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("image,species,individual_id\n")
    with pytest.raises(UserError, match="did not write"):
        demo_data.generate(_tiny("demo.workers=1"), tmp_path)


def test_template_is_fixed_per_individual() -> None:
    """Two photos of one individual come from the same template; two individuals differ."""
    a = demo_data._template(7, 0, "bottlenose_dolphin")
    b = demo_data._template(7, 0, "bottlenose_dolphin")
    c = demo_data._template(7, 1, "bottlenose_dolphin")
    assert a is b
    assert a.rgb.shape != c.rgb.shape or not np.allclose(a.rgb, c.rgb)
