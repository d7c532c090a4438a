"""Crop images as tensors for training and embedding, with the augmentations of stage 02.

The augmentation set follows the Happywhale 1st-place solution (affine, flip, colour, blur,
grayscale, cutout); each family is switched on by a probability in `train.aug`, so a key set
to 0 removes that transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset

from whaleid.config import Config
from whaleid.errors import UserError
from whaleid.images import read_image


class CropDataset(Dataset):
    """Crops by path, with optional integer individual and species codes (-1 where unknown).

    Items are `(image CHW uint8, label, species, index)`; `index` lets a sharded or shuffled
    loader put embeddings back in dataset order. Images stay uint8 (a quarter of float32's bytes
    through the loader's shared memory and the host-to-device copy); `EmbeddingModel.normalise`
    turns them into the backbone's input on the device.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray | None = None,
        species: np.ndarray | None = None,
        transform: Callable | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        n = len(self.paths)
        self.labels = _codes(labels, n, "labels")
        self.species = _codes(species, n, "species")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        path = self.paths[index]
        image, reason = read_image(path)
        if image is None:
            raise UserError(f"cannot read crop {path}: {reason}; rerun 01_detect_crop.py")
        if self.transform is not None:
            tensor = self.transform(image=image)["image"]
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor, int(self.labels[index]), int(self.species[index]), index


def _codes(values: np.ndarray | None, n: int, name: str) -> np.ndarray:
    """Integer codes of length n (all -1 when None)."""
    if values is None:
        return np.full(n, -1, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} paths")
    return values


def _finish(image_size: int) -> list:
    """Resize and convert to a CHW uint8 tensor (the model normalises on its device)."""
    return [A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA), ToTensorV2()]


def eval_transform(image_size: int) -> A.Compose:
    """Deterministic resize, used for validation and embedding."""
    return A.Compose(_finish(image_size))


def train_transform(image_size: int, aug: Config) -> A.Compose:
    """Random augmentations from `train.aug`, then the eval resize.

    Horizontal flip is kept as in the 1st-place solution: flukes and fins are not perfectly
    symmetric, but flipped copies still helped there, and TTA averages both orientations.
    """
    steps = [
        A.Affine(
            scale=(1.0 - aug.scale, 1.0 + aug.scale),
            translate_percent=(-aug.shift, aug.shift),
            rotate=(-aug.rotate, aug.rotate),
            shear=(-aug.shear, aug.shear),
            border_mode=cv2.BORDER_REPLICATE,
            p=aug.affine_p,
        ),
        A.HorizontalFlip(p=aug.hflip),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, p=aug.color_p),
        A.GaussianBlur(blur_limit=(3, 5), p=aug.blur_p),
        A.ToGray(p=aug.grayscale_p),
        A.CoarseDropout(
            num_holes_range=(1, 4),
            hole_height_range=(0.05, 0.2),
            hole_width_range=(0.05, 0.2),
            fill=0,
            p=aug.cutout_p,
        ),
    ]
    return A.Compose(steps + _finish(image_size))
