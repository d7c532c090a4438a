"""Fault injection, interruptions and determinism: a stage killed with SIGKILL mid-run leaves
only whole artifacts, and a rerun redoes only what is missing; two runs of the whole pipeline
with the same seed write the same submission.csv. Scripts run as subprocesses on tiny inputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_detect import make_cfg as detect_cfg
from test_detect import write_catalogue, write_set
from test_pipeline import SCRIPTS, run_stage
from test_train import TINY_SETS, make_tiny_outputs

from whaleid import detect
from whaleid.images import read_image
from whaleid.model import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def start(script: str, sets: list[str], log: Path) -> subprocess.Popen:
    """Start a numbered script in the background, its output going to `log` (a pipe could fill)."""
    cmd = [sys.executable, str(ROOT / script)]
    for s in sets:
        cmd += ["--set", s]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 300.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the stage ended before it could be killed:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the stage to start writing"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def journal_rows(path: Path) -> int:
    return path.read_text(encoding="utf-8").count('"row"') if path.exists() else 0


@pytest.mark.slow
def test_killed_stage_01_leaves_whole_files_and_the_rerun_only_finishes_it(tmp_path: Path, capsys) -> None:
    cat, _ = write_set(tmp_path / "photos", 150, 0, size=192)
    sets = ["crop.box_source.fullbody=fallback", "crop.image_size=32"]
    cfg = detect_cfg(tmp_path, *sets)
    write_catalogue(cfg, cat)
    out = Path(cfg.paths.outputs) / "01_crops"
    journal = out / detect.JOURNAL_NAME
    log = tmp_path / "stage01.log"
    proc = start("01_detect_crop.py", [f"paths.outputs={cfg.paths.outputs}", "crop.workers=0", *sets], log)
    kill_when(proc, lambda: journal_rows(journal) >= 10, log)

    assert not (out / "crops.csv").exists() and not (out / "report.json").exists()
    made = [p for p in (out / "fullbody" / "train").iterdir() if not p.name.startswith(".")]
    assert 10 <= len(made) < len(cat)
    assert all(read_image(p)[1] == "" for p in made)  # every crop file in place is whole
    logged, _ = detect.replay_journal(journal)
    assert len(logged) >= 10 and set(logged["crop_path"]) <= {str(p.resolve()) for p in made}
    mtimes = {p: os.stat(p).st_mtime_ns for p in logged["crop_path"]}

    capsys.readouterr()
    detect.run(cfg)
    printed = capsys.readouterr().out
    crops = detect.load_crops(cfg)
    assert f"({len(cat) - len(logged)} made now, {len(logged)} up to date)" in printed
    assert len(crops) == len(cat) and all(read_image(p)[1] == "" for p in crops["crop_path"])
    assert {p: os.stat(p).st_mtime_ns for p in logged["crop_path"]} == mtimes
    assert not journal.exists()
    assert not any(p.endswith(".tmp") for p in crops["crop_path"])


def _metrics(outputs: Path) -> pd.DataFrame:
    return pd.read_csv(outputs / "02_train" / "metrics.csv")


@pytest.mark.slow
def test_killed_stage_02_resumes_from_last_pt_to_the_same_result(tmp_path: Path) -> None:
    sets = [*TINY_SETS, "train.epochs=3"]
    killed, straight = make_tiny_outputs(tmp_path / "killed"), make_tiny_outputs(tmp_path / "straight")
    log = tmp_path / "stage02.log"
    proc = start("02_train_arcface.py", [*sets, f"paths.outputs={killed}"], log)
    last = killed / "02_train" / "last.pt"
    kill_when(proc, last.exists, log)

    ckpt = read_checkpoint(last)  # loads: it was written whole
    assert 1 <= ckpt["epoch"] < 3
    assert _metrics(killed)["epoch"].max() >= ckpt["epoch"]
    assert not (killed / "02_train" / "report.json").exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "02_train_arcface.py"), "--resume",
                              *[a for s in sets + [f"paths.outputs={killed}"] for a in ("--set", s)]],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    proc = run_stage("02_train_arcface.py", [*sets, f"paths.outputs={straight}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]

    report = json.loads((killed / "02_train" / "report.json").read_text())
    assert report["resumed_from_epoch"] == ckpt["epoch"]
    assert read_checkpoint(last)["epoch"] == 3
    a, b = _metrics(killed), _metrics(straight)
    assert a["epoch"].tolist() == b["epoch"].tolist() == [1, 2, 3]
    # Each epoch is seeded from (seed, epoch) alone, so on the CPU the resumed run repeats the
    # uninterrupted one up to floating-point noise.
    np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(a["map5"], b["map5"], atol=1e-6)


DETERMINISM = [
    "demo.n_individuals=8", "demo.n_new_individuals=2", "demo.images_per_individual_max=4",
    "demo.min_size=320", "demo.max_size=360", "crop.image_size=64", "crop.detector.image_size=128",
    "crop.detector.epochs=2", "train.image_size=64", "train.epochs=1", "train.batch_size=16",
    "train.workers=0", "embed.workers=0", "knn.report_queries=4",
]


@pytest.mark.slow
def test_same_seed_same_data_same_submission(tmp_path: Path) -> None:
    """The whole pipeline twice on the CPU (the demo set generated once, shared): identical
    submission.csv, and identical crops, embeddings and metrics on the way."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        sets = [*DETERMINISM, f"paths.data={tmp_path / 'no_data'}", f"paths.demo={tmp_path / 'demo'}",
                f"paths.outputs={out}", "device=cpu"]
        for script in SCRIPTS:
            proc = run_stage(script, sets, cwd=tmp_path)
            assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
        runs.append(out)
    a, b = runs
    assert (a / "submission.csv").read_bytes() == (b / "submission.csv").read_bytes()
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "01_crops" / "crops.csv").drop(columns="crop_path"),
        pd.read_csv(b / "01_crops" / "crops.csv").drop(columns="crop_path"))
    np.testing.assert_array_equal(np.load(a / "03_embed" / "test_emb.npy"), np.load(b / "03_embed" / "test_emb.npy"))
    assert _metrics(a)["train_loss"].tolist() == _metrics(b)["train_loss"].tolist()
