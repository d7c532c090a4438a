"""Stage 02: train the ArcFace embedding model on the crops, on the CPU, one GPU or torchrun DDP.

Recipe of the Happywhale 1st-place solution, scaled to the config: every crop source's crop is a
training sample, sub-centre ArcFace with dynamic margins plus a species head, AdamW with the
heads learning `lr_head_mult` times faster, linear warmup then cosine decay per optimiser step.
Each `val_every` epochs the fold's validation crops are ranked against the train part by kNN
(`knn.evaluate_fold`), which calibrates the new_individual threshold and gives MAP@5. With
`train.imprint` the class centres start at the mean embedding of their images (`imprint`).

With `train.refit` (and a validation fold), a second model is then trained with the same recipe
on every train image, the fold included, into `02_train/refit/` (the Kaggle "train on all data
after validating" step): stage 03 embeds the gallery and the test images with it, and embeds the
train images with the fold model too, so that stage 04 still calibrates on a fold the embeddings
never trained on.

Under `torchrun --nproc_per_node=N` each process trains on its DistributedSampler shard; the
validation embeddings are sharded and gathered, metrics are computed on rank 0 and broadcast,
and only rank 0 writes files.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from whaleid import knn
from whaleid.config import Config, config_from_dict, deep_merge
from whaleid.dataset import CropDataset, eval_transform, train_transform
from whaleid.distributed import Runtime, all_reduce, embed_sharded, init_runtime, sync_buffers
from whaleid.errors import UserError
from whaleid.io import (
    STAGE_DIRS,
    check_fresh,
    fingerprint_config,
    fingerprint_files,
    read_json,
    require,
    stage_dir,
    stage_inputs_record,
    torch_save,
    write_csv,
    write_json,
    write_resolved_config,
)
from whaleid.losses import build_heads
from whaleid.model import EmbeddingModel, build_model, read_checkpoint

CATALOGUE_COLUMNS = ("image", "split", "species", "individual_id", "label", "species_label", "fold", "fold_new")
CROPS_COLUMNS = ("image", "split", "source", "crop_path")
PSEUDO_COLUMNS = ("image", "individual_id", "confidence")
# Read as text whatever they look like: ids such as "0012" would otherwise become the integer 12.
TEXT_COLUMNS = ("image", "split", "species", "individual_id", "source", "crop_path")
METRIC_COLUMNS = (
    "epoch", "train_loss", "lr", "map5", "map5_known", "map5_new", "threshold", "images_per_s", "seconds",
)

NO_VALIDATION = {"map5": math.nan, "map5_known": math.nan, "map5_new": math.nan, "threshold": math.nan}


def check_train_config(cfg: Config) -> None:
    """Counts that must be positive, checked before any work."""
    for key in ("epochs", "batch_size", "accum_steps", "val_every", "image_size"):
        if cfg.train[key] < 1:
            raise UserError(f"train.{key} must be >= 1, got {cfg.train[key]}")
    if cfg.train.warmup_epochs < 0:
        raise UserError(f"train.warmup_epochs must be >= 0, got {cfg.train.warmup_epochs}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mix(*keys: int) -> int:
    """A 32-bit seed from several integers (NumPy's SeedSequence: nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1)[0])


class EpochSampler(Sampler[tuple[int, int]]):
    """Each epoch's training order, and a seed for each sample's augmentations, from (seed, epoch) alone.

    Yields (index, sample seed) pairs for `SeededCrops`. The order is a permutation drawn from
    (seed, epoch) (under DDP, the DistributedSampler's own (seed, epoch) shard), and a sample's
    augmentations from (seed, epoch, index), whichever process loads it. So an epoch draws the same
    batches and the same augmented images whatever `train.workers` is and whether or not the run
    was resumed before it. Reseeding the loader's generator and the transform per epoch did not do
    that: the loader draws its workers' base seed from that generator only on a process's first
    epoch, and persistent workers keep the transform they were seeded with at their start.
    """

    def __init__(self, n: int, seed: int, shard: DistributedSampler | None = None) -> None:
        self.n, self.seed, self.shard, self.epoch = n, seed, shard, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.shard is not None:
            self.shard.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.shard) if self.shard is not None else self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shard is not None:
            order = list(self.shard)
        else:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch))).tolist()
        for index in order:
            yield index, _mix(self.seed, self.epoch, index)


