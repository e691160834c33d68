"""The from-scratch reference: the target model with the family's own random init (the small
model's weights are not used). What every growth method is measured against.
"""
from __future__ import annotations

from ..families import ModelSpec, build_hf_model, to_canonical


def random_init(small: ModelSpec, canonical: dict, large: ModelSpec, seed: int = 0) -> dict:
    model = build_hf_model(large, seed=seed)
    return to_canonical(large, model.state_dict())


__all__ = ["random_init"]
