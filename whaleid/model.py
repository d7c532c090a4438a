"""The embedding network: timm backbone -> GeM pooling (or flatten) -> Linear + BatchNorm neck.

As in the Happywhale 1st-place solution: GeM pooling of the last feature map, optionally
concatenated with GeM of an earlier stage (`model.concat_stage`) for finer detail, then a
Linear -> BatchNorm1d neck whose output is the embedding used for kNN.

`model.pool: flatten` keeps the last feature map's layout instead of pooling it away: the map is
flattened into the neck's Linear, the "option E" output of ArcFace (Deng et al. 2019, for aligned
faces). It suits photo sets in one standard pose (the right whale heads), where *where* a mark
sits identifies the animal; it fixes the input size to `train.image_size`. GeM is the default,
for animals photographed at any angle and position (Happywhale).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from whaleid.backbone import create_backbone, normalisation
from whaleid.config import Config, config_from_dict
from whaleid.errors import UserError

CHECKPOINT_KEYS = (
    "model_state", "head_state", "config", "label_encoders", "class_counts", "epoch",
    "optimizer_state", "scheduler_state", "best_metric", "threshold", "fold",
)


class GeM(nn.Module):
    """Generalised mean pooling (Radenovic et al. 2018): p=1 is average, p->inf is max pooling."""

    def __init__(self, p: float = 3.0, trainable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        p_tensor = torch.tensor([float(p)])
        self.p = nn.Parameter(p_tensor) if trainable else nn.Parameter(p_tensor, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32: x^p in bf16 loses the small activations that GeM is meant to weigh.
        p = self.p.float()
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class FlattenMap(nn.Module):
    """The feature map itself, cell by cell (float32), for a fixed (H, W): `model.pool: flatten`."""

    def __init__(self, hw: tuple[int, int]) -> None:
        super().__init__()
        self.hw = hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.hw:
            raise UserError(
                f"model.pool: flatten was built for a {self.hw} feature map, got {tuple(x.shape[-2:])}: "
                "embed at train.image_size (embed.image_size: 0)"
            )
        return x.float().flatten(1)


POOLS = ("gem", "flatten")


def _last_map_size(backbone: nn.Module, input_size: int) -> tuple[int, int]:
    """(H, W) of the backbone's last feature map for a square input (one eval-mode pass)."""
    was_training = backbone.training
    with torch.no_grad():
        last = backbone.eval()(torch.zeros(1, 3, input_size, input_size))[-1]
    backbone.train(was_training)
    return int(last.shape[-2]), int(last.shape[-1])


