"""ArcFace heads against known answers: margin 0 = scaled cosine, sub-centre max, dynamic margins."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from whaleid.config import load_config
from whaleid.errors import UserError
from whaleid.losses import HEADS, SubCenterArcFace, build_heads, dynamic_margins


def _head(n_classes: int, dim: int, k: int, margin: float, **kw) -> SubCenterArcFace:
    torch.manual_seed(0)
    return SubCenterArcFace(dim, n_classes, torch.full((n_classes,), margin), k=k, **kw)


def test_margin_zero_k1_is_scaled_cosine() -> None:
    head = _head(5, 8, k=1, margin=0.0, s=30.0)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    expected = 30.0 * F.normalize(emb) @ F.normalize(head.weight).T
    torch.testing.assert_close(head(emb, labels), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.cosine(emb), expected / 30.0, rtol=1e-5, atol=1e-5)


def test_subcenter_cosine_is_max_over_centres() -> None:
    head = SubCenterArcFace(2, 2, torch.zeros(2), k=2)
    with torch.no_grad():
        # class 0: centres along +x and +y; class 1: along -x and -y
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]])
    expected = torch.tensor([[1.0, 0.0], [0.8, -0.6], [0.8, 0.6]])
    torch.testing.assert_close(head.cosine(emb), expected)


def test_margin_applies_only_to_the_target() -> None:
    head = _head(4, 8, k=3, margin=0.3, s=10.0)
    emb, labels = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 1])
    cos = head.cosine(emb)
    logits = head(emb, labels)
    target = cos.gather(1, labels[:, None]).squeeze(1).clamp(-1, 1)
    theta = torch.acos(target)
    expected_t = torch.where(theta + 0.3 < math.pi, torch.cos(theta + 0.3), target - 0.3 * math.sin(0.3))
    torch.testing.assert_close(logits.gather(1, labels[:, None]).squeeze(1), 10.0 * expected_t, rtol=1e-4, atol=1e-4)
    others = torch.ones_like(cos, dtype=torch.bool).scatter(1, labels[:, None], False)
    torch.testing.assert_close(logits[others], 10.0 * cos[others])


def test_ignored_label_gets_no_margin() -> None:
    head = _head(3, 4, k=1, margin=0.5, s=1.0)
    emb = torch.randn(2, 4)
    logits = head(emb, torch.tensor([-1, -1]))
    torch.testing.assert_close(logits, head.cosine(emb))


def test_dynamic_margins_match_formula() -> None:
    counts = [1, 2, 5, 40, 0]
    a, p, b = 0.45, -0.25, 0.05
    got = dynamic_margins(counts, a, p, b)
    expected = torch.tensor([a * max(n, 1) ** p + b for n in counts], dtype=torch.float32)
    torch.testing.assert_close(got, expected)
    assert got[0] > got[3], "rarer classes get the larger margin"


def test_build_heads_margins_and_names() -> None:
    cfg = load_config(sets=["model.embedding_size=16"])
    heads = build_heads(cfg, 4, 2, [1, 3, 9, 0], [10, 3])
    expected = dynamic_margins([1, 3, 9, 0], cfg.loss.margin_a, cfg.loss.margin_p, cfg.loss.margin_b)
    torch.testing.assert_close(heads.individual.margins, expected)
    assert heads.individual.k == cfg.loss.k and heads.species.n_classes == 2
    fixed = build_heads(load_config(sets=["loss.dynamic_margin=false", "loss.type=arcface"]), 4, 2, [1, 3, 9, 0])
    assert fixed.individual.k == 1
    torch.testing.assert_close(fixed.individual.margins, torch.full((4,), cfg.loss.margin_a + cfg.loss.margin_b))
    with pytest.raises(UserError, match="valid"):
        build_heads(load_config(sets=["loss.type=cosface"]), 4, 2, [1, 1, 1, 1])
    assert sorted(HEADS) == ["arcface", "subcenter_arcface"]


def test_combined_loss_step_lowers_loss() -> None:
    torch.manual_seed(0)
    cfg = load_config(sets=["model.embedding_size=16"])
    heads = build_heads(cfg, 6, 2, [2] * 6, [6, 6])
    emb = torch.nn.Parameter(torch.randn(12, 16))
    labels, species = torch.arange(12) % 6, torch.arange(12) % 2
    opt = torch.optim.SGD([emb, *heads.parameters()], lr=0.5)
    before, parts = heads(emb, labels, species)
    assert set(parts) == {"individual", "species"}
    before.backward()
    opt.step()
    after, _ = heads(emb, labels, species)
    assert after.item() < before.item()


def test_heads_run_under_bf16_autocast() -> None:
    """On CUDA stage 02 trains under bf16 autocast; the heads must keep float32 logits there."""
    heads = build_heads(load_config(), 10, 2, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = heads(torch.randn(4, 512), torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
