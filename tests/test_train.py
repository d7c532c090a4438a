"""Stage 02 end to end on a tiny generated catalogue: artifacts, resume, NaN stop, DDP on gloo
(stage 03 under torchrun too)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from whaleid import embed as embed_module
from whaleid import train
from whaleid.config import load_config
from whaleid.distributed import Runtime
from whaleid.embed import checkpoint_path
from whaleid.embed import run as embed_run
from whaleid.errors import UserError
from whaleid.model import load_checkpoint, read_checkpoint
from whaleid.submit import load_embeddings
from whaleid.train import (
    METRIC_COLUMNS,
    RUN_FILES,
    _epoch_line,
    imprint,
    make_splits,
    prepare_model,
    read_inputs,
    read_pseudo_labels,
    run,
)

ROOT = Path(__file__).resolve().parent.parent
N_IDS, PER_ID, NEW_IDS = 6, 4, 1


def _image(label: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A label-dependent pattern: stripes at a label-specific angle and colour, plus noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    angle = np.pi * label / N_IDS
    stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0) > 0).astype(np.float32)
    colour = np.array([(label * 53) % 255, (label * 97) % 255, (label * 151) % 255], dtype=np.float32)
    img = stripes[..., None] * colour + (1 - stripes[..., None]) * (255 - colour)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tiny_outputs(root: Path) -> Path:
    """catalogue.csv, label_encoders.json and crops.csv (+ crop JPEGs) of stages 00/01 under root."""
    rng = np.random.default_rng(0)
    crop_dir = root / "01_crops" / "fullbody" / "train"
    crop_dir.mkdir(parents=True)
    (root / "00_prepare").mkdir(parents=True)
    ids = [f"id_{i}" for i in range(N_IDS + NEW_IDS)]
    rows = []
    for label, name in enumerate(ids):
        for j in range(PER_ID):
            image = f"{name}_{j}.jpg"
            path = crop_dir / image
            cv2.imwrite(str(path), cv2.cvtColor(_image(label, rng), cv2.COLOR_RGB2BGR))
            new = label >= N_IDS
            rows.append({
                "image": image, "split": "train", "path": str(path), "width": 40, "height": 40,
                "species": "sp_a" if label % 2 else "sp_b", "individual_id": name, "label": label,
                "species_label": 1 - label % 2, "fold": 0 if new or j == 0 else -1, "fold_new": new,
            })
    cat = pd.DataFrame(rows)
    cat.to_csv(root / "00_prepare" / "catalogue.csv", index=False)
    (root / "00_prepare" / "label_encoders.json").write_text(json.dumps({"individual_id": ids, "species": ["sp_a", "sp_b"]}))
    crops = pd.DataFrame({
        "image": cat["image"], "split": "train", "source": "fullbody", "crop_path": cat["path"],
        "x_min": 0.0, "y_min": 0.0, "x_max": 40.0, "y_max": 40.0, "conf": 1.0, "method": "full", "flag": "",
    })
    crops.to_csv(root / "01_crops" / "crops.csv", index=False)
    return root


TINY_SETS = [
    "model.pretrained=none", "model.embedding_size=32", "train.image_size=32", "train.batch_size=8",
    "train.workers=0", "train.epochs=1", "train.warmup_epochs=0", "knn.backend=torch", "loss.k=2",
    "train.refit=false",  # config.yaml's default: tests that want the all-data refit say so
]


def tiny_cfg(out: Path, *extra: str):
    return load_config(sets=[f"paths.outputs={out}", *TINY_SETS, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 1-epoch run (with a pseudo-labelled test image) shared by the tests below."""
    root = tmp_path_factory.mktemp("trained")
    outputs = make_tiny_outputs(root / "outputs")
    crops = pd.read_csv(outputs / "01_crops" / "crops.csv")
    test_crop = crops.iloc[[1]].assign(image="t0.jpg", split="test")
    pd.concat([crops, test_crop]).to_csv(outputs / "01_crops" / "crops.csv", index=False)
    pseudo = root / "pseudo.csv"
    pd.DataFrame({"image": ["t0.jpg", "t0.jpg", "t1.jpg"], "individual_id": ["id_0", "id_0", "nobody"],
                  "confidence": [0.9, 0.9, 0.95]}).to_csv(pseudo, index=False)
    run(tiny_cfg(outputs, f"train.pseudo_labels={pseudo}", "train.refit=true"))
    return outputs


