"""`grow` and `grow_canonical`: one entry point for every growth method."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import torch

from ..families import ModelSpec, SpecError, build_hf_model, from_canonical, to_canonical, validate_canonical
from .fit import check_mask_token_id, heldout_loss
from .ligo import INITS
from .ops import GrowthError, resolve_target
from .registry import REGISTRY, FitRequest, get_method
from .stream import collect_stream
from .registry import check_request as _check_request


ALL_METHODS = tuple(REGISTRY)


def method_options(method: str) -> dict:
    """Options a method takes, with their defaults."""
    return dict(get_method(method).options)


def check_request(small: ModelSpec, large: ModelSpec, method: str, fit_steps: int = 0,
                  mask_token_id: Optional[int] = None, **opts) -> None:
    """Every check of a growth request, done before any work (GrowthError, one line)."""
    _check_request(small, large, method, fit_steps, **opts)
    check_mask_token_id(small, mask_token_id)


def resolve_any_target(small: ModelSpec, target) -> ModelSpec:
    """A dict of sizes, a ModelSpec, an HF config, or a local HF config dir / config.json."""
    if isinstance(target, (str, os.PathLike)):
        import transformers as tf

        path = str(target)
        if path.endswith("config.json"):
            path = os.path.dirname(path) or "."
        if not os.path.isdir(path):
            raise GrowthError(f"target {target}: no such config directory")
        target = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(target, "model_type") and hasattr(target, "to_dict"):
        try:
            target = ModelSpec.from_hf_config(target)
        except SpecError as e:
            raise GrowthError(f"target: {e}") from None
    return resolve_target(small, target)


def _as_small(small_model) -> tuple[ModelSpec, dict]:
    if isinstance(small_model, tuple) and len(small_model) == 2 and isinstance(small_model[0], ModelSpec):
        spec, canonical = small_model
        validate_canonical(spec, canonical)
        return spec, canonical
    if isinstance(small_model, torch.nn.Module) and hasattr(small_model, "config"):
        try:
            spec = ModelSpec.from_hf_config(small_model.config)
        except ValueError as e:
            raise GrowthError(f"small model: {e}") from None
        return spec, to_canonical(spec, small_model.state_dict())
    raise GrowthError(f"small model must be a Hugging Face model or (ModelSpec, canonical), "
                      f"got {type(small_model).__name__}")


def grow_canonical(spec_small: ModelSpec, canonical_small: dict, spec_large, method: str = "ligo",
                   data=None, fit_steps: int = 0, eval_data=None, mlm_fn: Optional[Callable] = None,
                   mask_token_id: Optional[int] = None, return_info: bool = False, **opts):
    """Grow a canonical model; returns the large canonical dict (and an info dict if asked).

    `spec_large`: a ModelSpec or a dict of sizes (ops.resolve_target). For "ligo", `data` feeds
    the fit (fit.fit_ligo) when fit_steps > 0; the other methods take no data. With `eval_data`
    (token blocks [M, T] or batches) the info dict gets held-out losses of the small model, of the
    grown model before fitting and after. BERT batches without labels are masked with
    `mlm_fn(input_ids, position)` or, given `mask_token_id`, with dsgrow.data.mlm_mask
    (see fit.make_masker). The large tensors
    are always fresh (never views of the small ones).
    """
    spec_large = resolve_target(spec_small, spec_large)
    check_request(spec_small, spec_large, method, fit_steps, mask_token_id, **opts)
    validate_canonical(spec_small, canonical_small)
    if fit_steps and data is None:
        raise GrowthError(f"{method}: fit_steps > 0 needs data")
    info: dict[str, Any] = {"method": method, "options": dict(opts), "small": spec_small.to_dict(),
                            "large": spec_large.to_dict(), "fit_steps": fit_steps}
    mlm = {"mlm_fn": mlm_fn, "mask_token_id": mask_token_id}

    def evaluate(spec, canonical):
        return heldout_loss(spec, canonical, eval_data, mlm_prob=opts.get("mlm_prob", 0.15), **mlm)

    if eval_data is not None:
        info["loss_small"] = evaluate(spec_small, canonical_small)
    t0 = time.perf_counter()
    entry = get_method(method)

    def before_fit(op) -> None:  # a learned operator: its size, and its starting point's loss if asked
        info["operator_params"] = sum(p.numel() for p in op.parameters())
        if eval_data is not None:
            with torch.no_grad():
                info["loss_grown_init"] = evaluate(spec_large, op.materialize())

    # The same streamed builder the sharded growth of a live engine writes from (growth/registry.py).
    fit = FitRequest(fit_steps, data, mlm_fn=mlm_fn, mask_token_id=mask_token_id, before_fit=before_fit)
    built = entry.stream(spec_small, canonical_small, spec_large, opts, fit)
    if built.fit is not None:
        info["fit"] = dataclasses.asdict(built.fit)
    out = collect_stream(spec_large, built.stream)
    del built
    info["grow_wall_s"] = time.perf_counter() - t0
    validate_canonical(spec_large, out)
    if eval_data is not None:
        info["loss_grown"] = evaluate(spec_large, out)
        info.setdefault("loss_grown_init", info["loss_grown"])
    return (out, info) if return_info else out


def grow(small_model, target, method: str = "ligo", data=None, fit_steps: int = 0, eval_data=None,
         mlm_fn: Optional[Callable] = None, mask_token_id: Optional[int] = None, return_info: bool = False, **opts):
    """Grow a Hugging Face model (GPT-2, LLaMA or BERT) into a larger one of the same family.

    `small_model`: an HF model, or (ModelSpec, canonical). `target`: a ModelSpec or a dict of
    sizes (layers, hidden, heads, kv_heads, ffn); see ops.resolve_target for what missing sizes
    become. `data` (LiGO fitting): a LongTensor [N, T] of token blocks, an iterable or a callable
    giving batches (LongTensor [B, T], or dicts with input_ids and, for BERT, MLM labels).
    `eval_data`, `mlm_fn`, `mask_token_id`: see `grow_canonical`. Returns the large HF model in
    eval mode (and an info dict with `return_info=True`: losses, fit FLOPs and wall time).
    """
    spec_small, canonical_small = _as_small(small_model)
    spec_large = resolve_target(spec_small, target)
    check_request(spec_small, spec_large, method, fit_steps, mask_token_id, **opts)
    canonical_large, info = grow_canonical(spec_small, canonical_small, spec_large, method, data, fit_steps,
                                           eval_data, mlm_fn, mask_token_id, return_info=True, **opts)
    model = build_hf_model(spec_large)
    model.load_state_dict(from_canonical(spec_large, canonical_large), strict=True)
    model.eval()
    return (model, info) if return_info else model


__all__ = ["grow", "grow_canonical", "resolve_any_target", "check_request", "method_options", "ALL_METHODS", "INITS"]
