"""The built-in animal detector: one box and a confidence per image, trained offline in minutes.

Design (one animal per photo, as in Happywhale): a frozen ImageNet EfficientNet-Lite0 gives
stride-16 and stride-32 feature maps of the letterboxed image; a small trainable head fuses
them and, for every cell of the stride-16 grid, predicts an attention logit, the distances
from the cell centre to the four box sides (sigmoid, share of the image side) and a
confidence logit. The box is the attention-weighted mean of the cells' boxes (a soft argmax,
differentiable end to end), the confidence the attention-weighted confidence logit.
Loss: L1 + GIoU on the box, and binary cross-entropy of the confidence against the box's own
IoU with the truth (IoU-aware confidence, as in YOLO's objectness), so conf predicts quality.

Why frozen: fine-tuning Lite0 costs ~0.3 s per image per step on a 2-core CPU; with the
backbone frozen its features are computed once per training image (two views: as is, and
mirrored with colour jitter, so flip augmentation comes free) and the head trains in seconds.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from whaleid.backbone import create_backbone, normalisation
from whaleid.boxes import BOX_COLUMNS, Box, box_problem, from_letterbox, iou, to_letterbox
from whaleid.config import Config
from whaleid.errors import UserError
from whaleid.images import read_image, resize_square
from whaleid.inference import bf16_inference, resolve_device
from whaleid.io import fingerprint_config, torch_save

VAL_SHARE = 0.1       # held-out share of the training boxes for the per-epoch validation IoU
HEAD_WIDTH = 128
L1_WEIGHT, GIOU_WEIGHT, CONF_WEIGHT = 5.0, 2.0, 1.0   # DETR's L1:GIoU ratio


# --- model ---------------------------------------------------------------------------------

class BoxHead(nn.Module):
    """Soft-argmax box head over fused stride-16/32 features; returns (boxes 0-1 xyxy, conf logits)."""

    def __init__(self, fine_channels: int, coarse_channels: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.fine = nn.Conv2d(fine_channels, width, 1)
        self.coarse = nn.Conv2d(coarse_channels, width, 1)
        self.body = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.out = nn.Conv2d(width, 6, 1)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.fine(fine) + F.interpolate(self.coarse(coarse), size=fine.shape[-2:], mode="bilinear",
                                            align_corners=False)
        y = self.out(self.body(x)).float()
        b, _, h, w = y.shape
        attention = torch.softmax(y[:, 0].flatten(1), dim=1)                     # (B, HW)
        dist = torch.sigmoid(y[:, 1:5]).flatten(2)                              # (B, 4, HW)
        cy, cx = torch.meshgrid((torch.arange(h, device=y.device) + 0.5) / h,
                                (torch.arange(w, device=y.device) + 0.5) / w, indexing="ij")
        cx, cy = cx.flatten(), cy.flatten()
        cells = torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], dim=1)
        boxes = (cells * attention[:, None]).sum(-1)
        conf = (y[:, 5].flatten(1) * attention).sum(-1)
        return boxes, conf


def box_loss(pred: torch.Tensor, target: torch.Tensor, conf_logit: torch.Tensor) -> torch.Tensor:
    """L1 + GIoU on (B, 4) xyxy boxes, plus BCE of the confidence against the detached IoU."""
    giou, plain_iou = generalized_iou(pred, target)
    l1 = (pred - target).abs().sum(1).mean()
    conf = F.binary_cross_entropy_with_logits(conf_logit, plain_iou.detach().clamp(0, 1))
    return L1_WEIGHT * l1 + GIOU_WEIGHT * (1 - giou).mean() + CONF_WEIGHT * conf


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GIoU, IoU) of paired xyxy boxes (Rezatofighi et al. 2019)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = (area_a + area_b - inter).clamp(min=1e-9)
    plain = inter / union
    hull = ((torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0]))
            * (torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1]))).clamp(min=1e-9)
    return plain - (hull - union) / hull, plain


class Detector:
    """A frozen feature extractor plus a trained BoxHead, on one device."""

    def __init__(self, det_cfg: Config, device: torch.device) -> None:
        self.cfg = det_cfg
        self.device = device
        self.backbone = create_backbone(det_cfg.backbone, det_cfg.pretrained, features_only=True)
        self.backbone.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)
        fine, coarse = self.backbone.feature_info.channels()[-2:]
        self.head = BoxHead(fine, coarse).to(device)
        self.mean, self.std = normalisation(det_cfg.backbone)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stride-16 and stride-32 features of a normalised batch (bf16 autocast with
        `crop.detector.amp` on CUDA and on CPUs with native bf16: `inference.bf16_inference`)."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16_inference(self.device, self.cfg.amp)):
            maps = self.backbone(images)
        return maps[-2].float(), maps[-1].float()


# --- data ----------------------------------------------------------------------------------

class LetterboxDataset(Dataset):
    """Images letterboxed to a square, normalised; with the 0-1 box on that square when given.

    `view` 1 mirrors the image (and its box) and jitters brightness, contrast and saturation,
    with a generator seeded by (seed, index) so results do not depend on worker processes.
    Undecodable files give a zero image and ok=False instead of stopping the run.
    """

    def __init__(self, paths: list[str], size: int, mean: tuple, std: tuple,
                 boxes: np.ndarray | None = None, view: int = 0, seed: int = 0) -> None:
        self.paths, self.size, self.boxes, self.view, self.seed = paths, size, boxes, view, seed
        self.mean = np.asarray(mean, np.float32) * 255
        self.std = np.asarray(std, np.float32) * 255

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        rgb, _ = read_image(self.paths[index])
        if rgb is None:
            return torch.zeros(3, self.size, self.size), torch.zeros(4), torch.zeros(2), False
        h, w = rgb.shape[:2]
        square = resize_square(rgb, self.size, keep_aspect=True).astype(np.float32)
        box = np.zeros(4, np.float32)
        if self.boxes is not None:
            box = np.asarray(to_letterbox(tuple(self.boxes[index]), w, h, self.size), np.float32)
        if self.view == 1:
            square, box = square[:, ::-1], np.array([1 - box[2], box[1], 1 - box[0], box[3]], np.float32)
            square = colour_jitter(square, np.random.default_rng((self.seed, index)))
        tensor = torch.from_numpy(((square - self.mean) / self.std).transpose(2, 0, 1).copy())
        return tensor, torch.from_numpy(box), torch.tensor([w, h], dtype=torch.float32), True


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 0.25) -> np.ndarray:
    """Random brightness, contrast and saturation in +-strength, on a float RGB 0-255 image."""
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    grey = rgb.mean(axis=2, keepdims=True)
    out = grey + (rgb - grey) * s
    out = (out - out.mean()) * c + out.mean()
    return np.clip(out * b, 0, 255).astype(np.float32)


def _loader(dataset: Dataset, cfg: Config, device: torch.device) -> DataLoader:
    """Batches in order; pinned host memory only when they go to a GPU."""
    return DataLoader(dataset, batch_size=cfg.crop.detector.batch_size, num_workers=cfg.crop.workers,
                      pin_memory=device.type == "cuda")


def _cache_features(det: Detector, dataset: Dataset, cfg: Config, desc: str) -> tuple[torch.Tensor, ...]:
    """Frozen features of every item, kept in memory as float16: (fine, coarse, boxes, sizes, ok)."""
    fine, coarse, boxes, sizes, oks = [], [], [], [], []
    for images, box, size, ok in tqdm(_loader(dataset, cfg, det.device), desc=desc, unit="batch", leave=False):
        f, c = det.features(images)
        fine.append(f.half().cpu())
        coarse.append(c.half().cpu())
        boxes.append(box)
        sizes.append(size)
        oks.append(ok)
    return torch.cat(fine), torch.cat(coarse), torch.cat(boxes), torch.cat(sizes), torch.cat(oks)


# --- training boxes ------------------------------------------------------------------------

def training_boxes(cfg: Config, catalogue: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Boxes to train on, joined to the TRAIN rows of the catalogue, and where they came from.

    Source: `crop.detector.train_boxes`, else `boxes.csv` of the data folder (the demo set's
    ground truth). Only rows of train-split images are used (a `split` column, when present,
    must say train too), so the detector never sees a test box. Rows with a non-numeric or
    degenerate box are dropped.
    """
    from whaleid.catalogue import resolve_data_dir

    given = cfg.crop.detector.train_boxes
    path = Path(given) if given else resolve_data_dir(cfg) / "boxes.csv"
    if not path.is_file():
        if given:
            raise UserError(f"crop.detector.train_boxes is {path}, but that file does not exist")
        return pd.DataFrame(columns=["image", "path", *BOX_COLUMNS]), ""
    df = pd.read_csv(path, dtype={"image": str})
    for column in ["image", *BOX_COLUMNS]:
        if column not in df.columns:
            raise UserError(f"training box file {path} lacks column {column!r}")
    if "split" in df.columns:
        df = df[df["split"].astype(str) == "train"]
    train = catalogue.loc[catalogue["split"] == "train", ["image", "path", "width", "height"]]
    df = train.merge(df[["image", *BOX_COLUMNS]].drop_duplicates("image", keep=False), on="image")
    df[BOX_COLUMNS] = df[BOX_COLUMNS].apply(pd.to_numeric, errors="coerce")
    usable = [box_problem(tuple(r[:4]), int(r[4]), int(r[5])) == ""
              for r in df[[*BOX_COLUMNS, "width", "height"]].to_numpy()]
    return df[usable].reset_index(drop=True), str(path)