def _copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "outputs"))


def test_run_writes_contract_artifacts(trained: Path) -> None:
    folder = trained / "02_train"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.resolved.yaml", "report.json"):
        assert (folder / name).exists(), name
    metrics = pd.read_csv(folder / "metrics.csv")
    assert tuple(metrics.columns) == METRIC_COLUMNS
    assert metrics["epoch"].tolist() == [1]
    assert 0.0 <= metrics["map5"].iloc[0] <= 1.0
    model, heads, ckpt = load_checkpoint(folder / "best.pt")
    assert ckpt["fold"] == 0 and ckpt["epoch"] == 1
    assert len(ckpt["class_counts"]) == N_IDS + NEW_IDS
    assert ckpt["class_counts"][N_IDS] == 0, "the validation-only individual has no training image"
    assert ckpt["class_counts"][0] == PER_ID - 1 + 1, "3 training images + 1 pseudo-labelled one"
    assert heads.individual.n_classes == N_IDS + NEW_IDS


def test_pseudo_labels_join_training(trained: Path) -> None:
    report = json.loads((trained / "02_train" / "report.json").read_text())
    assert report["pseudo_labels"]["used"] == 1
    assert report["pseudo_labels"]["unknown_ids"] == 1
    assert report["train_samples"] == N_IDS * (PER_ID - 1) + 1
    assert report["val_queries"] == N_IDS + PER_ID * NEW_IDS and report["val_new"] == PER_ID * NEW_IDS


def test_pseudo_labels_skipped_rows_are_printed_and_a_file_with_none_usable_stops(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    catalogue = pd.DataFrame({"image": ["a.jpg"], "split": ["train"], "label": [0], "species_label": [1]})
    crops = pd.DataFrame({"image": ["t0.jpg", "t1.jpg"], "split": ["test", "test"]})
    pseudo = tmp_path / "pseudo.csv"
    pd.DataFrame({"image": ["t0.jpg", "t1.jpg", "t9.jpg"], "individual_id": ["id_0", "stranger", "id_0"],
                  "confidence": 0.9}).to_csv(pseudo, index=False)
    cfg = tiny_cfg(tmp_path, f"train.pseudo_labels={pseudo}")
    rows, stats = read_pseudo_labels(cfg, catalogue, crops, ["id_0"])
    assert rows[["image", "label", "species_label"]].values.tolist() == [["t0.jpg", 0, 1]]
    out = capsys.readouterr().out
    assert "1 of 3 rows" in out and "['stranger']" in out and "['t9.jpg']" in out
    pd.DataFrame({"image": ["t9.jpg"], "individual_id": ["stranger"], "confidence": 0.9}).to_csv(pseudo, index=False)
    with pytest.raises(UserError, match="none of its 1 rows is usable"):
        read_pseudo_labels(cfg, catalogue, crops, ["id_0"])


def test_pseudo_labels_with_numeric_looking_ids_match_the_label_encoder(tmp_path: Path) -> None:
    catalogue = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "split": "train", "label": [0, 1], "species_label": [1, 0]})
    crops = pd.DataFrame({"image": ["0001.jpg", "0002.jpg"], "split": ["test", "test"]})
    pseudo = tmp_path / "pseudo.csv"
    pd.DataFrame({"image": ["0001.jpg", "0002.jpg"], "individual_id": ["0012", "0007"],
                  "confidence": 0.9}).to_csv(pseudo, index=False)
    rows, stats = read_pseudo_labels(tiny_cfg(tmp_path, f"train.pseudo_labels={pseudo}"), catalogue, crops, ["0012", "0007"])
    assert rows[["image", "label", "species_label"]].values.tolist() == [["0001.jpg", 0, 1], ["0002.jpg", 1, 0]]
    assert stats["unknown_ids"] == 0


