"""A resumable, batch-size-independent order over sample indices."""
from __future__ import annotations

import hashlib

import torch

from .corpus import DataError


def epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed per (seed, epoch); hashed so that nearby pairs give unrelated orders."""
    digest = hashlib.sha256(f"dsgrow-stream:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SampleStream:
    """The infinite sequence perm_0 ++ perm_1 ++ ... with perm_e a seeded permutation of
    range(n_samples). The only state is `position` (samples consumed over all ranks), so the k-th
    sample is the same whatever batch sizes consumed the first k-1, and a run resumed from
    `position` continues the order exactly."""

    def __init__(self, n_samples: int, seed: int, position: int = 0):
        if n_samples < 1:
            raise DataError(f"data: a sample stream needs at least one sample, got n_samples={n_samples}")
        if position < 0:
            raise DataError(f"data: stream position must be >= 0, got {position}")
        self.n_samples, self.seed, self._position = int(n_samples), int(seed), int(position)
        self._perm_epoch, self._perm = -1, None

    @property
    def position(self) -> int:
        return self._position

    @property
    def epoch(self) -> int:
        return self._position // self.n_samples

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:  # one permutation is kept: batches walk epochs in order
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n_samples, generator=g), epoch
        return self._perm

    def next_indices(self, global_batch: int) -> torch.Tensor:
        """The next `global_batch` sample indices (int64), crossing epoch boundaries as needed."""
        if global_batch < 1:
            raise DataError(f"data: global batch must be >= 1, got {global_batch}")
        parts, need = [], int(global_batch)
        while need:
            epoch, offset = divmod(self._position, self.n_samples)
            take = min(need, self.n_samples - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            self._position += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"n_samples": self.n_samples, "seed": self.seed, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kept_sha256") != getattr(self, "kept_sha256", None):
            raise DataError("data: the checkpoint's sample stream draws from another kept set than this one "
                            "(a pruned stage's kept list changed or is missing)")
        # A different sample count or seed means a different order: resuming would silently
        # revisit or skip data, so it is refused rather than followed.
        for field in ("n_samples", "seed"):
            if int(state[field]) != getattr(self, field):
                raise DataError(f"data: stream state has {field}={state[field]} but this run has "
                                f"{getattr(self, field)} (the corpus, split, seq_len or seed changed since the checkpoint)")
        if int(state["position"]) < 0:
            raise DataError(f"data: stream state has negative position {state['position']}")
        self._position = int(state["position"])

    def __repr__(self) -> str:
        return f"SampleStream(n_samples={self.n_samples}, seed={self.seed}, position={self._position})"


class SubsetStream(SampleStream):
    """A SampleStream over a kept subset of the samples (a pruned stage): the order is a seeded
    permutation of the kept indices per epoch, with the same `position` arithmetic, so it is as
    resumable and batch-size independent as the full stream."""

    def __init__(self, kept: torch.Tensor, seed: int, position: int = 0):
        from .prune import kept_digest

        super().__init__(len(kept), seed, position)
        self.kept = kept.long()
        self.kept_sha256 = kept_digest(self.kept)

    def next_indices(self, global_batch: int) -> torch.Tensor:
        return self.kept[super().next_indices(global_batch)]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kept_sha256": self.kept_sha256}

    def __repr__(self) -> str:
        return f"SubsetStream(kept={self.n_samples}, seed={self.seed}, position={self._position})"


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank's contiguous, equal slice of a global batch."""
    n = len(indices)
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"data: rank {rank} is outside a world of {world}")
    if n % world:
        raise DataError(f"data: a global batch of {n} samples does not split evenly over {world} ranks")
    k = n // world
    return indices[rank * k:(rank + 1) * k]
