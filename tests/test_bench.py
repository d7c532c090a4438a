"""bench/bench_accuracy.py's bookkeeping, with the stages stubbed: what each row of the results
table reports must come from that run's own artifacts, and later runs must not overwrite earlier
ones."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_accuracy  # noqa: E402

IDS = ["whale_a", "whale_b", "new_individual"]


def fake_stage(self: bench_accuracy.Runner, name: str, out: Path, data: Path, extra: list[str] = (),
               label: str = "") -> float:
    """Stands for a numbered script: the base run answers every test image right, a pseudo round
    every one wrong, each with its own threshold and checkpoint."""
    label = label or name
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "config.resolved.yaml").write_text(label)
    if name == "02_train":
        (out / name / "best.pt").write_text(f"checkpoint of {label}")
    if name == "03_embed":  # the base run embeds with a refit model, the round without
        refit = "pseudo" not in label
        report = {"checkpoint": {"kind": "refit best" if refit else "best"},
                  "fold_checkpoint": {"kind": "last"} if refit else None}
        (out / name / "report.json").write_text(json.dumps(report))
    if name == "04_submit":
        answers = pd.read_csv(data / "test_labels.csv")
        good = "pseudo" not in label
        preds = [" ".join([t, *[i for i in IDS if i != t]]) if good else "x y z w v" for t in answers["individual_id"]]
        pd.DataFrame({"image": answers["image"], "predictions": preds}).to_csv(out / "submission.csv", index=False)
        metrics = {"threshold": {"value": 0.6 if good else 0.3, "how": f"calibrated in {label}", "mode": "calibrate"}
                   | ({"test_value": 0.7} if good else {}),  # the base run's refit model ranks test
                   "validation": {"map5": 0.9 if good else 0.1, "n": 3}}
        (out / name / "metrics.json").write_text(json.dumps(metrics))
        answers.head(2).assign(confidence=0.9).to_csv(out / name / "pseudo_labels.csv", index=False)
    self.times[label] = 1.0
    return 1.0


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "species": "x", "individual_id": IDS[:2]}).to_csv(
        folder / "train.csv", index=False)
    pd.DataFrame({"image": ["t1.jpg", "t2.jpg", "t3.jpg"], "individual_id": IDS}).to_csv(
        folder / "test_labels.csv", index=False)
    return folder


def test_pseudo_rounds_run_in_their_own_folders_and_each_row_is_its_own_run(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_accuracy.Runner, "stage", fake_stage)
    monkeypatch.setattr(bench_accuracy, "machine", lambda: "test")
    out = tmp_path / "out"
    args = argparse.Namespace(data=str(data), labels="", profile="cpu", config=[], sets=[], out=str(out),
                              subset_ids=0, skip_floor=True, pseudo_rounds=1)
    text = bench_accuracy.bench(args)
    test_part, validation_part = text.split("## Validation fold")

    def rows(part: str) -> dict[str, str]:
        return {line.split("|")[1].strip(): line.split("|")[2].strip() for line in part.splitlines()
                if line.startswith("| trained")}

    assert rows(test_part) == {"trained": "1.0000", "trained + pseudo round 1": "0.0000"}
    assert rows(validation_part) == {"trained": "0.9000", "trained + pseudo round 1": "0.1000"}
    # the base run keeps its model and submission; the round has its own, trained on the base's labels
    assert (out / "02_train" / "best.pt").read_text() == "checkpoint of 02_train"
    assert bench_accuracy.score_submission(out / "submission.csv", data / "test_labels.csv")["map5"] == 1.0
    round1 = out / "pseudo_round1"
    assert (round1 / "02_train" / "best.pt").read_text() == "checkpoint of 02_train (pseudo round 1)"
    assert (round1 / "00_prepare" / "config.resolved.yaml").read_text() == "00_prepare"  # copied, not rerun
    assert len(pd.read_csv(round1 / "pseudo_labels_in.csv")) == 2
    assert ("new_individual threshold of trained: 0.6000: calibrated in 04_submit (mode `calibrate`). "
            "Test ranking (all-data refit model): 0.7000.") in text
    assert "new_individual threshold of trained + pseudo round 1: 0.3000" in text
    # which model ranked each run's test images, from that run's own stage-03 report
    assert ("trained: test ranked by the all-data refit model (`refit best`), validation by the fold model "
            "(`last`)") in text
    assert "trained + pseudo round 1: test and validation ranked by the `best` model." in text


def test_ablation_variant_names_that_clash_stop_before_anything_runs(tmp_path: Path) -> None:
    def args(*custom: str, sizes: tuple[int, ...] = ()) -> argparse.Namespace:
        return argparse.Namespace(variants=["no_tta"], sizes=list(sizes),
                                  custom=[bench_accuracy.custom_variant(c) for c in custom])

    assert [v.name for v in bench_accuracy.ablation_variants(args("mine:train.epochs=3"))] == ["no_tta", "mine"]
    for clash in (args("base:train.epochs=3"), args("no_tta:train.epochs=3"),
                  args("a:train.epochs=3", "a:train.epochs=4"), args("image_size_128:x=1", sizes=(128,))):
        with pytest.raises(bench_accuracy.UserError, match="unique"):
            bench_accuracy.ablation_variants(clash)


def test_ablation_runs_without_the_refit_unless_asked(data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The ablation scores validation only, which the all-data refit cannot change: every stage of
    the base and the variants runs with train.refit=false, and a --set train.refit=true wins."""
    calls: list[list[str]] = []

    answers = data  # the stub's stage 04 reads them; the ablation's view of the data hides them

    def recording_stage(self: bench_accuracy.Runner, name: str, out: Path, view: Path, extra: list[str] = (),
                        label: str = "") -> float:
        calls.append([*self.sets, *extra])
        return fake_stage(self, name, out, answers, extra, label)

    monkeypatch.setattr(bench_accuracy.Runner, "stage", recording_stage)
    monkeypatch.setattr(bench_accuracy, "machine", lambda: "test")
    pd.DataFrame({"image": ["t1.jpg", "t2.jpg", "t3.jpg"], "predictions": ""}).to_csv(
        data / "sample_submission.csv", index=False)

    def run(sets: list[str]) -> str:
        calls.clear()
        args = argparse.Namespace(data=str(data), labels="", profile="cpu", config=[], sets=sets,
                                  out=str(tmp_path / f"out{len(sets)}"), subset_ids=0, test_limit=0,
                                  variants=["fixed_margin"], sizes=[], custom=[], jobs=1)
        return bench_accuracy.ablation(args)

    text = run([])
    assert len(calls) == 5 + 3  # base 00-04, the variant 02-04
    assert all(c[0] == "train.refit=false" for c in calls)
    assert "with `train.refit=false`" in text
    run(["train.refit=true"])  # later --set wins: the user asked for it
    assert all(c[:2] == ["train.refit=false", "train.refit=true"] for c in calls)