class EmbeddingModel(nn.Module):
    """Backbone feature maps -> GeM (last stage, plus `concat_stage` if set) -> neck."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_size: int,
        gem_p: float = 3.0,
        gem_trainable: bool = True,
        concat_stage: int = -1,
        dropout: float = 0.0,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        pool: str = "gem",
        input_size: int = 0,
    ) -> None:
        super().__init__()
        # uint8 batches are normalised here, on the model's device: loaders ship 1 byte per pixel
        # instead of 4 and the arithmetic runs on the GPU. Not persistent: checkpoints are unchanged.
        self.register_buffer("mean255", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std255", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)
        channels = backbone.feature_info.channels()
        if concat_stage != -1 and not 0 <= concat_stage < len(channels) - 1:
            raise UserError(
                f"model.concat_stage must be -1 or an earlier stage 0..{len(channels) - 2}, got {concat_stage}"
            )
        if pool not in POOLS:
            raise UserError(f"model.pool must be one of {list(POOLS)}, got {pool!r}")
        self.backbone = backbone
        self.stages = [len(channels) - 1] + ([concat_stage] if concat_stage != -1 else [])
        last_pool, last_cells = GeM(gem_p, gem_trainable), 1
        if pool == "flatten":  # the last stage is flattened instead of GeM-pooled
            if input_size < 1:
                raise UserError("model.pool: flatten needs the input size (train.image_size)")
            h, w = _last_map_size(backbone, input_size)
            last_pool, last_cells = FlattenMap((h, w)), h * w
        self.pools = nn.ModuleList([last_pool] + [GeM(gem_p, gem_trainable) for _ in self.stages[1:]])
        self.pooled_size = channels[-1] * last_cells + sum(channels[i] for i in self.stages[1:])
        self.neck = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.pooled_size, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (0-255, as `CropDataset` yields them) -> the backbone's normalised float
        input; a float batch is taken as already normalised and passed through."""
        if x.dtype == torch.uint8:
            return (x.float() - self.mean255) / self.std255
        return x

    @property
    def flatten_hw(self) -> tuple[int, int] | None:
        """(H, W) of the flattened last map, or None with GeM pooling."""
        return self.pools[0].hw if isinstance(self.pools[0], FlattenMap) else None

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) pooled (or flattened) backbone features without the neck (the untrained floor)."""
        maps = self.backbone(self.normalise(x))
        return torch.cat([pool(maps[i]) for pool, i in zip(self.pools, self.stages)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings, not normalised (the heads and kNN normalise)."""
        return self.neck(self.pooled(x))

    def freeze_stages(self, n: int) -> list[str]:
        """Stop training the stem and the first `n` feature stages of the backbone; returns the
        names of the frozen parameters.

        The stages are timm's `feature_info`, each named by the module whose output it is, the last
        of the stage: EfficientNet's are blocks.0, blocks.1, blocks.2, blocks.4 and blocks.6, so its
        stage 3 is blocks.3-4 (both at stride 16) and n=3 freezes blocks.0-2. The frozen part is
        every parameter registered up to and including the module of stage n-1 (the stem being
        whatever precedes stage 0). Backward then stops at the first trainable layer, which skips
        the costliest part of it (the high-resolution early maps): with n=2, Lite2 training steps
        at 160 px run 1.45x faster on 2 CPU cores (1.26x for whole demo epochs, where the loader
        shares the cores). Their BatchNorm layers still normalise with batch statistics in training
        mode and update their running means, which adapts the frozen features to the photos:
        keeping them in eval mode as well (detectron2's FrozenBN) scored lower on the demo (N=2,
        40 epochs, folds 0-2: validation MAP@5 0.879 against 0.892, test 0.801 against 0.839).
        """
        names = self.backbone.feature_info.module_name()
        if not 0 <= n < len(names):
            raise UserError(f"train.freeze_stages must be 0..{len(names) - 1} (this backbone has {len(names)} stages), got {n}")
        if n == 0:
            return []
        # named_modules() lists each module before its children, in registration order: a parameter is
        # frozen if its module comes no later than stage n-1's module (which may hold no parameters
        # of its own, as ResNet's stage 0, `act1`) or lies inside it. timm's FeatureListNet flattens
        # a nested name (ConvNeXt: stages.0 -> stages_0).
        order = {name: i for i, (name, _) in enumerate(self.backbone.named_modules())}
        last = names[n - 1] if names[n - 1] in order else names[n - 1].replace(".", "_")
        frozen = []
        for name, p in self.backbone.named_parameters():
            module = name.rpartition(".")[0]
            if order[module] <= order[last] or module.startswith(last + "."):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen


def build_model(cfg: Config, pretrained: bool = True) -> EmbeddingModel:
    """The model of `cfg.model`; `pretrained=False` skips the ImageNet weights (e.g. before
    loading a checkpoint, which needs neither the download nor the package)."""
    m = cfg.model
    backbone = create_backbone(m.backbone, m.pretrained if pretrained else "none", features_only=True)
    mean, std = normalisation(m.backbone)
    return EmbeddingModel(
        backbone, m.embedding_size, m.gem_p, m.gem_trainable, m.concat_stage, m.dropout, mean, std,
        m.pool, cfg.train.image_size,
    )


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict of `path`, with a UserError naming the file if unreadable or incomplete."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: run 02_train_arcface.py first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks keys {missing}; it was not written by stage 02")
    return ckpt


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[EmbeddingModel, nn.Module, dict]:
    """Rebuild the model and the ArcFace heads from a stage-02 checkpoint's own config.

    Returns (model, heads, checkpoint dict); both modules are on the CPU in eval mode.
    """
    from whaleid.losses import build_heads

    ckpt = read_checkpoint(path, map_location)
    cfg = config_from_dict(ckpt["config"])
    enc = ckpt["label_encoders"]
    model = build_model(cfg, pretrained=False)
    heads = build_heads(cfg, len(enc["individual_id"]), len(enc["species"]), ckpt["class_counts"])
    try:
        model.load_state_dict(ckpt["model_state"])
        heads.load_state_dict(ckpt["head_state"])
    except RuntimeError as err:
        raise UserError(f"checkpoint {path} does not fit the model its config describes: {err}") from err
    return model.eval(), heads.eval(), ckpt
