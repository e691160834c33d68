"""What a batch of token blocks becomes for the model: the family's training objective.

Causal families (gpt2, llama) predict the next token: labels are the inputs (the HF model
shifts). BERT is masked-LM: a sample's mask depends only on (seed, its global position in the
run's sample order), so a resumed run masks exactly as the uninterrupted one; evaluation uses
seed + 1 and the sample's index, a fixed mask per held-out sample, comparable across runs.
"""
from __future__ import annotations

import torch

from ..families.spec import ModelSpec


class Objective:
    def __init__(self, spec: ModelSpec, tokenizer, mlm_probability: float, seed: int, device: torch.device):
        self.causal = spec.causal
        self.tokenizer, self.prob, self.seed, self.device = tokenizer, mlm_probability, seed, device

    def _inputs(self, x: torch.Tensor, seed: int, position: int) -> dict:
        if self.causal:
            x = x.to(self.device)
            return {"input_ids": x, "labels": x}
        from ..data import mlm_mask

        inputs, labels = mlm_mask(x, self.tokenizer, self.prob, seed=seed, position=position)
        return {"input_ids": inputs.to(self.device), "labels": labels.to(self.device)}

    def train_inputs(self, x: torch.Tensor, position: int) -> dict:
        """Blocks `x` whose first sample sits at global sample `position`."""
        return self._inputs(x, self.seed, position)

    def eval_inputs(self, x: torch.Tensor, position: int) -> dict:
        """Held-out blocks `x`, the first being validation sample `position`."""
        return self._inputs(x, self.seed + 1, position)
