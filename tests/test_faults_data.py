"""Fault injection, tables, boxes, models and stale artifacts: each bad input either stops its
stage with one sentence naming the file or row (nothing written), or is counted and replaced by
the documented fallback in the stage's report. Builds on the tiny artifacts of the stage tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_catalogue import make_cfg as catalogue_cfg
from test_catalogue import make_layout
from test_detect import make_cfg as detect_cfg
from test_detect import write_catalogue, write_set
from test_submit import config as submit_cfg
from test_submit import make_artifacts
from test_train import make_tiny_outputs, tiny_cfg

from whaleid import catalogue, detect, detector, embed, submit, train
from whaleid.errors import UserError
from whaleid.io import check_fresh, read_json, stage_inputs_record
from whaleid.metrics import NEW_ID

# --- tables: stage 00 and the stage-04 fallback ------------------------------------------------


def test_empty_test_folder_excludes_every_test_image_with_a_warning(tmp_path: Path, capsys) -> None:
    data = make_layout(tmp_path / "data")
    for f in (data / "test_images").iterdir():
        f.unlink()
    path = catalogue.run(catalogue_cfg(tmp_path, data))
    report = read_json(path.parent / "report.json")
    assert report["test_missing"] == ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"]
    assert report["counts"]["test"] == {"listed": 4, "usable": 0, "excluded": 4}
    assert any("4 of 4 test image(s)" in w and "stage 04 still writes a row" in w for w in report["warnings"])
    assert "warning: 4 of 4 test image(s)" in capsys.readouterr().out
    assert (pd.read_csv(path)["split"] == "train").all()


def test_sample_submission_without_rows_is_a_warning(tmp_path: Path) -> None:
    data = make_layout(tmp_path / "data")
    (data / "sample_submission.csv").write_text("image,predictions\n")
    path = catalogue.run(catalogue_cfg(tmp_path, data))
    assert any("lists no test images" in w for w in read_json(path.parent / "report.json")["warnings"])


def test_submission_has_a_fallback_row_for_every_image_without_embedding(tmp_path: Path) -> None:
    """No test image embedded at all (an empty test folder): every sample row is still written,
    as new_individual followed by the 4 most frequent train ids, and counted in metrics.json."""
    sample, _ = make_artifacts(tmp_path)
    emb_dir = tmp_path / "out" / "03_embed"
    np.save(emb_dir / "test_emb.npy", np.zeros((0, 32), np.float32))
    pd.DataFrame(columns=["image", "source", "flip"]).to_csv(emb_dir / "test_index.csv", index=False)
    cat = pd.read_csv(tmp_path / "out" / "00_prepare" / "catalogue.csv", keep_default_na=False)
    # Give id07 six images and id03 five (the others have three), so the fallback's order is known.
    extra = pd.concat([cat[cat["individual_id"] == "id07"], cat[cat["individual_id"] == "id03"].iloc[:2]])
    extra = extra.assign(image="x" + extra["image"], fold=-1, fold_new=False)
    pd.concat([cat, extra]).to_csv(tmp_path / "out" / "00_prepare" / "catalogue.csv", index=False)
    path = submit.run(submit_cfg(tmp_path))
    sub = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert sub["image"].tolist() == sample
    rows = sub["predictions"].str.split().tolist()
    assert all(r == rows[0] for r in rows)
    assert rows[0][:3] == [NEW_ID, "id07", "id03"] and len(set(rows[0])) == 5
    counts = read_json(tmp_path / "out" / "04_submit" / "metrics.json")["counts"]
    assert counts["fallback_rows"] == len(sample) and counts["new_first_share"] == 1.0


# --- boxes: import file and detector output through stage 01 ----------------------------------

def test_bad_imported_boxes_fall_back_to_the_full_frame_and_are_reported(tmp_path: Path) -> None:
    cat, truth = write_set(tmp_path / "photos", 6, 0)
    rows = truth.drop(columns="split").assign(conf=0.9)
    rows.loc[0, ["x_min", "x_max"]] = [5000.0, 6000.0]         # wholly outside the image
    rows.loc[1, "x_max"] = rows.loc[1, "x_min"]                # zero area
    rows["x_min"] = rows["x_min"].astype(object)
    rows.loc[2, "x_min"] = "nan"                               # NaN
    rows.loc[3, "conf"] = -0.5                                 # negative confidence
    rows.loc[4, ["x_min", "y_min"]] = [-40.0, -30.0]           # partly outside: clamped, kept
    box_csv = tmp_path / "boxes.csv"
    rows.to_csv(box_csv, index=False)
    cfg = detect_cfg(tmp_path, "crop.box_source.fullbody=import", f"crop.box_files.fullbody={box_csv}",
                     "crop.image_size=32")
    write_catalogue(cfg, cat)
    detect.run(cfg)
    crops = detect.load_crops(cfg).set_index("image").loc[cat["image"]]
    assert crops["flag"].tolist() == ["degenerate_box", "degenerate_box", "no_box", "no_box", "", ""]
    assert (crops.iloc[4][["x_min", "y_min"]] == 0).all()
    full = crops.iloc[0]
    assert (full["x_min"], full["y_min"], full["x_max"], full["y_max"]) == (0, 0, cat["width"][0], cat["height"][0])
    report = read_json(Path(cfg.paths.outputs) / "01_crops" / "report.json")["sources"]["fullbody"]
    assert report["import_problem_count"] == 2
    assert report["import_problems"] == ["boxes.csv line 4: non-numeric or missing x_min", "boxes.csv line 5: negative conf"]
    assert report["by_flag"] == {"degenerate_box": 2, "no_box": 2, "ok": 2}


def test_degenerate_detector_output_is_flagged_not_fatal(tmp_path: Path, monkeypatch) -> None:
    cat, truth = write_set(tmp_path / "photos", 6, 0)
    truth.to_csv(tmp_path / "train_boxes.csv", index=False)  # boxes to learn from (the detector is stubbed)
    nan = float("nan")
    predicted = [((nan, 1.0, 50.0, 60.0), 0.9), ((10.0, 10.0, 10.0, 40.0), 0.9), ((-90.0, -90.0, -10.0, -5.0), 0.9),
                 ((10.0, 10.0, 60.0, 60.0), -0.3), None, ((10.0, 10.0, 60.0, 60.0), 0.8)]
    monkeypatch.setattr(detector, "ensure", lambda cfg, cat, path: (None, {"weights_id": "stub"}))
    monkeypatch.setattr(detector, "predict", lambda det, paths, cfg: predicted[: len(paths)])
    cfg = detect_cfg(tmp_path, "crop.box_source.fullbody=detector", "crop.image_size=32",
                     f"crop.detector.train_boxes={tmp_path / 'train_boxes.csv'}")
    write_catalogue(cfg, cat)
    detect.run(cfg)
    crops = detect.load_crops(cfg).set_index("image").loc[cat["image"]]
    assert crops["flag"].tolist() == ["degenerate_box", "degenerate_box", "degenerate_box", "low_conf", "no_box", ""]
    assert crops["conf"].tolist()[4] == 0.0


def test_corrupt_detector_weights_are_retrained(tmp_path: Path, capsys) -> None:
    cat, truth = write_set(tmp_path / "photos", 4, 0, size=64)
    boxes = tmp_path / "train_boxes.csv"
    truth.to_csv(boxes, index=False)
    cfg = detect_cfg(tmp_path, "crop.detector.pretrained=none", "crop.detector.epochs=1",
                     "crop.detector.image_size=64", f"crop.detector.train_boxes={boxes}")
    weights = tmp_path / "detector.pt"
    weights.write_bytes(b"PK\x03\x04 cut short")
    _, summary = detector.ensure(cfg, cat, weights)
    assert summary["trained_now"] and "is truncated or corrupt" in capsys.readouterr().out
    assert detector.ensure(cfg, cat, weights)[1]["trained_now"] is False


# --- model side: loss, checkpoints, embeddings -------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-epoch stage-02 run on tiny artifacts whose catalogue changed after stage 01 ran."""
    outputs = make_tiny_outputs(tmp_path_factory.mktemp("faults_model") / "outputs")
    cat_path = outputs / "00_prepare" / "catalogue.csv"
    (outputs / "01_crops" / "report.json").write_text(json.dumps({"input_files": stage_inputs_record([cat_path], outputs)}))
    cat = pd.read_csv(cat_path)
    cat.loc[0, "width"] = 41                                   # the catalogue changes after the crops
    cat.to_csv(cat_path, index=False)
    train.run(tiny_cfg(outputs, "train.refit=true"))  # the refit model is only read with train.refit true
    return outputs


