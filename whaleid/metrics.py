"""MAP@5 as scored by the Happywhale competition, overall and for known and new individuals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NEW_ID = "new_individual"


def average_precision_at_5(predicted: Sequence[str], truth: str) -> float:
    """Precision at the rank of the single true id among the first 5 predictions (0 if absent)."""
    for rank, pid in enumerate(list(predicted)[:5]):
        if pid == truth:
            return 1.0 / (rank + 1)
    return 0.0


def map_at_5(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> float:
    """Mean of `average_precision_at_5` over queries."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    if not truths:
        return float("nan")
    return float(np.mean([average_precision_at_5(p, t) for p, t in zip(predictions, truths)]))


def map5_report(predictions: Sequence[Sequence[str]], truths: Sequence[str]) -> dict:
    """MAP@5 overall, on known individuals and on new ones, with accuracy@1 and counts."""
    ap = np.array([average_precision_at_5(p, t) for p, t in zip(predictions, truths)], dtype=float)
    is_new = np.array([t == NEW_ID for t in truths], dtype=bool)
    top1 = np.array([len(p) > 0 and p[0] == t for p, t in zip(predictions, truths)], dtype=bool)

    def mean(mask: np.ndarray) -> float:
        return float(ap[mask].mean()) if mask.any() else float("nan")

    return {
        "map5": mean(np.ones_like(is_new)),
        "map5_known": mean(~is_new),
        "map5_new": mean(is_new),
        "acc1": float(top1.mean()) if len(top1) else float("nan"),
        "n": int(len(ap)),
        "n_known": int((~is_new).sum()),
        "n_new": int(is_new.sum()),
    }
