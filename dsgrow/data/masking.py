"""BERT's masked-LM corruption, reproducible per sample."""
from __future__ import annotations

import hashlib

import torch

IGNORE_INDEX = -100  # what HF's cross-entropy skips


def sample_seed(seed: int, position: int) -> int:
    digest = hashlib.sha256(f"dsgrow-mlm:{seed}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mlm_mask(input_ids: torch.Tensor, tokenizer, prob: float = 0.15, seed: int = 0,
             position: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for masked-LM: each maskable token is selected with probability `prob`;
    a selected token becomes <mask> 80% of the time, a random token 10%, itself 10%. Labels hold
    the original id where selected and -100 elsewhere.

    Row i draws from its own generator seeded by (seed, position + i), with `position` the global
    stream position of row 0. So a sample's mask depends only on where it sits in the stream, not
    on the micro-batch, rank count, global RNG state or whether the run was resumed; a sample met
    again in a later epoch sits at a new position and gets a fresh mask (dynamic masking)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"mlm_mask: prob must be in (0, 1), got {prob}")
    ids = input_ids.detach().cpu().long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    rows, length = ids.shape
    special = torch.tensor(tokenizer.special_ids, dtype=torch.long)
    # Random replacements are drawn from the ids after the special block: text pieces only.
    low = int(special.max()) + 1
    u = torch.empty(rows, length)
    kind = torch.empty(rows, length)
    rand_ids = torch.empty(rows, length, dtype=torch.long)
    for r in range(rows):
        g = torch.Generator().manual_seed(sample_seed(seed, position + r))
        u[r] = torch.rand(length, generator=g)
        kind[r] = torch.rand(length, generator=g)
        rand_ids[r] = torch.randint(low, tokenizer.vocab_size, (length,), generator=g)
    selected = (u < prob) & ~torch.isin(ids, special)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    inputs = ids.clone()
    inputs[selected & (kind < 0.8)] = tokenizer.mask_id
    swap = selected & (kind >= 0.8) & (kind < 0.9)
    inputs[swap] = rand_ids[swap]
    shape, device = input_ids.shape, input_ids.device
    return inputs.view(shape).to(device), labels.view(shape).to(device)
