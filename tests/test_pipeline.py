"""End to end: all five numbered scripts on a tiny generated demo set, on the CPU, then scored."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from whaleid.metrics import NEW_ID, map5_report

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["00_prepare_data.py", "01_detect_crop.py", "02_train_arcface.py", "03_embed.py", "04_knn_submit.py"]

TINY = [
    "demo.n_individuals=10",
    "demo.n_new_individuals=3",
    "demo.images_per_individual_max=6",
    "demo.min_size=320",
    "demo.max_size=400",
    "prepare.n_folds=3",
    "crop.image_size=64",
    "crop.detector.image_size=128",
    "crop.detector.epochs=2",
    "train.image_size=64",
    "train.epochs=2",
    "train.batch_size=16",
    "train.workers=0",
    "embed.workers=0",
    "knn.report_queries=4",
]


def run_stage(script: str, sets: list[str], cwd: Path) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / script)]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)


def tiny_sets(tmp: Path) -> list[str]:
    return TINY + [
        f"paths.data={tmp / 'no_competition_data'}",
        f"paths.demo={tmp / 'demo'}",
        f"paths.outputs={tmp / 'out'}",
    ]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    sets = tiny_sets(tmp)
    for script in SCRIPTS:
        proc = run_stage(script, sets, cwd=tmp)
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return tmp


@pytest.mark.slow
def test_all_stages_write_their_artifacts(pipeline_run: Path) -> None:
    out = pipeline_run / "out"
    for rel in [
        "00_prepare/catalogue.csv",
        "00_prepare/label_encoders.json",
        "01_crops/crops.csv",
        "02_train/best.pt",
        "02_train/last.pt",
        "02_train/metrics.csv",
        "02_train/curves.png",
        "02_train/refit/best.pt",  # train.refit, on in config.yaml: the all-data model ranks test
        "03_embed/fold_train_emb.npy",
        "03_embed/train_emb.npy",
        "03_embed/test_emb.npy",
        "04_submit/metrics.json",
        "04_submit/contact_sheet.png",
        "04_submit/report.html",
        "submission.csv",
    ]:
        assert (out / rel).exists(), f"missing artifact {rel}"
    for stage in ["00_prepare", "01_crops", "02_train", "03_embed", "04_submit"]:
        assert (out / stage / "config.resolved.yaml").exists(), f"{stage} lacks its resolved config"
    # the defaults rank test with the all-data model and validate with the fold model
    embedded = json.loads((out / "03_embed" / "report.json").read_text())
    assert embedded["checkpoint"]["kind"] == "refit best"
    assert embedded["fold_checkpoint"]["kind"] == "last"  # as long trained as the refit model


@pytest.mark.slow
def test_submission_is_valid_and_scored(pipeline_run: Path) -> None:
    demo = pipeline_run / "demo"
    sub = pd.read_csv(pipeline_run / "out" / "submission.csv")
    sample = pd.read_csv(demo / "sample_submission.csv")
    assert list(sub["image"]) == list(sample["image"])
    preds = [p.split() for p in sub["predictions"]]
    assert all(len(p) == 5 and len(set(p)) == 5 for p in preds)
    train_ids = set(pd.read_csv(demo / "train.csv")["individual_id"])
    assert all(pid in train_ids or pid == NEW_ID for p in preds for pid in p)

    labels = pd.read_csv(demo / "test_labels.csv").set_index("image").loc[sub["image"]]
    report = map5_report(preds, list(labels["individual_id"]))
    metrics = json.loads((pipeline_run / "out" / "04_submit" / "metrics.json").read_text())
    assert metrics["test"]["map5"] == pytest.approx(report["map5"], abs=1e-9)
    # Two CPU epochs on 64 px crops are far from converged, but must beat chance clearly:
    # chance is ~0.03 with this many individuals.
    assert report["map5"] > 0.15


@pytest.mark.slow
def test_rerun_of_a_finished_stage_keeps_its_outputs(pipeline_run: Path) -> None:
    crops = pipeline_run / "out" / "01_crops" / "crops.csv"
    before = pd.read_csv(crops)
    proc = run_stage("01_detect_crop.py", tiny_sets(pipeline_run), cwd=pipeline_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = pd.read_csv(crops)
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("refit", [False, True])
def test_logit_blend_runs_and_leaves_out_classes_without_training_images(
    pipeline_run: Path, tmp_path: Path, refit: bool
) -> None:
    """Stages 03-04 again with the ArcFace-logit blend. The fold model never trained a class for
    the validation fold's own individuals, so stage 03 leaves them out of its top-k and lists
    them; stage 04 blends the others, in validation (always the fold model) as in test (the
    fold model, or the refit model, which trained every class)."""
    out = tmp_path / "out"
    shutil.copytree(pipeline_run / "out", out)
    sets = [*tiny_sets(pipeline_run)[:-1], f"paths.outputs={out}", f"train.refit={str(refit).lower()}",
            "embed.logits_topk=4", "knn.logit_weight=0.3"]
    for script in ("03_embed.py", "04_knn_submit.py"):
        proc = run_stage(script, sets, cwd=pipeline_run)
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    def untrained_of(checkpoint: Path) -> np.ndarray:
        return np.flatnonzero(np.asarray(torch.load(checkpoint, weights_only=True)["class_counts"]) == 0)

    untrained = untrained_of(out / "02_train" / "best.pt")
    assert len(untrained) > 0  # the tiny demo's validation fold holds individuals of its own
    test_untrained = untrained_of(out / "02_train" / "refit" / "best.pt") if refit else untrained
    assert len(test_untrained) == (0 if refit else len(untrained))
    with np.load(out / "03_embed" / "test_logits.npz") as logits:
        np.testing.assert_array_equal(logits["untrained"], test_untrained)
        assert logits["labels"].shape[1] == 4 and not np.isin(logits["labels"], test_untrained).any()
    with np.load(out / "03_embed" / "train_logits.npz") as logits:  # the validation queries' logits
        np.testing.assert_array_equal(logits["untrained"], untrained)
        train_images = set(pd.read_csv(out / "03_embed" / "train_index.csv")["image"])
        assert set(logits["images"]) == train_images
    metrics = json.loads((out / "04_submit" / "metrics.json").read_text())
    assert metrics["logit_blend"].startswith("on: weight 0.3")
    assert metrics["logit_blend_validation"].startswith("on: weight 0.3")  # calibrated on blended scores
    preds = [p.split() for p in pd.read_csv(out / "submission.csv")["predictions"]]
    assert all(len(p) == 5 and len(set(p)) == 5 for p in preds)
    # logits off again: stage 03 removes both files, and stage 04 then ranks by kNN only
    sets[-2] = "embed.logits_topk=0"
    for script in ("03_embed.py", "04_knn_submit.py"):
        proc = run_stage(script, sets, cwd=pipeline_run)
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert not (out / "03_embed" / "test_logits.npz").exists() and not (out / "03_embed" / "train_logits.npz").exists()
    metrics = json.loads((out / "04_submit" / "metrics.json").read_text())
    assert metrics["logit_blend"] == "skipped: no test_logits.npz"
    assert metrics["logit_blend_validation"] == "skipped: no train_logits.npz"
