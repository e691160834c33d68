"""An engine's fp32 master weights as a Hugging Face folder (safetensors), from any ZeRO stage.

Every rank calls it (the gather is a collective under ZeRO-3); rank 0 writes, atomically: the
folder appears whole or not at all, and an existing one is replaced only once the new one is
complete.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch


@contextmanager
def _no_zero_init():
    """Build a plain CPU model even while a HfDeepSpeedConfig is alive (the HF Trainer keeps one):
    otherwise `from_config` on rank 0 alone would enter zero.Init, a collective no other rank joins."""
    from transformers.integrations import deepspeed as hf_ds

    live = hf_ds._hf_deepspeed_config_weak_ref() if hf_ds._hf_deepspeed_config_weak_ref is not None else None
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None:
            hf_ds.set_hf_deepspeed_config(live)


def export_hf(engine, dest, tokenizer=None) -> Path:
    """Write `engine.module` (an HF model) with its fp32 master weights to `dest`; returns `dest`.

    `tokenizer`: anything with `save_pretrained` or `save_hf` (dsgrow's own), saved beside it."""
    from ..fileio import write_dir_atomically
    from .runtime import barrier, gather_fp32_state_dict, rank_world

    dest = Path(dest)
    sd = gather_fp32_state_dict(engine)
    if rank_world()[0] == 0:
        with _no_zero_init():
            model = type(engine.module)._from_config(engine.module.config, dtype=torch.float32)
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
