"""Training FLOPs of a transformer step: 6 N D plus the attention term.

N counts the matrices every token passes through: the blocks and the LM head (the head's V x D
matmul is real compute, and for small models it dominates). Embedding lookups cost no FLOPs.
The attention score/value matmuls add 12 * layers * hidden * seq_len FLOPs per token (forward
2 x 2 x L x D x T, times 3 for forward + backward), as in Kaplan et al. and Chinchilla.
"""
from __future__ import annotations

from ..families.spec import ModelSpec


def matmul_params(spec: ModelSpec) -> int:
    """Parameters that take part in a matmul per token: blocks (+ head)."""
    return spec.n_params(include_embeddings=False) + spec.vocab_size * spec.hidden


def flops_per_token(spec: ModelSpec, seq_len: int | None = None) -> float:
    """Forward + backward FLOPs for one training token."""
    t = seq_len if seq_len is not None else spec.max_seq_len
    return 6.0 * matmul_params(spec) + 12.0 * spec.layers * spec.hidden * t


def forward_flops_per_token(spec: ModelSpec, seq_len: int | None = None) -> float:
    """FLOPs for one token of a forward alone (scoring, inference): a third of a training token's."""
    return flops_per_token(spec, seq_len) / 3.0

