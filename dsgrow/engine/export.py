"""An engine's fp32 master weights as a Hugging Face folder (safetensors), from any ZeRO stage.

Every rank calls it (the gather is a collective under ZeRO-3); rank 0 writes, atomically: the
folder appears whole or not at all, and an existing one is replaced only once the new one is
complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..families import mup


def export_hf(engine, dest, tokenizer=None) -> Path:
    """Write `engine.module` (an HF model) with its fp32 master weights to `dest`; returns `dest`.

    `tokenizer`: anything with `save_pretrained` or `save_hf` (dsgrow's own), saved beside it."""
    from ..fileio import write_dir_atomically
    from .runtime import barrier, gather_fp32_state_dict, hf_zero_init, rank_world

    dest = Path(dest)
    sd = gather_fp32_state_dict(engine)
    if rank_world()[0] == 0:
        cfg = engine.module.config
        spec = mup.spec_of_config(cfg)
        if spec is not None:  # muP folded into the weights: plain transformers gives the same logits
            sd, cfg = mup.fold_hf_state_dict(spec, sd), mup.sp_config(cfg)
        with hf_zero_init(None):  # a plain CPU model, even while a ZeRO-3 config is alive
            model = type(engine.module)._from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or any(k not in tied and not k.endswith("lm_head.weight") and "decoder.weight" not in k
                             for k in missing):
            raise RuntimeError(f"export: state dict mismatch, missing {missing}, unexpected {unexpected}")

        def fill(tmp: str) -> None:
            model.save_pretrained(tmp)  # transformers 5 always writes safetensors
            _save_tokenizer(tokenizer, tmp)

        write_dir_atomically(dest, fill)
    barrier()
    return dest


def _save_tokenizer(tokenizer: Optional[object], path: str) -> None:
    if tokenizer is None:
        return
    save = getattr(tokenizer, "save_hf", None) or getattr(tokenizer, "save_pretrained")
    save(path)


__all__ = ["export_hf"]