def test_bench_embed_loader_alone_runs_stage_03s_chunked_loader(tmp_path: Path) -> None:
    """bench_embed's loader-alone row runs over generated crops with stage 03's chunked loader."""
    import bench_embed
    import torch

    paths = bench_embed.make_crops(tmp_path, 5, 24)
    args = argparse.Namespace(image_size=16, batch_size=2, workers=2)
    assert bench_embed.loader_only(paths, args, torch.device("cpu")) > 0


def test_bench_rerank_times_each_device_and_checks_they_agree(tmp_path: Path, monkeypatch) -> None:
    """bench_rerank on a tiny case: the table is written, the generated views of an individual
    verify far above other individuals, and a device giving other counts fails the run."""
    import bench_rerank
    import numpy as np

    out = tmp_path / "rerank.md"
    argv = ["bench_rerank.py", "--queries", "4", "--individuals", "6", "--candidates", "5", "--photos", "2",
            "--repeats", "1", "--devices", "cpu,cpu:0", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_rerank.main()
    text = out.read_text()
    assert "| cpu | " in text and "| cpu:0 | " in text and "Same inlier counts on every device: yes" in text
    own, other = (int(v) for v in text.split("Median inliers of the true individual ")[1].split(" (")[0]
                  .replace(", of the others", "").split())
    assert own >= 20 and other <= 8, (own, other)

    calls = iter(range(100))
    real = bench_rerank.rerank.candidate_inliers

    def drifting(*args, **kwargs) -> np.ndarray:  # the second device's counts differ by one
        counts = real(*args, **kwargs)
        return counts + (next(calls) % 2 if kwargs.get("desc", "").startswith("verify") else 0)

    monkeypatch.setattr(bench_rerank.rerank, "candidate_inliers", drifting)
    with pytest.raises(SystemExit, match="inlier counts differ between devices"):
        bench_rerank.main()
