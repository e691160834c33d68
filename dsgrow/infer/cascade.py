"""A scoring cascade: the small model scores every block; only the blocks it is unsure of go to
the large model.

The task is a score per block (the per-token loss, the usual perplexity filter) and the keep /
drop decision it feeds (keep the `fraction` with the highest or lowest scores). The small model's
scores sit on another scale than the large one's, so they are mapped onto it by a least-squares
line fitted on the routed blocks (scored by both). Which blocks are "unsure":
- margin (default): those whose small-model score lies nearest the keep/drop cut (by rank), the
  ones whose decision the small model is least sure of;
- entropy: those with the highest mean predictive entropy under the small model.
Compute: a forward of the small model over every block plus one of the large model over the
routed ones, against one of the large model over every block (forward FLOPs, 2N per token plus
attention, from schedules/flops.py)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..data.corpus import DataError
from ..data.prune import chunk_values, select

ROUTES = ("margin", "entropy")


def loss_and_entropy(forward: Callable, blocks: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block mean next-token loss and mean predictive entropy (nats) under `forward(ids) -> logits`."""
    losses, ents = [], []
    for i in range(0, len(blocks), batch):
        ids = blocks[i:i + batch]
        logits = forward(ids)
        losses.append(chunk_values(logits, None, ids, "loss"))  # pruning's loss score, the same numbers
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        ents.append(-(logp.exp() * logp).sum(-1).mean(1).cpu())
    return torch.cat(losses), torch.cat(ents)


def route(small_loss: torch.Tensor, small_entropy: torch.Tensor, share: float, by: str, fraction: float,
          keep: str) -> torch.Tensor:
    """Indices (ascending) of the `share` of blocks sent to the large model."""
    n = len(small_loss)
    k = max(1, min(n, round(share * n)))
    if by == "entropy":
        order = torch.sort(-small_entropy.double(), stable=True).indices
    elif by == "margin":
        # The cut sits between the kept and the dropped blocks in the small model's ranking.
        rank = torch.empty(n, dtype=torch.float64)
        rank[torch.sort(small_loss.double(), stable=True).indices] = torch.arange(n, dtype=torch.float64)
        cut = n - fraction * n if keep == "hard" else fraction * n
        order = torch.sort((rank + 0.5 - cut).abs(), stable=True).indices
    else:
        raise DataError(f"route: {by!r} is not one of {', '.join(ROUTES)}")
    return torch.sort(order[:k]).values


def calibrate(small: torch.Tensor, large: torch.Tensor) -> tuple[float, float]:
    """(a, b) of the least-squares line large ~ a * small + b."""
    if len(small) < 2 or float(small.double().std()) == 0.0:
        return 1.0, float((large.double() - small.double()).mean())
    x, y = small.double(), large.double()
    a = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return a, float(y.mean() - a * x.mean())


def cascade(small_forward: Callable, large_forward: Callable, blocks: torch.Tensor, share: float,
            by: str = "margin", fraction: float = 0.7, keep: str = "hard", batch: int = 16) -> dict:
    """Scores of every block: the large model's for the routed ones, the small model's mapped onto
    the large one's scale for the rest; and what each model ran."""
    if not 0.0 < share <= 1.0:
        raise DataError(f"--route must be in (0, 1], got {share}")
    s_loss, s_ent = loss_and_entropy(small_forward, blocks, batch)
    routed = route(s_loss, s_ent, share, by, fraction, keep)
    l_loss, _ = loss_and_entropy(large_forward, blocks[routed], batch)
    a, b = calibrate(s_loss[routed], l_loss)
    scores = a * s_loss.double() + b
    scores[routed] = l_loss.double()
    return {"scores": scores.float(), "routed": routed, "small_loss": s_loss, "small_entropy": s_ent,
            "calibration": (a, b), "small_blocks": len(blocks), "large_blocks": len(routed)}


def agreement(scores: torch.Tensor, reference: torch.Tensor, fraction: float, keep: str) -> dict:
    """How far the cascade's scores agree with the large model's own: Spearman's rank correlation
    and the share of blocks given the same keep / drop decision."""
    from scipy.stats import spearmanr

    a, b = select(scores, fraction, keep), select(reference, fraction, keep)
    same_kept = len(set(a.tolist()) & set(b.tolist()))
    n = len(scores)
    same_decision = (2 * same_kept + (n - len(a) - len(b))) / n  # kept by both + dropped by both
    return {"spearman": float(spearmanr(scores.numpy(), reference.numpy()).statistic),
            "decision_agreement": same_decision, "kept_overlap": same_kept / len(b)}
