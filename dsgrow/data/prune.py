"""Data pruning with a trained model: score every training sample, keep a fraction of them.

Scores (`score:`), each per sample (a packed block of seq_len tokens):
- loss: the model's mean next-token cross-entropy over the block (Ankner et al. 2025 use a small
  reference model's perplexity);
- el2n: the mean L2 norm of the error vector softmax(logits) - onehot(target) over the block's
  positions (Paul et al. 2021's EL2N, from one trained model);
- prototype: the self-supervised metric of Sorscher et al. 2022: embed each block (the model's
  last hidden state, mean-pooled over positions, L2-normalised), k-means the embeddings, and
  score by the distance to the nearest centroid (far = hard, near = prototypical);
- random: a seeded uniform draw, no model: the control every other score must beat.

`keep: hard` keeps the highest scores (Sorscher: when data is plentiful), `keep: easy` the lowest
(when it is scarce). `fraction` is the share of samples kept. Ties go to the lower index, so the
kept set is a pure function of the scores.

Data-parallel scoring gives every rank fixed chunks of `batch` samples (chunk c on rank c mod
world): each sample is always scored inside the same chunk, so its score, and the kept set, are
the same bitwise on any world size.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .corpus import DataError

SCORES = ("loss", "el2n", "prototype", "random")
KEEP = ("hard", "easy")
CAUSAL_FAMILIES = ("gpt2", "llama")


@dataclass
class PruneConfig:
    """`stages[i].data.prune` (and `dsgrow prune`'s options)."""

    score: str = "loss"
    """loss | el2n | prototype | random (see the module docstring)."""
    fraction: float = 0.7
    """Share of the training samples kept, in (0, 1]."""
    keep: str = "hard"
    """hard (highest scores) | easy (lowest)."""
    clusters: Optional[int] = None
    """prototype: k of the k-means (default: round(sqrt(samples)), at least 2)."""
    batch: int = 16
    """Samples per scoring forward. Part of the result: a sample is scored inside its chunk."""
    seed: int = 0
    """random's draw and k-means' initialisation."""

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise DataError(f"score: {self.score!r} is not one of {', '.join(SCORES)}")
        if self.keep not in KEEP:
            raise DataError(f"keep: {self.keep!r} is not hard or easy")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 < float(self.fraction) <= 1.0:
            raise DataError(f"fraction must be in (0, 1], got {self.fraction!r}")
        self.fraction = float(self.fraction)
        if self.clusters is not None and (isinstance(self.clusters, bool) or not isinstance(self.clusters, int)
                                          or self.clusters < 2):
            raise DataError(f"clusters must be an integer >= 2, got {self.clusters!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise DataError(f"batch must be a positive integer, got {self.batch!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"seed must be an integer, got {self.seed!r}")

    @property
    def needs_model(self) -> bool:
        return self.score != "random"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_family(family: str, where: str) -> None:
    if family not in CAUSAL_FAMILIES:
        raise DataError(f"{where}: pruning scores blocks with a causal LM ({', '.join(CAUSAL_FAMILIES)}), "
                        f"not {family}")


def lm_forward(model, score: str, device=None) -> Callable[[torch.Tensor], tuple]:
    """`forward(ids) -> (logits, last hidden state or None)` of an HF causal LM (or a DeepSpeed
    engine around one) for `score`: only prototype asks the model for its hidden states."""
    hidden = score == "prototype"

    def forward(ids: torch.Tensor):
        out = model(input_ids=ids if device is None else ids.to(device), output_hidden_states=hidden)
        return out.logits, (out.hidden_states[-1] if hidden else None)

    return forward


# -- per-chunk values ------------------------------------------------------------------------------
def chunk_values(logits: Optional[torch.Tensor], hidden: Optional[torch.Tensor], ids: torch.Tensor,
                 score: str) -> torch.Tensor:
    """Per-sample values of one chunk: a score [b] (loss, el2n) or an embedding [b, H] (prototype)."""
    if score == "prototype":
        e = hidden.float().mean(dim=1)
        return torch.nn.functional.normalize(e, dim=-1).cpu()
    lg = logits[:, :-1].float()
    tgt = ids[:, 1:].to(lg.device)
    if score == "loss":
        ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
        return ce.view(tgt.shape).mean(dim=1).cpu()
    if score == "el2n":
        p = torch.softmax(lg, dim=-1)
        err_sq = (p * p).sum(-1) - 2.0 * p.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) + 1.0
        return err_sq.clamp_min(0.0).sqrt().mean(dim=1).cpu()
    raise DataError(f"score: {score!r} has no per-chunk value")


def chunks_of(n: int, batch: int, rank: int, world: int) -> list[int]:
    """The chunk indices rank scores, padded with -1 so every rank runs the same number of forwards
    (ZeRO-3 gathers parameters collectively inside each forward)."""
    total = math.ceil(n / batch)
    rounds = math.ceil(total / world)
    return [c if c < total else -1 for c in (rank + r * world for r in range(rounds))]


def score_values(forward: Callable[[torch.Tensor], tuple], blocks: torch.Tensor, cfg: PruneConfig,
                 rank: int = 0, world: int = 1, gather: Callable[[object], list] = lambda x: [x]) -> tuple[torch.Tensor, int]:
    """Every sample's value (scores [N] or embeddings [N, H]) on every rank, and the number of
    samples this rank ran forward (padding included, for the FLOPs meter).

    `forward(ids) -> (logits, last_hidden)` runs the model (no grad, eval mode); `gather` is an
    all-gather of Python objects over the data-parallel ranks."""
    n = len(blocks)
    mine, ran = {}, 0
    for c in chunks_of(n, cfg.batch, rank, world):
        ids = blocks[max(c, 0) * cfg.batch:(max(c, 0) + 1) * cfg.batch]  # padding rounds rerun chunk 0
        logits, hidden = forward(ids)
        ran += len(ids)
        if c >= 0:
            mine[c] = chunk_values(logits, hidden, ids, cfg.score)
    merged: dict = {}
    for part in gather(mine):
        merged.update(part)
    return torch.cat([merged[c] for c in range(len(merged))]), ran


def kmeans_distances(emb: torch.Tensor, clusters: Optional[int], seed: int) -> torch.Tensor:
    """Distance of each (normalised) embedding to its nearest k-means centroid (scikit-learn)."""
    from sklearn.cluster import KMeans

    n = len(emb)
    k = clusters or max(2, round(math.sqrt(n)))
    if k > n:
        raise DataError(f"clusters ({k}) exceeds the {n} samples scored")
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(emb.double().numpy())
    return torch.from_numpy(km.transform(emb.double().numpy()).min(axis=1)).float()


def final_scores(values: torch.Tensor, cfg: PruneConfig, n: int) -> torch.Tensor:
    if cfg.score == "random":
        g = np.random.Generator(np.random.PCG64([cfg.seed, 0x9A7E]))
        return torch.from_numpy(g.random(n)).float()
    if cfg.score == "prototype":
        return kmeans_distances(values, cfg.clusters, cfg.seed)
    return values.float()


def select(scores: torch.Tensor, fraction: float, keep: str) -> torch.Tensor:
    """Indices (ascending, int64) of the kept samples: the round(fraction * N) highest scores
    (hard) or lowest (easy), at least one; ties to the lower index."""
    n = len(scores)
    n_keep = max(1, min(n, round(fraction * n)))
    key = -scores if keep == "hard" else scores
    order = torch.sort(key.double(), stable=True).indices  # stable: equal scores in index order
    return torch.sort(order[:n_keep]).values.long()


def kept_digest(kept: torch.Tensor) -> str:
    return hashlib.sha256(kept.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def prune(forward: Optional[Callable], blocks: torch.Tensor, cfg: PruneConfig, rank: int = 0, world: int = 1,
          gather: Callable[[object], list] = lambda x: [x]) -> dict:
    """Score `blocks` and select; returns {scores [N], kept [K], ran (forward samples, this rank)}."""
    if len(blocks) == 0:
        raise DataError("prune: no samples to score")
    if cfg.needs_model:
        values, ran = score_values(forward, blocks, cfg, rank, world, gather)
    else:
        values, ran = None, 0
    scores = final_scores(values, cfg, len(blocks))
    return {"scores": scores, "kept": select(scores, cfg.fraction, cfg.keep), "ran": ran}


# -- files -----------------------------------------------------------------------------------------
def save_result(path, scores: torch.Tensor, kept: torch.Tensor, meta: dict) -> None:
    """scores [N] float32 and kept [K] int64 as safetensors, `meta` (JSON) in its metadata."""
    from safetensors.torch import save

    from ..fileio import atomic_write_bytes

    meta = {**meta, "kept_sha256": kept_digest(kept), "samples": len(scores), "kept_samples": len(kept)}
    atomic_write_bytes(path, save({"scores": scores.float().contiguous(), "kept": kept.long().contiguous()},
                                  metadata={"prune": json.dumps(meta, sort_keys=True)}))


def load_result(path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(scores, kept, meta) of a save_result file; DataError if it is missing or altered."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["prune"])
            scores, kept = f.get_tensor("scores"), f.get_tensor("kept")
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"prune: cannot read {path} ({type(e).__name__}: {e})") from None
    if kept_digest(kept) != meta.get("kept_sha256"):
        raise DataError(f"prune: {path} does not match its own digest (edited or truncated)")
    return scores, kept, meta


def histogram_png(path, scores: torch.Tensor, kept: torch.Tensor, title: str) -> None:
    """A histogram of all scores with the kept ones overlaid (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = scores.double().numpy()
    bins = np.histogram_bin_edges(s, bins=min(60, max(10, len(s) // 20)))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(s, bins=bins, color="0.75", label=f"all ({len(s)})")
    ax.hist(s[kept.numpy()], bins=bins, color="tab:blue", alpha=0.8, label=f"kept ({len(kept)})")
    ax.set_xlabel("score")
    ax.set_ylabel("samples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