def test_resume_continues_epoch_count(trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    assert json.loads((outputs / "02_train" / "report.json").read_text())["resumed_from_epoch"] == 0
    folder = run(tiny_cfg(outputs, "train.epochs=2", f"train.pseudo_labels={trained.parent / 'pseudo.csv'}"), resume=True)
    metrics = pd.read_csv(folder / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    _, _, ckpt = load_checkpoint(folder / "last.pt")
    assert ckpt["epoch"] == 2
    assert json.loads((folder / "report.json").read_text())["resumed_from_epoch"] == 1


def test_refit_trains_the_same_recipe_on_every_train_image(trained: Path) -> None:
    fold, refit = trained / "02_train", trained / "02_train" / "refit"
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png", "config.resolved.yaml", "report.json"):
        assert (refit / name).exists(), name
    report = json.loads((refit / "report.json").read_text())
    assert report["fold"] == -1 and report["val_queries"] == 0
    # every train image (the validation fold included) plus the pseudo-labelled test image
    assert report["train_samples"] == (N_IDS + NEW_IDS) * PER_ID + 1
    _, _, ckpt = load_checkpoint(refit / "best.pt")
    assert ckpt["fold"] == -1 and ckpt["class_counts"][N_IDS] == PER_ID, "the fold-only individual now trains"
    assert ckpt["config"]["train"] == load_checkpoint(fold / "best.pt")[2]["config"]["train"], "same recipe"
    assert not np.isnan(json.loads((fold / "report.json").read_text())["threshold"]), "the fold run still validates"


def test_resume_continues_both_runs_and_refit_off_drops_a_stale_refit(trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    pseudo = f"train.pseudo_labels={trained.parent / 'pseudo.csv'}"
    folder = run(tiny_cfg(outputs, "train.epochs=2", pseudo, "train.refit=true"), resume=True)
    for sub in (folder, folder / "refit"):
        assert pd.read_csv(sub / "metrics.csv")["epoch"].tolist() == [1, 2]
        assert json.loads((sub / "report.json").read_text())["resumed_from_epoch"] == 1
    run(tiny_cfg(outputs, "train.refit=false", pseudo))
    assert not (folder / "refit").exists(), "a refit model of another run would be embedded by stage 03"
    (folder / "refit").mkdir()
    (folder / "refit" / "best.pt").write_bytes(b"an earlier run's refit model")
    with pytest.raises(UserError, match="NaN"):  # a fresh run that fails in its fold part
        run(tiny_cfg(outputs, "train.refit=true", "loss.s=.nan", pseudo))
    assert not (folder / "refit").exists(), "stage 03 would pair the earlier refit model with the new fold model"
    run(tiny_cfg(outputs, "train.refit=true", pseudo))
    assert (folder / "refit" / "best.pt").exists()
    run(tiny_cfg(outputs, "prepare.fold=-1", "train.refit=true", pseudo))  # no fold: the model already trains on everything
    assert not (folder / "refit").exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(trained: Path, tmp_path: Path) -> None:
    outputs = _copy(trained, tmp_path)
    before = (outputs / "02_train" / "last.pt").read_bytes()
    with pytest.raises(UserError, match="NaN"):
        run(tiny_cfg(outputs, "train.epochs=2", "loss.s=.nan"), resume=True)
    assert (outputs / "02_train" / "last.pt").read_bytes() == before


class Killed(Exception):
    """Stands for a SIGKILL of stage 02 at a chosen point."""


def _check_best_pt_holds_what_last_pt_records(folder: Path) -> None:
    """The best epoch that last.pt records (and --resume trusts) is in best.pt, or best.pt holds
    the epoch after last.pt's, written just before a kill, which the resumed run redoes."""
    last = read_checkpoint(folder / "last.pt") if (folder / "last.pt").exists() else None
    if last is None or not math.isfinite(last["best_metric"]):  # no epoch validated yet
        return
    assert (folder / "best.pt").exists(), f"last.pt (epoch {last['epoch']}) records a best epoch; best.pt is missing"
    best = read_checkpoint(folder / "best.pt")
    if best["epoch"] <= last["epoch"]:
        assert best["best_metric"] == last["best_metric"], (best["epoch"], last["epoch"])
    else:
        assert best["epoch"] == last["epoch"] + 1 and best["best_metric"] > last["best_metric"]


@pytest.mark.parametrize("kill_after", [1, 2, 3])  # checkpoint files written first (epoch 1 writes 2, epoch 2 1 or 2)
def test_a_kill_between_checkpoint_writes_leaves_best_pt_matching_last_pt(
        kill_after: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = make_tiny_outputs(tmp_path / "outputs")
    real_save, written = train.torch_save, []

    def save(path: Path, obj: dict) -> None:
        if len(written) == kill_after:
            raise Killed(f"killed before writing {Path(path).name}")
        real_save(path, obj)
        written.append(Path(path).name)

    monkeypatch.setattr(train, "torch_save", save)
    try:
        run(tiny_cfg(outputs, "train.epochs=2", "train.val_every=1"))
    except Killed:
        pass
    _check_best_pt_holds_what_last_pt_records(outputs / "02_train")


def test_a_fresh_run_first_removes_the_earlier_runs_checkpoints_and_report(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = _copy(trained, tmp_path)
    folder = outputs / "02_train"

    def killed(*args: object) -> None:
        raise Killed("killed in the first epoch")

    monkeypatch.setattr(train, "train_epoch", killed)
    with pytest.raises(Killed):
        run(tiny_cfg(outputs, "train.epochs=2"), resume=True)
    assert all((folder / name).exists() for name in RUN_FILES if name != "report.json"), "--resume keeps the run"
    # but not its report.json: until the resumed run ends, its checkpoints are not a finished run's
    assert not (folder / "report.json").exists()
    with pytest.raises(UserError, match="did not finish"):
        checkpoint_path(tiny_cfg(outputs))
    with pytest.raises(Killed):
        run(tiny_cfg(outputs))
    assert not [name for name in RUN_FILES if (folder / name).exists()]
    # so stage 03 stops, naming stage 02, instead of embedding with the earlier run's model
    with pytest.raises(UserError, match="02_train_arcface.py"):
        checkpoint_path(tiny_cfg(outputs))


def test_stage_04_refuses_the_mix_of_files_a_killed_stage_03_leaves(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = _copy(trained, tmp_path)
    folder = outputs / "03_embed"
    cfg = tiny_cfg(outputs, "embed.workers=0")
    embed_run(cfg)
    assert len(load_embeddings(folder).train) > 0  # a finished run's files read
    real_write = embed_module.write_npy

    def write(path: Path, array: np.ndarray) -> None:
        if Path(path).name == "test_emb.npy":
            raise Killed("killed before writing test_emb.npy")
        real_write(path, array)

    # a rerun with another TTA, killed after writing the new gallery but before the test embeddings
    monkeypatch.setattr(embed_module, "write_npy", write)
    with pytest.raises(Killed):
        embed_run(tiny_cfg(outputs, "embed.workers=0", "embed.flip_tta=none"))
    monkeypatch.undo()
    with pytest.raises(UserError, match="did not finish"):
        load_embeddings(folder)
    embed_run(cfg)  # the rerun makes the folder whole again
    emb = np.load(folder / "train_emb.npy")
    np.save(folder / "train_emb.npy", -emb)  # changed after the run
    with pytest.raises(UserError, match="train_emb.npy is not the file"):
        load_embeddings(folder)
    np.save(folder / "train_emb.npy", emb)
    load_embeddings(folder)
    shutil.copy(folder / "train_emb.npy", folder / "fold_train_emb.npy")  # a file this run did not write
    with pytest.raises(UserError, match="fold_train_emb.npy was not written"):
        load_embeddings(folder)


def test_an_epoch_draws_the_same_batches_resumed_or_not_and_whatever_the_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = make_tiny_outputs(tmp_path / "outputs")
    seen: dict[int, list] = {}

    def record(cfg, net, loader, optimizer, scheduler, rt, epoch: int) -> tuple[float, float]:
        seen[epoch] = [(batch[0].clone(), batch[3].clone()) for batch in loader]  # augmented images, indices
        return 1.0, 1.0

    def epochs(*sets: str, resume: bool = False) -> dict[int, list]:
        seen.clear()
        run(tiny_cfg(outputs, "prepare.fold=-1", *sets), resume=resume)  # no fold: nothing to validate
        return dict(seen)

    def same(a: list, b: list) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))

    monkeypatch.setattr(train, "train_epoch", record)
    straight = epochs("train.epochs=2", "train.workers=2")
    first = epochs("train.epochs=1", "train.workers=2")
    resumed = epochs("train.epochs=2", "train.workers=2", resume=True)
    in_process = epochs("train.epochs=2", "train.workers=0")
    assert list(resumed) == [2]
    assert same(first[1], straight[1]) and same(resumed[2], straight[2]), "a resumed run draws other batches"
    assert same(in_process[1], straight[1]) and same(in_process[2], straight[2]), "the worker count changes the batches"
    assert not same(straight[1], straight[2]), "each epoch draws its own order and augmentations"


def _head_accuracy(model, heads, splits, size: int) -> float:
    """Share of training crops whose nearest individual centre (eval mode) is their own individual."""
    from whaleid.dataset import CropDataset, eval_transform

    data = CropDataset(splits.train["crop_path"], transform=eval_transform(size))
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        cos = heads.individual.cosine(model.eval()(x))
    return float((cos.argmax(1).numpy() == splits.train["label"].to_numpy()).mean())


def test_imprint_starts_each_centre_at_its_class_mean(tmp_path: Path) -> None:
    # train.amp=false: the known answer below is computed in float32 (amp would use bf16 on CPUs that have it)
    cfg = tiny_cfg(make_tiny_outputs(tmp_path / "outputs"), "train.imprint=true", "loss.k=1", "train.amp=false")
    catalogue, crops, encoders = read_inputs(cfg)
    splits = make_splits(cfg, catalogue, crops, encoders)
    rt = Runtime(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model, heads, _ = prepare_model(cfg, rt, splits, encoders)
    random_start = heads.individual.weight.detach().clone()
    assert _head_accuracy(model, heads, splits, 32) < 0.5, "random centres classify at chance"
    counts = imprint(cfg, model, heads, splits, rt)
    assert counts == {"individuals": N_IDS, "species": 2}
    assert _head_accuracy(model, heads, splits, 32) == 1.0, "every crop is nearest its own class mean"
    after = heads.individual.weight.detach()
    assert torch.equal(after[N_IDS], random_start[N_IDS]), "the validation-only individual keeps its random centre"
    # known answer: each centre is the mean direction of its crops' standardised embeddings
    from whaleid.dataset import CropDataset, eval_transform

    data = CropDataset(splits.train["crop_path"], transform=eval_transform(32))
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        z = model.neck[1](model.eval().pooled(x))
    assert torch.allclose(model.neck[2].running_mean, z.mean(0), atol=1e-4)
    assert torch.allclose(model.neck[2].running_var, z.var(0, unbiased=False), atol=1e-4)
    emb = torch.nn.functional.normalize(model.neck[2](z), dim=1)  # eval-mode BatchNorm = the standardisation
    labels = torch.as_tensor(np.array(splits.train["label"], dtype=np.int64))
    for c in range(N_IDS):
        mean = torch.nn.functional.normalize(emb[labels == c].mean(0), dim=0)
        assert torch.allclose(torch.nn.functional.normalize(after[c], dim=0), mean, atol=1e-4), c


def test_imprint_parts_sub_centres_and_runs_on_fresh_starts_only(tmp_path: Path) -> None:
    outputs = make_tiny_outputs(tmp_path / "outputs")
    cfg = tiny_cfg(outputs, "train.imprint=true")  # loss.k=2
    catalogue, crops, encoders = read_inputs(cfg)
    splits = make_splits(cfg, catalogue, crops, encoders)
    rt = Runtime(0, 1, torch.device("cpu"))
    model, heads, _ = prepare_model(cfg, rt, splits, encoders)
    imprint(cfg, model, heads, splits, rt)
    w = torch.nn.functional.normalize(heads.individual.weight.detach().view(N_IDS + NEW_IDS, 2, -1), dim=2)
    cos = (w[:N_IDS, 0] * w[:N_IDS, 1]).sum(1)
    assert (cos > 0.9).all() and (cos < 0.9999).all(), "sub-centres start near the class mean, not equal"
    folder = run(tiny_cfg(outputs, "train.imprint=true", "train.refit=true"))
    assert json.loads((folder / "report.json").read_text())["imprinted"] == {"individuals": N_IDS, "species": 2}
    refit = json.loads((folder / "refit" / "report.json").read_text())["imprinted"]
    assert refit == {"individuals": N_IDS + NEW_IDS, "species": 2}, "the refit imprints every individual"
    folder = run(tiny_cfg(outputs, "train.imprint=true", "train.epochs=2"), resume=True)
    assert json.loads((folder / "report.json").read_text())["imprinted"] is None, "resume keeps the trained heads"
    assert json.loads((run(tiny_cfg(outputs)) / "report.json").read_text())["imprinted"] is None


def test_missing_inputs_name_the_stage(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="00_prepare_data.py"):
        run(tiny_cfg(tmp_path / "nothing"))


def _imprinted(cfg, rt: Runtime) -> dict:
    """Imprint a freshly seeded model; the individual centres and the neck's running mean."""
    catalogue, crops, encoders = read_inputs(cfg)
    splits = make_splits(cfg, catalogue, crops, encoders)
    torch.manual_seed(0)
    model, heads, _ = prepare_model(cfg, rt, splits, encoders)
    imprint(cfg, model, heads, splits, rt)
    return {"centres": heads.individual.weight.detach().cpu(), "running_mean": model.neck[2].running_mean.cpu()}


IMPRINT_SCRIPT = f"""
import sys
import torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_train import _imprinted, tiny_cfg
from whaleid.distributed import init_runtime
cfg = tiny_cfg(sys.argv[1], "device=cpu", "train.amp=false")
rt = init_runtime(cfg)
result = _imprinted(cfg, rt)
if rt.main:
    torch.save(result, sys.argv[2])
torch.distributed.destroy_process_group()
"""


def test_a_kill_during_the_refit_leaves_stage_02_unfinished_and_resume_finishes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """02_train/report.json (the Makefile's target, and what stage 03 takes for a finished stage 02)
    is written only after the refit: a kill during the refit leaves none, so `make` trains again
    and stage 03 names --resume; --resume keeps the fold run and trains the refit."""
    outputs = make_tiny_outputs(tmp_path / "outputs")
    cfg = tiny_cfg(outputs, "train.refit=true", "train.epochs=2")
    run_one = train._run

    def killed_in_refit(run_cfg, resume, rt, out):
        if out.name == train.REFIT_DIR:
            raise KeyboardInterrupt  # as Ctrl-C or a kill before the refit's first epoch ends
        return run_one(run_cfg, resume, rt, out)

    monkeypatch.setattr(train, "_run", killed_in_refit)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    folder = outputs / "02_train"
    assert (folder / "last.pt").is_file() and not (folder / "report.json").exists()
    for refit in (True, False):  # neither model is taken for finished
        with pytest.raises(UserError, match="--resume"):
            checkpoint_path(tiny_cfg(outputs, f"train.refit={str(refit).lower()}"), refit=refit)
    fold_model = (folder / "last.pt").read_bytes()
    monkeypatch.setattr(train, "_run", run_one)
    train.run(cfg, resume=True)
    assert (folder / "last.pt").read_bytes() == fold_model, "--resume retrained the finished fold run"
    assert json.loads((folder / "report.json").read_text())["resumed_from_epoch"] == 2
    assert json.loads((folder / "refit" / "report.json").read_text())["fold"] == -1
    assert checkpoint_path(cfg, refit=True) == folder / "refit" / "best.pt"


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path: Path) -> None:
    outputs = make_tiny_outputs(tmp_path / "outputs")
    # train.amp=false: float32 validation passes, so one process can repeat them to the last digits
    sets = [f"paths.outputs={outputs}", *TINY_SETS, "device=cpu", "train.batch_size=4", "train.refit=true",
            "train.amp=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "02_train_arcface.py")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # imprinting in the process group: each rank embeds a shard, the gathered centres equal one process's
    script = tmp_path / "imprint_ddp.py"
    script.write_text(IMPRINT_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
           str(script), str(outputs), str(tmp_path / "ddp_centres.pt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp_centres.pt")
    single = _imprinted(tiny_cfg(outputs, "device=cpu", "train.amp=false"), Runtime(0, 1, torch.device("cpu")))
    assert torch.allclose(ddp["centres"], single["centres"], atol=1e-4)
    assert torch.allclose(ddp["running_mean"], single["running_mean"], atol=1e-4)
    metrics = pd.read_csv(outputs / "02_train" / "metrics.csv")
    assert metrics["epoch"].tolist() == [1]
    report = json.loads((outputs / "02_train" / "report.json").read_text())
    assert report["world_size"] == 2
    # Validation in the group embedded each rank's shard with rank 0's BatchNorm statistics, so
    # validating the saved model in one process gives the same figures (each rank's own statistics,
    # updated by its last batch, had moved the threshold).
    cfg = load_config(sets=sets)
    model, _, _ = load_checkpoint(outputs / "02_train" / "best.pt")
    catalogue, crops, encoders = train.read_inputs(cfg)
    alone = train.validate(cfg, model, train.make_splits(cfg, catalogue, crops, encoders), Runtime(0, 1, torch.device("cpu")))
    assert alone["threshold"] == pytest.approx(metrics["threshold"].iloc[-1], abs=1e-5)
    assert alone["map5"] == pytest.approx(metrics["map5"].iloc[-1], abs=1e-9)
    refit = json.loads((outputs / "02_train" / "refit" / "report.json").read_text())  # the refit in the same group
    assert refit["world_size"] == 2 and refit["fold"] == -1 and refit["train_samples"] == (N_IDS + NEW_IDS) * PER_ID
    # stage 03 in a group of 3 (shards of 10, 9 and 9 crops): rank 0 gathers the same files as one process
    embed = outputs / "03_embed"
    # float32 (embed.amp=false): bf16 kernels may round differently for the shards' batch sizes
    sets03 = [f"paths.outputs={outputs}", *TINY_SETS, "device=cpu", "train.refit=true", "embed.workers=0", "embed.amp=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_port=29535",
           str(ROOT / "03_embed.py")]
    for s in sets03:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((embed / "report.json").read_text())["world_size"] == 3
    files = ["train_emb.npy", "train_index.csv", "fold_train_emb.npy", "fold_train_index.csv"]
    ddp_files = {name: (embed / name).read_bytes() for name in files}
    embed_run(load_config(sets=sets03))
    assert json.loads((embed / "report.json").read_text())["world_size"] == 1
    for name in files:
        if name.endswith(".csv"):
            assert (embed / name).read_bytes() == ddp_files[name], name
        else:
            single, ddp_emb = np.load(embed / name), np.load(io.BytesIO(ddp_files[name]))
            assert single.shape == ddp_emb.shape == ((N_IDS + NEW_IDS) * PER_ID, 32), name
            np.testing.assert_allclose(ddp_emb, single, atol=1e-5, err_msg=name)
    # the refit model embeds the gallery, the fold model the validation copy: not the same vectors
    assert not np.allclose(np.load(embed / "train_emb.npy"), np.load(embed / "fold_train_emb.npy"), atol=1e-3)


def test_epoch_line_shows_validation_only_where_it_ran() -> None:
    row = {"epoch": 3, "train_loss": 1.5, "map5": float("nan"), "map5_known": float("nan"), "map5_new": float("nan"),
           "threshold": float("nan"), "images_per_s": 20.0, "seconds": 12.0}
    assert _epoch_line(row) == "epoch 3: loss 1.5000  20.0 img/s  12 s"
    row.update(map5=0.8, map5_known=0.75, map5_new=1.0, threshold=0.6)
    assert "MAP@5 0.8000 (known 0.7500, new 1.0000, threshold 0.600)" in _epoch_line(row)


def test_validation_searches_on_the_cpu_under_device_cpu(tmp_path: Path, monkeypatch) -> None:
    """With `device: cpu` and `knn.backend: auto`, stage 02's validation kNN stays off any GPU."""
    from tests.test_knn import record_backends

    seen = record_backends(monkeypatch, "evaluate_fold")
    outputs = make_tiny_outputs(tmp_path / "outputs")
    run(tiny_cfg(outputs, "knn.backend=auto", "device=cpu"))
    assert seen and set(seen) == {"faiss_cpu"}