class SeededCrops(Dataset):
    """Training crops addressed by `EpochSampler`'s (index, seed) pairs: the transform is reseeded
    for each sample (0.1 ms on the CPU, against 2 ms for the default augmentations of a 160 px crop)."""

    def __init__(self, crops: CropDataset) -> None:
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        index, seed = item
        if self.crops.transform is not None:
            self.crops.transform.set_random_seed(seed)
        return self.crops[index]


def _seed_worker(worker_id: int) -> None:
    """Seed each loader worker's global NumPy and Python streams (torch's per-worker seed), for any
    code that draws from them; the augmentations have their own per-sample seed (`SeededCrops`)."""
    seed = torch.utils.data.get_worker_info().seed % 2**32
    random.seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------- inputs

def _read_csv(path: Path, columns: tuple[str, ...], made_by: str) -> pd.DataFrame:
    """A CSV with its required columns checked (`TEXT_COLUMNS` read as text); missing file -> which stage to run."""
    df = pd.read_csv(require(path, made_by), keep_default_na=False, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    lacking = [c for c in columns if c not in df.columns]
    if lacking:
        raise UserError(f"{path} lacks columns {lacking}; rerun {made_by}")
    return df


def _as_bool(series: pd.Series) -> np.ndarray:
    return series.astype(str).str.lower().isin(["true", "1"]).to_numpy()


def read_inputs(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The catalogue, the crops list and the label encoders of stages 00 and 01."""
    out = Path(cfg.paths.outputs)
    catalogue = _read_csv(out / "00_prepare" / "catalogue.csv", CATALOGUE_COLUMNS, "00_prepare_data.py")
    crops = _read_csv(out / "01_crops" / "crops.csv", CROPS_COLUMNS, "01_detect_crop.py")
    encoders = read_json(require(out / "00_prepare" / "label_encoders.json", "00_prepare_data.py"))
    catalogue["fold_new"] = _as_bool(catalogue["fold_new"])
    unknown = sorted(set(cfg.crop.sources) - set(crops["source"]))
    if unknown:
        raise UserError(f"crop sources {unknown} of crop.sources are not in crops.csv; rerun 01_detect_crop.py")
    return catalogue, crops, encoders


def _attach_crops(rows: pd.DataFrame, crops: pd.DataFrame, sources: list[str], split: str) -> pd.DataFrame:
    """One row per (image, source) with its crop path; an image lacking a crop is an error."""
    sel = crops[(crops["split"] == split) & crops["source"].isin(sources)][["image", "source", "crop_path"]]
    merged = rows.merge(sel, on="image", how="left")
    lacking = merged[merged["crop_path"].isna() | (merged["crop_path"] == "")]
    if len(lacking):
        raise UserError(
            f"{len(lacking)} {split} images have no crop in crops.csv (first: {lacking['image'].iloc[0]}); "
            "rerun 01_detect_crop.py"
        )
    return merged


def read_pseudo_labels(cfg: Config, catalogue: pd.DataFrame, crops: pd.DataFrame, ids: list[str]) -> tuple[pd.DataFrame, dict]:
    """Test images with a confident stage-04 id, as extra training rows (label, species_label).

    Ids absent from the label encoder and images absent from the test crops are counted and skipped.
    """
    path = cfg.train.pseudo_labels
    if not path:
        empty = {"image": pd.Series(dtype=str), "label": pd.Series(dtype=int), "species_label": pd.Series(dtype=int)}
        return pd.DataFrame(empty), {}
    pseudo = _read_csv(Path(path), PSEUDO_COLUMNS, "04_knn_submit.py (it writes pseudo_labels.csv)")
    code = {name: i for i, name in enumerate(ids)}
    known = pseudo["individual_id"].isin(code)
    test_images = set(crops.loc[crops["split"] == "test", "image"])
    present = pseudo["image"].isin(test_images)
    kept = pseudo[known & present].drop_duplicates("image")
    train = catalogue[catalogue["split"] == "train"]
    species_of = train.groupby("label")["species_label"].agg(lambda s: int(s.mode().iloc[0]))
    labels = kept["individual_id"].map(code).astype(int)
    rows = pd.DataFrame({
        "image": kept["image"].to_numpy(),
        "label": labels.to_numpy(),
        "species_label": labels.map(species_of).fillna(-1).astype(int).to_numpy(),
    })
    stats = {
        "rows": int(len(pseudo)), "used": int(len(rows)),
        "unknown_ids": int((~known).sum()), "unknown_ids_first": pseudo.loc[~known, "individual_id"].head(5).tolist(),
        "images_without_crop": int((known & ~present).sum()),
        "images_without_crop_first": pseudo.loc[known & ~present, "image"].head(5).tolist(),
    }
    skipped = (f"{stats['unknown_ids']} with an id not in train (first: {stats['unknown_ids_first']}), "
               f"{stats['images_without_crop']} with an image not among the test crops "
               f"(first: {stats['images_without_crop_first']})")
    if len(pseudo) and not len(rows):
        raise UserError(f"train.pseudo_labels {path}: none of its {len(pseudo)} rows is usable: {skipped}; "
                        "is it from another dataset or run?")
    print(f"pseudo-labels: {len(rows)} of {len(pseudo)} rows of {path} used; skipped: {skipped}")
    return rows, stats


@dataclass
class Splits:
    """Training samples (one per crop), the validation gallery and queries, and class counts."""

    train: pd.DataFrame
    gallery: pd.DataFrame
    queries: pd.DataFrame
    class_counts: list[int]
    species_counts: list[int]
    pseudo: dict


def make_splits(cfg: Config, catalogue: pd.DataFrame, crops: pd.DataFrame, encoders: dict) -> Splits:
    """Train on rows outside `prepare.fold` (all with fold -1), validate on the fold's first-source crops.

    Truth of a validation query is its label, or NEW_LABEL where `fold_new` (its individual has
    no training image), which is what the competition scores as new_individual.
    """
    fold = cfg.prepare.fold
    sources = list(cfg.crop.sources)
    labelled = catalogue[catalogue["split"] == "train"]
    in_val = (labelled["fold"] == fold) if fold != -1 else np.zeros(len(labelled), dtype=bool)
    train_rows, val_rows = labelled[~in_val], labelled[in_val]
    if fold != -1 and val_rows.empty:
        raise UserError(f"prepare.fold={fold} has no validation rows in catalogue.csv; pick another fold or -1")
    if len(train_rows) < 2:
        raise UserError(f"only {len(train_rows)} training images outside fold {fold}; need at least 2")
    pseudo_rows, pseudo_stats = read_pseudo_labels(cfg, catalogue, crops, encoders["individual_id"])
    train = pd.concat([
        _attach_crops(train_rows[["image", "label", "species_label"]], crops, sources, "train"),
        _attach_crops(pseudo_rows, crops, sources, "test"),
    ], ignore_index=True)
    gallery = _attach_crops(train_rows[["image", "label", "species_label"]], crops, sources[:1], "train")
    queries = _attach_crops(val_rows[["image", "label", "species_label", "fold_new"]], crops, sources[:1], "train")
    queries["truth"] = np.where(queries["fold_new"].astype(bool), knn.NEW_LABEL, queries["label"])
    images = pd.concat([train_rows[["label", "species_label"]], pseudo_rows[["label", "species_label"]]])
    n_ids, n_species = len(encoders["individual_id"]), len(encoders["species"])
    return Splits(
        train=train, gallery=gallery, queries=queries,
        class_counts=np.bincount(images["label"], minlength=n_ids).tolist(),
        species_counts=np.bincount(images["species_label"][images["species_label"] >= 0], minlength=max(n_species, 1)).tolist(),
        pseudo=pseudo_stats,
    )


# ---------------------------------------------------------------- model, optimiser, schedule

class TrainNet(nn.Module):
    """Model and heads in one module, so DDP and torch.compile see the whole training graph."""

    def __init__(self, model: EmbeddingModel, heads: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.heads = heads

    def forward(self, x: torch.Tensor, labels: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        loss, _ = self.heads(self.model(x), labels, species)
        return loss


def make_optimizer(cfg: Config, model: nn.Module, heads: nn.Module) -> torch.optim.AdamW:
    """AdamW; the heads start from random centres so they learn `lr_head_mult` x faster (1st place)."""
    t = cfg.train
    return torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": t.lr_backbone},
            {"params": [p for p in heads.parameters() if p.requires_grad], "lr": t.lr_backbone * t.lr_head_mult},
        ],
        weight_decay=t.weight_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr over `warmup_steps`, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loader(cfg: Config, dataset: CropDataset, rt: Runtime) -> tuple[DataLoader, EpochSampler]:
    """Shuffled, drop-last batches (BatchNorm needs > 1 sample), a DistributedSampler shard under
    DDP; call the sampler's `set_epoch` before each epoch."""
    t = cfg.train
    per_rank = len(dataset) // rt.world
    batch = min(t.batch_size, per_rank)
    if batch < 2:
        raise UserError(f"{len(dataset)} training crops over {rt.world} processes is too few for a batch of 2")
    shard = DistributedSampler(dataset, rt.world, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True) if rt.world > 1 else None
    sampler = EpochSampler(len(dataset), cfg.seed, shard)
    cuda = rt.device.type == "cuda"
    loader = DataLoader(
        SeededCrops(dataset), batch_size=batch, sampler=sampler, drop_last=True,
        num_workers=t.workers, pin_memory=cuda, persistent_workers=t.workers > 0,
        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(cfg.seed + rt.rank),
    )
    return loader, sampler


# ---------------------------------------------------------------- one epoch

def train_step(
    cfg: Config, net: nn.Module, batch: tuple, optimizer: torch.optim.Optimizer, scheduler: Any,
    rt: Runtime, step_now: bool, where: str,
) -> torch.Tensor:
    """Forward and backward of one batch (loss / accum_steps), then, when `step_now`, clip, step
    the optimiser and the schedule. Returns the batch's loss (detached).

    A NaN/inf loss stops training with a UserError before the optimiser step, so the weights and
    the last checkpoint stay as they were; under DDP every rank learns of it via an all-reduce.
    """
    t = cfg.train
    cuda = rt.device.type == "cuda"
    images, labels, species = batch[0], batch[1], batch[2]
    x = images.to(rt.device, non_blocking=True)
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels, species = labels.to(rt.device, non_blocking=True), species.to(rt.device, non_blocking=True)
    # Under DDP, skip the gradient all-reduce on accumulation steps (it happens on the last one).
    sync = nullcontext() if step_now or rt.world == 1 else net.no_sync()
    with sync:
        with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=cuda and t.amp):
            loss = net(x, labels, species)
        (loss / t.accum_steps).backward()
    loss = loss.detach()
    bad = all_reduce((~torch.isfinite(loss)).float(), rt, dist.ReduceOp.MAX)
    if bad.item() > 0:
        optimizer.zero_grad(set_to_none=True)
        raise UserError(
            f"training loss became NaN/inf at {where}; last good checkpoint kept. "
            "Lower train.lr_backbone, raise train.warmup_epochs or check the crops"
        )
    if step_now:
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return loss


def train_epoch(
    cfg: Config, net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
    scheduler: Any, rt: Runtime, epoch: int,
) -> tuple[float, float]:
    """One pass over the loader: (mean loss over all ranks, images/s over all ranks)."""
    net.train()
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", disable=not rt.main, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        step_now = (i + 1) % cfg.train.accum_steps == 0 or i + 1 == len(loader)
        loss = train_step(cfg, net, batch, optimizer, scheduler, rt, step_now, f"epoch {epoch}, batch {i + 1}")
        n = len(batch[0])
        total += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=rt.device)])
        seen = total[1].item() * rt.world
        bar.set_postfix(loss=f"{total[0].item() / total[1].item():.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    total = all_reduce(total, rt)
    elapsed = time.perf_counter() - start
    return float(total[0] / total[1]), float(total[1]) / elapsed


# ---------------------------------------------------------------- validation

def _embed_fold(cfg: Config, model: EmbeddingModel, dataset: CropDataset, rt: Runtime, desc: str) -> np.ndarray:
    """Flip-averaged embeddings of `dataset` in order on every rank, each rank embedding a shard."""
    return embed_sharded(model, dataset, rt, batch_size=cfg.train.batch_size * 2, workers=cfg.train.workers,
                         amp=cfg.train.amp, flip="average", desc=desc)


def validate(cfg: Config, model: EmbeddingModel, splits: Splits, rt: Runtime) -> dict:
    """MAP@5 overall/known/new and the calibrated new_individual threshold on the validation fold."""
    if splits.queries.empty:
        return NO_VALIDATION
    sync_buffers(model, rt)  # embed every shard with the model rank 0 saves
    tf = eval_transform(cfg.train.image_size)
    gallery = _embed_fold(cfg, model, CropDataset(splits.gallery["crop_path"], transform=tf), rt, "val gallery")
    queries = _embed_fold(cfg, model, CropDataset(splits.queries["crop_path"], transform=tf), rt, "val queries")
    result: list[Any] = [None]
    if rt.main:
        result[0] = knn.evaluate_fold(
            gallery, splits.gallery["label"].to_numpy(), queries, splits.queries["truth"].to_numpy(),
            k=cfg.knn.k, backend=knn.backend_for_device(cfg.knn.backend, cfg.device),
        )
    if rt.world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


# ---------------------------------------------------------------- imprinted start

@torch.no_grad()
def imprint(cfg: Config, model: EmbeddingModel, heads: nn.Module, splits: Splits, rt: Runtime) -> dict:
    """Start the heads at the training images' class means (weight imprinting, Qi et al. CVPR 2018).

    A random head gives an individual with one or two photos a meaningless target for most of a
    short schedule; imprinted, its centre starts where its photos already are. One pass of the
    untrained model over the training crops (eval resize, no augmentation) gives the neck's
    linear outputs z; the neck's BatchNorm running statistics are set to their mean and variance
    (what the training-mode BatchNorm will compute), and each class centre (every sub-centre) of
    the individual and species heads becomes the mean direction of its images' standardised
    embeddings. Classes without a training image keep their random centres. Every rank computes
    the same result (the shards are gathered). Sub-centres keep a tenth of their random start,
    so that they can part.
    """
    dataset = CropDataset(splits.train["crop_path"], transform=eval_transform(cfg.train.image_size))
    linear, norm = model.neck[1], model.neck[2]
    was_training = model.training
    z = embed_sharded(model, dataset, rt, batch_size=cfg.train.batch_size * 2, workers=cfg.train.workers,
                      amp=cfg.train.amp, desc="imprint", features=lambda x: linear(model.pooled(x)), normalize=False)
    z = torch.from_numpy(z).to(rt.device)
    model.train(was_training)
    mean, var = z.mean(0), z.var(0, unbiased=False)
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
    emb = torch.nn.functional.normalize((z - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias, dim=1)
    counts = {}
    for name, head, codes in (("individuals", heads.individual, splits.train["label"]),
                              ("species", heads.species, splits.train["species_label"])):
        codes = torch.as_tensor(np.array(codes, dtype=np.int64), device=rt.device)
        keep = (codes >= 0) & (codes < head.n_classes)
        sums = torch.zeros(head.n_classes, emb.shape[1], device=rt.device).index_add_(0, codes[keep], emb[keep])
        present = torch.bincount(codes[keep], minlength=head.n_classes) > 0
        centres = torch.nn.functional.normalize(sums, dim=1)
        weight = head.weight.view(head.n_classes, head.k, -1)
        scale = weight.norm(dim=2, keepdim=True).mean()  # keep the init's norm; only the direction matters
        start = centres[present, None, :] * scale
        if head.k > 1:  # sub-centres that start equal would stay equal (max ties share the gradient)
            start = start + 0.1 * weight[present]
        weight[present] = start.to(weight.dtype)
        counts[name] = int(present.sum())
    return counts


# ---------------------------------------------------------------- artifacts

def checkpoint_dict(
    cfg: Config, model: EmbeddingModel, heads: nn.Module, encoders: dict, splits: Splits,
    epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any, best: float, threshold: float,
) -> dict:
    """The stage-02 checkpoint, keys as in docs/ARTIFACTS.md."""
    return {
        "model_state": model.state_dict(),
        "head_state": heads.state_dict(),
        "config": cfg.to_dict(),
        "label_encoders": encoders,
        "class_counts": splits.class_counts,
        "epoch": epoch,
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "best_metric": best,
        "threshold": threshold,
        "fold": cfg.prepare.fold,
    }


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, learning rate and MAP@5 (overall/known/new) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from whaleid.io import atomic_path

    df = pd.DataFrame(history)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(df["epoch"], df["train_loss"], marker="o")
    axes[0].set_title("train loss")
    axes[1].plot(df["epoch"], df["lr"], marker="o")
    axes[1].set_title("learning rate (backbone)")
    for col in ("map5", "map5_known", "map5_new"):
        axes[2].plot(df["epoch"], df[col], marker="o", label=col)
    axes[2].set_title("validation MAP@5")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _load_history(out: Path, upto: int) -> list[dict]:
    """metrics.csv rows up to the resumed epoch (a row written after the checkpoint is redone)."""
    path = out / "metrics.csv"
    if not path.exists():
        return []
    df = pd.read_csv(path)
    return df[df["epoch"] <= upto].to_dict("records")


# ---------------------------------------------------------------- the stage

REFIT_DIR = "refit"
RUN_FILES = ("best.pt", "last.pt", "metrics.csv", "curves.png", "report.json")


def refit_active(cfg: Config) -> bool:
    """Whether stage 02 trains the all-data refit model (needs a fold to validate on first)."""
    return bool(cfg.train.refit) and cfg.prepare.fold != -1


def refit_config(cfg: Config) -> Config:
    """The fold run's config with no validation fold: the refit model trains on every train image."""
    return config_from_dict(deep_merge(cfg.to_dict(), {"prepare": {"fold": -1}}))


def run(cfg: Config, resume: bool = False) -> Path:
    """Train, validate and checkpoint; returns the stage folder (outputs/02_train).

    With `train.refit`, the refit model follows in outputs/02_train/refit. `resume` continues
    whichever run was interrupted (a finished fold run is not trained again).
    """
    check_train_config(cfg)
    rt = init_runtime(cfg)
    out = Path(cfg.paths.outputs) / STAGE_DIRS["train"]
    refit_out = out / REFIT_DIR
    try:
        if rt.main and refit_out.exists() and not (resume and refit_active(cfg)):
            shutil.rmtree(refit_out)  # a refit model of an earlier run would not match this run's fold model
        # With the refit, the fold run's report.json (what the Makefile's target and stage 03 take
        # for "stage 02 finished") is written only once the refit has finished too: a kill during
        # the refit then leaves no report, and `make` trains again instead of moving on to stage 03.
        finish_fold = _run(cfg, resume, rt, out)
        if refit_active(cfg):
            if rt.main:
                print(f"refit: training the same recipe again on every train image (fold {cfg.prepare.fold} "
                      f"included) -> {refit_out}", flush=True)
            _run(refit_config(cfg), resume and (refit_out / "last.pt").exists(), rt, refit_out)()
        finish_fold()
        return out
    finally:
        if rt.world > 1:
            dist.destroy_process_group()


def prepare_model(cfg: Config, rt: Runtime, splits: Splits, encoders: dict) -> tuple[EmbeddingModel, nn.Module, nn.Module]:
    """Model and heads on the device, and the (DDP / compiled) training module around them."""
    model = build_model(cfg, pretrained=True)
    model.freeze_stages(cfg.train.freeze_stages)
    heads = build_heads(cfg, len(encoders["individual_id"]), len(encoders["species"]), splits.class_counts, splits.species_counts)
    cuda = rt.device.type == "cuda"
    if cfg.train.sync_bn and rt.world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.train.sync_bn and rt.world > 1 and rt.main:
        print("note: train.sync_bn works on CUDA (NCCL) only; these CPU ranks normalise by their own batches "
              "(validation still uses rank 0's statistics on every rank)", flush=True)
    model.to(rt.device)
    heads.to(rt.device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    if cfg.train.channels_last:  # on the CPU too: Lite0 trains ~1.5x faster on 2 cores (bench/results/memory_format.md)
        model.to(memory_format=torch.channels_last)
    net: nn.Module = TrainNet(model, heads)
    if rt.world > 1:
        net = DistributedDataParallel(net, device_ids=[rt.device.index] if cuda else None)
    if cfg.train.compile:
        net = torch.compile(net)
    return model, heads, net


def _run(cfg: Config, resume: bool, rt: Runtime, out: Path) -> Callable[[], None]:
    """Train one run into `out`; returns the call that writes its report.json (rank 0), which
    says the run finished."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed + rt.rank)
    stale = check_fresh(Path(cfg.paths.outputs) / "01_crops" / "report.json", "01_detect_crop.py") if rt.main else []
    catalogue, crops, encoders = read_inputs(cfg)
    splits = make_splits(cfg, catalogue, crops, encoders)
    tf = train_transform(cfg.train.image_size, cfg.train.aug)
    dataset = CropDataset(splits.train["crop_path"], splits.train["label"], splits.train["species_label"], tf)
    loader, sampler = train_loader(cfg, dataset, rt)
    model, heads, net = prepare_model(cfg, rt, splits, encoders)
    if rt.main and not resume:
        _remove_earlier_run(out)
    imprinted = None
    if cfg.train.imprint and not resume:
        imprinted = imprint(cfg, model, heads, splits, rt)
        if rt.main:
            print(f"imprint: heads start at the class means of {imprinted['individuals']} individuals "
                  f"and {imprinted['species']} species", flush=True)
    optimizer = make_optimizer(cfg, model, heads)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.accum_steps)
    scheduler = make_scheduler(optimizer, cfg.train.warmup_epochs * steps_per_epoch, cfg.train.epochs * steps_per_epoch)
    start_epoch, best, threshold, history = 0, -math.inf, math.nan, []
    if resume:
        start_epoch, best, threshold, history = _resume(out, cfg, encoders, model, heads, optimizer, scheduler)
        if rt.main:  # report.json says the run finished (stage 03 checks): not until this one has
            (out / "report.json").unlink(missing_ok=True)
    if rt.main:
        stage_dir(cfg, "train")
        out.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, out)
    for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
        sampler.set_epoch(epoch)
        e0 = time.perf_counter()
        loss, ips = train_epoch(cfg, net, loader, optimizer, scheduler, rt, epoch)
        due = epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs
        val = validate(cfg, model, splits, rt) if due else NO_VALIDATION
        history.append({
            "epoch": epoch, "train_loss": loss, "lr": optimizer.param_groups[0]["lr"], "map5": val["map5"],
            "map5_known": val["map5_known"], "map5_new": val["map5_new"], "threshold": val["threshold"],
            "images_per_s": ips, "seconds": time.perf_counter() - e0,
        })
        improved = cfg.prepare.fold == -1 or (not math.isnan(val["map5"]) and val["map5"] > best)
        if improved:
            best, threshold = (val["map5"], val["threshold"]) if cfg.prepare.fold != -1 else (math.nan, math.nan)
        if rt.main:
            _write_epoch(out, history, checkpoint_dict(cfg, model, heads, encoders, splits, epoch, optimizer, scheduler, best, threshold), improved)
            print(_epoch_line(history[-1]), flush=True)
    seconds = time.perf_counter() - t0

    def finish() -> None:
        if rt.main:
            _write_report(cfg, out, splits, history, rt, seconds, best, threshold, start_epoch, stale, imprinted)

    return finish


def _resume(
    out: Path, cfg: Config, encoders: dict, model: nn.Module, heads: nn.Module,
    optimizer: torch.optim.Optimizer, scheduler: Any,
) -> tuple[int, float, float, list[dict]]:
    """Restore model, heads, optimiser, scheduler and metrics history from last.pt."""
    path = out / "last.pt"
    if not path.exists():
        raise UserError(f"--resume: {path} not found; run 02_train_arcface.py without --resume first")
    ckpt = read_checkpoint(path)
    if ckpt["fold"] != cfg.prepare.fold or ckpt["label_encoders"] != encoders:
        raise UserError(f"--resume: {path} was trained on another fold or catalogue; train afresh")
    try:
        model.load_state_dict(ckpt["model_state"])
        heads.load_state_dict(ckpt["head_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--resume: {path} does not fit the configured model: {err}") from err
    scheduler.load_state_dict(ckpt["scheduler_state"])
    epoch = int(ckpt["epoch"])
    return epoch, float(ckpt["best_metric"]), float(ckpt["threshold"]), _load_history(out, epoch)


def _remove_earlier_run(out: Path) -> None:
    """Delete what an earlier run left in `out` (its checkpoints, metrics and report) before a
    fresh one: stopped before its first checkpoint, the new run would otherwise leave the old
    best.pt/last.pt for stage 03 to embed with, and the old report.json for it to check them by."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _write_epoch(out: Path, history: list[dict], ckpt: dict, improved: bool) -> None:
    """metrics.csv and curves, then best.pt (if improved), then last.pt: a kill in between redoes the epoch.

    best.pt goes first because last.pt records the best metric and is what --resume trusts:
    written first, a kill before best.pt would leave a best.pt older than that record (or none),
    which the resumed run would not rewrite unless it beat the record.
    """
    write_csv(out / "metrics.csv", pd.DataFrame(history, columns=list(METRIC_COLUMNS)))
    plot_curves(history, out / "curves.png")
    if improved:
        torch_save(out / "best.pt", ckpt)
    torch_save(out / "last.pt", ckpt)


def _epoch_line(row: dict) -> str:
    """One line per epoch; the validation part only on epochs that validated (`train.val_every`)."""
    val = ""
    if math.isfinite(row["map5"]):
        val = (f"  MAP@5 {row['map5']:.4f} (known {row['map5_known']:.4f}, new {row['map5_new']:.4f}, "
               f"threshold {row['threshold']:.3f})")
    return f"epoch {row['epoch']}: loss {row['train_loss']:.4f}{val}  {row['images_per_s']:.1f} img/s  {row['seconds']:.0f} s"


def _write_report(
    cfg: Config, out: Path, splits: Splits, history: list[dict], rt: Runtime,
    seconds: float, best: float, threshold: float, start_epoch: int, stale: list[str], imprinted: dict | None,
) -> None:
    """report.json: data sizes, history, best metric, what the run was made from, stale inputs."""
    prepared = Path(cfg.paths.outputs) / "00_prepare"
    inputs = [prepared / "catalogue.csv", prepared / "label_encoders.json",
              Path(cfg.paths.outputs) / "01_crops" / "crops.csv"]
    if cfg.train.pseudo_labels:
        inputs.append(Path(cfg.train.pseudo_labels))
    write_json(out / "report.json", {
        "train_samples": len(splits.train),
        "train_classes": int(np.count_nonzero(splits.class_counts)),
        "gallery_images": len(splits.gallery),
        "val_queries": len(splits.queries),
        "val_new": int((splits.queries["truth"] == knn.NEW_LABEL).sum()),
        "pseudo_labels": splits.pseudo,
        "fold": cfg.prepare.fold,
        "epochs": cfg.train.epochs,
        "resumed_from_epoch": start_epoch,
        "imprinted": imprinted,
        "best_map5": best,
        "threshold": threshold,
        "device": str(rt.device),
        "world_size": rt.world,
        "seconds": seconds,
        "history": history,
        "made_from": {
            "config": {k: fingerprint_config(cfg[k]) for k in ("model", "loss", "train", "prepare", "crop")},
            "inputs": fingerprint_files(inputs),
        },
        "input_files": stage_inputs_record(inputs, cfg.paths.outputs),
        "stale_inputs": stale,
    })
