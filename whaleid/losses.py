"""ArcFace heads: sub-centre ArcFace with dynamic per-class margins, and the combined loss.

Pure maths on tensors (no device calls, no I/O), so the heads run and test on the CPU.

- Sub-centre ArcFace (Deng et al., ECCV 2020): k centres per class, the class cosine is the max
  over its centres, so noisy or multi-modal classes (left/right flank, fluke vs dorsal) do not
  pull one centre two ways.
- Dynamic margins m_c = a * n_c^p + b (n_c = training images of class c) from the Google
  Landmark 2020 winners, used by the Happywhale 1st-place solution: rare individuals get larger
  margins.
- A species head of the same family adds `species_weight` x its cross-entropy (1st-place
  solution), which shapes the embedding by species too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from whaleid.config import Config
from whaleid.errors import UserError


def dynamic_margins(counts: Sequence[int], a: float, p: float, b: float) -> torch.Tensor:
    """m_c = a * n_c^p + b per class; classes with no training image count as 1 (never targets)."""
    n = torch.as_tensor(list(counts), dtype=torch.float64).clamp(min=1.0)
    return (a * n.pow(p) + b).float()


class SubCenterArcFace(nn.Module):
    """Cosine classifier with k sub-centres per class and an additive angular margin per class.

    `cosine(emb)` gives the plain class cosines (for inference logits); `forward(emb, labels)`
    gives s * logits with cos(theta + m_y) on the target class, for cross-entropy.
    """

    def __init__(
        self,
        in_features: int,
        n_classes: int,
        margins: torch.Tensor,
        k: int = 3,
        s: float = 30.0,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        if k < 1:
            raise UserError(f"loss.k must be >= 1, got {k}")
        if len(margins) != n_classes:
            raise ValueError(f"{len(margins)} margins for {n_classes} classes")
        self.n_classes, self.k, self.s, self.easy_margin = n_classes, k, s, easy_margin
        self.weight = nn.Parameter(torch.empty(n_classes * k, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.register_buffer("margins", torch.as_tensor(margins, dtype=torch.float32).clone())

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, C) cosine of each embedding to its nearest sub-centre of each class, in float32.

        Autocast is switched off here: under bf16 autocast `linear` would return bf16 and the
        margin arithmetic (float32 margins) would no longer match the logits' dtype.
        """
        with torch.autocast(device_type=emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        return cos.view(-1, self.n_classes, self.k).amax(dim=2)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """s * logits with the angular margin of each sample's class added to its target cosine.

        Rows whose label is negative (ignored by the loss) get no margin.
        """
        cos = self.cosine(emb)
        valid = labels >= 0
        target = labels.clamp(min=0)
        m = self.margins[target]
        cos_t = cos.gather(1, target[:, None]).squeeze(1)
        sin_t = (1.0 - cos_t.pow(2)).clamp(min=0.0).sqrt()
        phi = cos_t * torch.cos(m) - sin_t * torch.sin(m)
        if self.easy_margin:
            phi = torch.where(cos_t > 0, phi, cos_t)
        else:
            # Past theta = pi - m, cos(theta + m) stops decreasing; use the linear
            # continuation cos - m*sin(m) as in the reference ArcFace implementation.
            phi = torch.where(cos_t > torch.cos(math.pi - m), phi, cos_t - m * torch.sin(m))
        phi = torch.where(valid, phi, cos_t)
        logits = cos.scatter(1, target[:, None], phi[:, None])
        return self.s * logits


def _arcface(in_features: int, n_classes: int, margins: torch.Tensor, cfg: Config) -> SubCenterArcFace:
    """Plain ArcFace: one centre per class."""
    return SubCenterArcFace(in_features, n_classes, margins, k=1, s=cfg.s, easy_margin=cfg.easy_margin)


def _subcenter(in_features: int, n_classes: int, margins: torch.Tensor, cfg: Config) -> SubCenterArcFace:
    """Sub-centre ArcFace with `loss.k` centres per class."""
    return SubCenterArcFace(in_features, n_classes, margins, k=cfg.k, s=cfg.s, easy_margin=cfg.easy_margin)


HEADS = {"arcface": _arcface, "subcenter_arcface": _subcenter}


def class_margins(cfg: Config, counts: Sequence[int] | None, n_classes: int) -> torch.Tensor:
    """Per-class margins: dynamic from counts when `loss.dynamic_margin`, else a + b for all."""
    if cfg.dynamic_margin and counts is not None:
        return dynamic_margins(counts, cfg.margin_a, cfg.margin_p, cfg.margin_b)
    return torch.full((n_classes,), cfg.margin_a + cfg.margin_b)


class ArcFaceHeads(nn.Module):
    """The individual head and the species head, with the combined training loss."""

    def __init__(self, individual: SubCenterArcFace, species: SubCenterArcFace, species_weight: float) -> None:
        super().__init__()
        self.individual = individual
        self.species = species
        self.species_weight = species_weight

    def forward(
        self, emb: torch.Tensor, labels: torch.Tensor, species: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE(individual) + species_weight * CE(species); label -1 rows are ignored per head."""
        loss_id = _ce(self.individual(emb, labels), labels)
        loss_sp = _ce(self.species(emb, species), species)
        total = loss_id + self.species_weight * loss_sp
        return total, {"individual": loss_id.detach(), "species": loss_sp.detach()}


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ignoring label -1; zero (still in the graph) when no row has a label."""
    if not bool((labels >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=-1)


def build_heads(
    cfg: Config,
    n_classes: int,
    n_species: int,
    class_counts: Sequence[int] | None,
    species_counts: Sequence[int] | None = None,
) -> ArcFaceHeads:
    """Both heads of type `cfg.loss.type` on embeddings of size `cfg.model.embedding_size`.

    Counts set the dynamic margins; a checkpoint's own margins (buffers) replace them on load.
    """
    loss = cfg.loss
    if loss.type not in HEADS:
        raise UserError(f"unknown loss.type {loss.type!r}; valid: {sorted(HEADS)}")
    make = HEADS[loss.type]
    d = cfg.model.embedding_size
    individual = make(d, n_classes, class_margins(loss, class_counts, n_classes), loss)
    species = make(d, max(n_species, 1), class_margins(loss, species_counts, max(n_species, 1)), loss)
    return ArcFaceHeads(individual, species, loss.species_weight)