def boxes_fingerprint(boxes: pd.DataFrame) -> str:
    """A hash of the training boxes' content (image names and coordinates, rounded)."""
    text = boxes[["image", *BOX_COLUMNS]].sort_values("image").round(3).to_csv(index=False)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _recipe(cfg: Config) -> dict:
    """Everything the trained head depends on besides the boxes."""
    return {"detector": cfg.crop.detector.to_dict(), "seed": cfg.seed, "head_width": HEAD_WIDTH,
            "val_share": VAL_SHARE}


# --- train / load --------------------------------------------------------------------------

def _load_saved(weights: Path) -> dict | None:
    """The saved detector dict, or None when absent or unreadable (then it is retrained: the
    file is a cache of a deterministic training, so losing it costs time, not results)."""
    if not weights.is_file():
        return None
    try:
        saved = torch.load(weights, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        print(f"warning: {weights} is truncated or corrupt ({type(err).__name__}); retraining the detector")
        return None
    return saved if isinstance(saved, dict) else None


def ensure(cfg: Config, catalogue: pd.DataFrame, weights: Path) -> tuple[Detector, dict]:
    """The detector for this config and these training boxes: loaded when `weights` matches
    both, trained and saved (atomically) otherwise. Returns it with a summary for the report."""
    boxes, source = training_boxes(cfg, catalogue)
    if boxes.empty:
        raise UserError(
            "crop.box_source asks for the built-in detector, but there are no training boxes "
            "(set crop.detector.train_boxes to a CSV image,x_min,y_min,x_max,y_max of train images, "
            "or use box_source fallback, import or full)"
        )
    fingerprint = boxes_fingerprint(boxes)
    torch.manual_seed(cfg.seed)  # the head's initial weights, so a retrain reproduces the same boxes
    det = Detector(cfg.crop.detector, resolve_device(cfg.device))
    saved = _load_saved(weights)
    if saved is not None:
        if saved.get("recipe") == _recipe(cfg) and saved.get("boxes_fingerprint") == fingerprint:
            det.head.load_state_dict(saved["head_state"])
            det.head.eval()
            return det, {**saved["summary"], "trained_now": False}
    summary = train(det, boxes, cfg)
    summary.update(boxes_file=source, boxes_fingerprint=fingerprint,
                   weights_id=f"{fingerprint}:{fingerprint_config(_recipe(cfg))}")
    torch_save(weights, {"head_state": det.head.state_dict(), "recipe": _recipe(cfg),
                         "config": cfg.to_dict(), "boxes_fingerprint": fingerprint, "summary": summary})
    return det, {**summary, "trained_now": True}


def train(det: Detector, boxes: pd.DataFrame, cfg: Config) -> dict:
    """Fit the head on the boxes (10% held out for validation IoU); returns a summary."""
    dcfg = cfg.crop.detector
    rng = np.random.default_rng(cfg.seed)
    if len(boxes) > dcfg.max_train_images:
        boxes = boxes.iloc[np.sort(rng.choice(len(boxes), dcfg.max_train_images, replace=False))]
    order = rng.permutation(len(boxes))
    n_val = int(round(VAL_SHARE * len(boxes))) if len(boxes) >= 10 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    paths = boxes["path"].tolist()
    coords = boxes[BOX_COLUMNS].to_numpy(np.float32)
    views = [_cache_features(det, LetterboxDataset(paths, dcfg.image_size, det.mean, det.std, coords, view, cfg.seed),
                             cfg, f"detector features view {view + 1}/2") for view in (0, 1)]
    ok = views[0][4] & views[1][4]
    train_idx = np.array([i for i in train_idx if ok[i]], dtype=np.int64)
    val_idx = np.array([i for i in val_idx if ok[i]], dtype=np.int64)
    head = det.head.train()
    optimiser = torch.optim.AdamW(head.parameters(), lr=dcfg.lr, weight_decay=1e-4)
    steps = max(1, dcfg.epochs * math.ceil(len(train_idx) / dcfg.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=dcfg.lr, total_steps=steps, pct_start=0.1)
    history = []
    for epoch in range(dcfg.epochs):
        loss = _train_epoch(det, views, train_idx, optimiser, schedule, dcfg.batch_size, rng, epoch, dcfg.epochs)
        val = _mean_iou(det, views[0], val_idx, dcfg.batch_size) if len(val_idx) else float("nan")
        history.append({"epoch": epoch + 1, "loss": loss, "val_iou": val})
        tqdm.write(f"detector epoch {epoch + 1}/{dcfg.epochs}: loss {loss:.4f}, validation IoU {val:.3f} "
                   f"({len(val_idx)} held-out boxes)")
    head.eval()
    return {"n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "val_iou": history[-1]["val_iou"],
            "history": history}


def _train_epoch(det: Detector, views: list, idx: np.ndarray, optimiser, schedule, batch_size: int,
                 rng: np.random.Generator, epoch: int, epochs: int) -> float:
    """One pass over `idx` in random order, each item from a random view; mean loss."""
    perm = rng.permutation(idx)
    choice = torch.from_numpy(rng.integers(0, 2, len(perm)))
    total, bar = 0.0, tqdm(range(0, len(perm), batch_size), desc=f"detector {epoch + 1}/{epochs}", leave=False)
    for start in bar:
        rows = torch.from_numpy(perm[start:start + batch_size])
        pick = choice[start:start + batch_size].bool()
        fine = torch.where(pick[:, None, None, None], views[1][0][rows], views[0][0][rows])
        coarse = torch.where(pick[:, None, None, None], views[1][1][rows], views[0][1][rows])
        target = torch.where(pick[:, None], views[1][2][rows], views[0][2][rows]).to(det.device)
        pred, conf = det.head(fine.to(det.device).float(), coarse.to(det.device).float())
        loss = box_loss(pred, target, conf)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        total += loss.item() * len(rows)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(1, len(perm))


@torch.no_grad()
def _mean_iou(det: Detector, view: tuple, idx: np.ndarray, batch_size: int) -> float:
    """Mean IoU on the letterboxed square of the held-out items."""
    det.head.eval()
    ious = []
    for start in range(0, len(idx), batch_size):
        rows = torch.from_numpy(idx[start:start + batch_size])
        pred, _ = det.head(view[0][rows].to(det.device).float(), view[1][rows].to(det.device).float())
        ious.append(iou(pred.cpu().numpy(), view[2][rows].numpy()))
    det.head.train()
    return float(np.concatenate(ious).mean())


# --- inference -----------------------------------------------------------------------------

@torch.no_grad()
def predict(det: Detector, paths: list[str], cfg: Config) -> list[tuple[Box, float] | None]:
    """(box in image pixels, confidence) for each path, batched; None where it does not decode."""
    det.head.eval()
    size = cfg.crop.detector.image_size
    dataset = LetterboxDataset(paths, size, det.mean, det.std)
    out: list[tuple[Box, float] | None] = []
    for images, _, sizes, ok in tqdm(_loader(dataset, cfg, det.device), desc="detector", unit="batch"):
        boxes, conf = det.head(*det.features(images))
        conf = torch.sigmoid(conf).cpu().numpy()
        for box, c, (w, h), good in zip(boxes.cpu().numpy(), conf, sizes.numpy(), ok.numpy()):
            out.append((from_letterbox(tuple(map(float, box)), int(w), int(h), size), float(c)) if good else None)
    return out
