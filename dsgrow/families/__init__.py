"""Model families (gpt2, llama, bert): sizes, HF configs, and the canonical layout growth works on."""
from .canonical import (
    canonical_keys,
    canonical_shapes,
    from_canonical,
    norm_position,
    to_canonical,
    validate_canonical,
)
from .hf_io import build_hf_model, hf_model_class, load_hf_dir, logits, save_hf_dir
from .spec import FAMILIES, ModelSpec, SpecError

__all__ = [
    "FAMILIES", "ModelSpec", "SpecError",
    "canonical_keys", "canonical_shapes", "validate_canonical", "norm_position",
    "to_canonical", "from_canonical",
    "build_hf_model", "hf_model_class", "load_hf_dir", "save_hf_dir", "logits",
]