def _copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "outputs"))


def embed_cfg(outputs: Path, *sets: str):
    return tiny_cfg(outputs, "embed.workers=0", "embed.batch_size=32", "embed.flip_tta=none", *sets)


def test_stage_03_shift_tta_is_recorded_changes_the_embeddings_and_refuses_bad_values(
        trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    with pytest.raises(UserError, match="embed.shift_tta must be a whole number of pixels >= 0, got -1"):
        embed.run(embed_cfg(outputs, "embed.shift_tta=-1"))
    assert not (outputs / "03_embed").exists()
    plain = np.load(embed.run(embed_cfg(outputs)) / "train_emb.npy")
    folder = embed.run(embed_cfg(outputs, "embed.shift_tta=2"))
    shifted = np.load(folder / "train_emb.npy")
    assert read_json(folder / "report.json")["shift_tta"] == 2
    assert shifted.shape == plain.shape and not np.allclose(shifted, plain, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(shifted, axis=1), 1.0, atol=1e-5)


def test_stage_03_with_refit_embeds_with_both_models_and_names_a_missing_refit(
        trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    # the fold run's best.pt as an earlier epoch that validated better: another model than last.pt
    shutil.copy(outputs / "02_train" / "refit" / "best.pt", outputs / "02_train" / "best.pt")
    folder = embed.run(embed_cfg(outputs, "train.refit=true"))
    report = read_json(folder / "report.json")
    assert report["checkpoint"]["path"] == str((outputs / "02_train" / "refit" / "best.pt").resolve())
    # the fold model validates as the refit model's stand-in: its last epoch, trained as long
    assert report["fold_checkpoint"]["path"] == str((outputs / "02_train" / "last.pt").resolve())
    assert report["fold_checkpoint"]["kind"] == "last"
    train_emb, fold_emb = np.load(folder / "train_emb.npy"), np.load(folder / "fold_train_emb.npy")
    assert fold_emb.shape == train_emb.shape and not np.allclose(fold_emb, train_emb, atol=1e-4)
    pd.testing.assert_frame_equal(pd.read_csv(folder / "fold_train_index.csv"), pd.read_csv(folder / "train_index.csv"))
    fold_test = np.load(folder / "fold_test_emb.npy")  # for stage 04's share transfer of the threshold
    pd.testing.assert_frame_equal(pd.read_csv(folder / "fold_test_index.csv"), pd.read_csv(folder / "test_index.csv"))
    # the fold model's vectors are exactly what stage 03 writes without refit from last.pt
    alone = embed.run(embed_cfg(outputs, "train.refit=false", "embed.checkpoint=last"))
    np.testing.assert_allclose(fold_emb, np.load(alone / "train_emb.npy"), atol=1e-5)
    np.testing.assert_allclose(fold_test, np.load(alone / "test_emb.npy"), atol=1e-5)
    for name in ("fold_train_emb.npy", "fold_test_emb.npy"):
        assert not (folder / name).exists(), f"stage 04 would read an earlier run's {name}"
    # knn.refit_threshold cosine: stage 04 reads no fold test vectors, so none are made (nor left)
    embed.run(embed_cfg(outputs, "train.refit=true"))
    folder = embed.run(embed_cfg(outputs, "train.refit=true", "knn.refit_threshold=cosine"))
    assert (folder / "fold_train_emb.npy").exists() and not (folder / "fold_test_emb.npy").exists()
    shutil.rmtree(outputs / "02_train" / "refit")
    with pytest.raises(UserError, match=r"refit/best.pt does not exist: the refit run has not trained an epoch.*--resume"):
        embed.run(embed_cfg(outputs, "train.refit=true"))
    (outputs / "02_train" / "report.json").unlink()  # the fold run did not finish either
    with pytest.raises(UserError, match=r"refit/best.pt does not exist: stage 02 did not finish.*--resume"):
        embed.run(embed_cfg(outputs, "train.refit=true"))


def test_stage_02_warns_when_the_catalogue_changed_after_the_crops(trained: Path) -> None:
    stale = read_json(trained / "02_train" / "report.json")["stale_inputs"]
    assert len(stale) == 1 and "catalogue.csv changed after 01_crops" in stale[0] and "01_detect_crop.py" in stale[0]
    recorded = read_json(trained / "02_train" / "report.json")["input_files"]
    assert {Path(p).name for p in recorded} == {"catalogue.csv", "label_encoders.json", "crops.csv"}


def test_inf_loss_stops_with_a_clear_message_and_keeps_the_checkpoints(trained: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    outputs = _copy(trained, tmp_path)
    before = {n: (outputs / "02_train" / n).read_bytes() for n in ("last.pt", "best.pt", "metrics.csv")}
    forward = train.TrainNet.forward
    monkeypatch.setattr(train.TrainNet, "forward", lambda self, *a: forward(self, *a) * math.inf)
    with pytest.raises(UserError, match=r"NaN/inf at epoch 2, batch 1; last good checkpoint kept"):
        train.run(tiny_cfg(outputs, "train.epochs=2"), resume=True)
    assert {n: (outputs / "02_train" / n).read_bytes() for n in before} == before


def test_resume_from_a_checkpoint_of_another_model_is_refused(trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    with pytest.raises(UserError, match="does not fit the configured model"):
        train.run(tiny_cfg(outputs, "train.epochs=2", "model.embedding_size=16"), resume=True)


def test_truncated_checkpoint_is_named_and_nothing_is_written(trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    for name in ("best.pt", "last.pt"):
        ckpt = outputs / "02_train" / name
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(UserError, match=r"checkpoint .*best.pt is truncated or corrupt"):
        embed.run(embed_cfg(outputs))
    assert not (outputs / "03_embed").exists()
    with pytest.raises(UserError, match=r"checkpoint .*last.pt is truncated or corrupt"):
        train.run(tiny_cfg(outputs, "train.epochs=2"), resume=True)


def test_checkpoint_whose_weights_do_not_fit_its_config_is_named(trained: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained / "02_train" / "best.pt", weights_only=True)
    ckpt["config"]["model"]["embedding_size"] = 64            # e.g. weights copied from another run
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(UserError, match=r"other.pt does not fit the model its config describes"):
        embed.run(embed_cfg(_copy(trained, tmp_path), f"embed.checkpoint={other}"))


def test_stage_03_rebuilds_the_model_from_the_checkpoint_and_flags_stale_inputs(
        trained: Path, tmp_path: Path, capsys) -> None:
    outputs = _copy(trained, tmp_path)
    crops = pd.read_csv(outputs / "01_crops" / "crops.csv")
    crops.assign(conf=0.5).to_csv(outputs / "01_crops" / "crops.csv", index=False)  # crops redone since training
    folder = embed.run(embed_cfg(outputs, "model.embedding_size=999", "model.backbone=resnet18"))
    assert np.load(folder / "train_emb.npy").shape == (28, 32)  # the checkpoint's model, not today's config
    report = read_json(folder / "report.json")
    assert any("crops.csv changed after 02_train" in s and "02_train_arcface.py" in s for s in report["stale_inputs"])
    assert "warning: stale input:" in capsys.readouterr().out
    assert {Path(p).name for p in report["input_files"]} == {"catalogue.csv", "crops.csv", "best.pt"}


def test_checkpoint_of_another_label_set(trained: Path, tmp_path: Path, capsys) -> None:
    outputs = _copy(trained, tmp_path)
    enc_path = outputs / "00_prepare" / "label_encoders.json"
    enc = read_json(enc_path)
    enc["individual_id"] = [*enc["individual_id"], "id_zz"]
    enc_path.write_text(json.dumps(enc))
    with pytest.raises(UserError, match=r"another label set \(7 individuals, 7 of them in label_encoders.json, "
                                        r"which has 8\): its ArcFace logits cannot be used"):
        embed.run(embed_cfg(outputs, "embed.logits_topk=3"))
    cfg = embed_cfg(outputs)
    warnings = embed.check_checkpoint_inputs(cfg, embed.load_model(cfg))
    assert any("another label set" in w for w in warnings)
    assert "the embeddings are still usable for kNN" in capsys.readouterr().out


def test_non_finite_embedding_in_stage_03_names_the_image() -> None:
    rows = pd.DataFrame({"image": ["a.jpg", "b é.jpg"], "split": ["train", "test"], "crop_path": ["/a", "/b"]})
    emb = np.array([[1.0, 0.0], [np.inf, 0.0]], np.float32)
    with pytest.raises(UserError, match=r"test image b é.jpg \(crop /b\) is not finite"):
        embed.check_finite(rows, emb)


# --- stale artifacts: the shared helper and stage 01 / stage 04 --------------------------------

def test_check_fresh_compares_recorded_digests(tmp_path: Path) -> None:
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x\n1\n")
    b.write_text("y\n2\n")
    report = tmp_path / "stage" / "report.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"input_files": stage_inputs_record([a, b], tmp_path)}))
    assert check_fresh(report, "make it") == []
    a.write_text("x\n1\n")                                      # rewritten with the same bytes: still fresh
    assert check_fresh(report, "make it") == []
    a.write_text("x\n3\n")
    b.unlink()
    stale = check_fresh(report, "make it")
    assert len(stale) == 2 and "a.csv changed after stage" in stale[0] and "b.csv no longer exists" in stale[1]
    assert check_fresh(tmp_path / "absent.json", "make it") == []


def test_stage_01_warns_when_train_csv_changed_after_stage_00(tmp_path: Path, capsys) -> None:
    data = make_layout(tmp_path / "data")
    cfg = catalogue_cfg(tmp_path, data)
    catalogue.run(cfg)
    with open(data / "train.csv", "a") as fh:
        fh.write("new.jpg,beluga,zz\n")
    cfg["crop"].update(workers=0, image_size=32, box_source={"fullbody": "full"})
    detect.run(cfg)
    stale = read_json(tmp_path / "out" / "01_crops" / "report.json")["stale_inputs"]
    assert len(stale) == 1 and "train.csv changed after 00_prepare" in stale[0] and "00_prepare_data.py" in stale[0]
    assert "warning: stale input:" in capsys.readouterr().out


def test_stage_04_warns_when_embeddings_are_older_than_the_catalogue(tmp_path: Path) -> None:
    make_artifacts(tmp_path)
    out = tmp_path / "out"
    cat_path = out / "00_prepare" / "catalogue.csv"
    report = read_json(out / "03_embed" / "report.json") | {"input_files": stage_inputs_record([cat_path], out)}
    (out / "03_embed" / "report.json").write_text(json.dumps(report))
    submit.run(submit_cfg(tmp_path))
    assert read_json(out / "04_submit" / "metrics.json")["stale_inputs"] == []
    cat = pd.read_csv(cat_path, keep_default_na=False)
    cat.loc[0, "width"] = 99
    cat.to_csv(cat_path, index=False)
    submit.run(submit_cfg(tmp_path))
    metrics = read_json(out / "04_submit" / "metrics.json")
    assert len(metrics["stale_inputs"]) == 1 and "catalogue.csv changed after 03_embed" in metrics["stale_inputs"][0]
    assert {Path(p).name for p in metrics["input_files"]} >= {"train_emb.npy", "catalogue.csv", "sample_submission.csv"}


def test_user_error_from_a_loader_worker_is_one_line(tmp_path: Path) -> None:
    """torch re-raises a worker's UserError with the worker traceback in the message."""
    from torch.utils.data import DataLoader

    from whaleid.cli import one_line
    from whaleid.dataset import CropDataset

    with pytest.raises(UserError) as err:
        next(iter(DataLoader(CropDataset([str(tmp_path / "gone é.jpg")]), num_workers=1)))
    assert one_line(err.value) == f"cannot read crop {tmp_path / 'gone é.jpg'}: file not found; rerun 01_detect_crop.py"
    assert one_line(UserError("plain")) == "plain"
