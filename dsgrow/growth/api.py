"""`grow` and `grow_canonical`: one entry point for every growth method."""
from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Callable, Optional

import torch

from ..families import ModelSpec, build_hf_model, from_canonical, to_canonical, validate_canonical
from .cards import CARDS
from .depth import DEPTH_KINDS
from .fit import FIT_OPTIONS, check_fit_options, check_mask_token_id, fit_ligo, heldout_loss
from .hyperclone import hyperclone, hyperclone_growth
from .interpolate import interpolate, interpolate_growth
from .ligo import INITS, LiGO, check_ligo
from .net2net import aki, aki_growth, fpi, fpi_growth
from .ops import GrowthError, check_growth, resolve_target
from .random_init import random_init
from .stack import stack, stack_growth


@dataclasses.dataclass(frozen=True)
class Method:
    fn: Callable          # (small, canonical, large, **opts) -> large canonical
    card: str
    integer_fields: tuple = ()  # sizes this method grows by integer multiples only
    copies: bool = True   # width by copy maps: every old head must fit a new kv group
    # Same arguments as fn; a depth.FixedGrowth that makes the large model one layer at a time
    # (None, or returning None: only the whole dict, e.g. hyperclone's noise, random init).
    growth: Optional[Callable] = None


METHODS: dict[str, Method] = {
    "fpi": Method(fpi, CARDS["fpi"], growth=fpi_growth),
    "aki": Method(aki, CARDS["aki"], growth=aki_growth),
    "hyperclone": Method(hyperclone, CARDS["hyperclone"], ("hidden", "heads", "kv_heads", "ffn"),
                         growth=hyperclone_growth),
    "stack": Method(stack, CARDS["stack"], ("layers",), growth=stack_growth),
    "interpolate": Method(interpolate, CARDS["interpolate"], growth=interpolate_growth),
    "random": Method(random_init, CARDS["random"], copies=False),
}
CHOICES = {"select": ("even", "random"), "depth": DEPTH_KINDS, "mode": ("stack", "interleave")}


def _check_fixed(method: str, small: ModelSpec, large: ModelSpec, opts: dict) -> None:
    o = {**_options(METHODS[method].fn), **opts}
    for name, choices in CHOICES.items():
        if name in o and o[name] not in choices:
            raise GrowthError(f"{method}: {name} must be one of {', '.join(choices)}, got {o[name]!r}")
    if "noise" in o and (not isinstance(o["noise"], (int, float)) or o["noise"] < 0):
        raise GrowthError(f"{method}: noise must be a number >= 0, got {o['noise']!r}")
    if not isinstance(o.get("seed", 0), int):
        raise GrowthError(f"{method}: seed must be an integer, got {o['seed']!r}")
    fields = METHODS[method].integer_fields
    if o.get("depth") in ("stack", "interleave"):
        fields += ("layers",)
    check_growth(small, large, method if "depth" not in opts else f"{method} with depth={o['depth']}",
                 copy_heads=METHODS[method].copies, integer_fields=[f for f in fields if f != "layers"],
                 integer_layers="layers" in fields)


# LiGO's own options (its fitting options are fit.FIT_OPTIONS).
LIGO_OPTIONS = {"init": "stack_noisy", "tying": None, "noise": 0.03, "seed": 0, "depth_init": None}
ALL_METHODS = ("ligo",) + tuple(METHODS)


def _options(fn: Callable) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect._empty}


def method_options(method: str) -> dict:
    """Options a method takes, with their defaults."""
    if method == "ligo":
        return {**LIGO_OPTIONS, **FIT_OPTIONS}
    if method not in METHODS:
        raise GrowthError(f"unknown growth method {method!r} (choose from {', '.join(ALL_METHODS)})")
    return _options(METHODS[method].fn)


def check_request(small: ModelSpec, large: ModelSpec, method: str, fit_steps: int = 0,
                  mask_token_id: Optional[int] = None, **opts) -> None:
    """Every check of a growth request, done before any work (GrowthError, one line)."""
    if not isinstance(method, str) or method not in ALL_METHODS:
        raise GrowthError(f"unknown growth method {method!r} (choose from {', '.join(ALL_METHODS)})")
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
        raise GrowthError(f"fit_steps must be an integer >= 0, got {fit_steps!r}")
    if fit_steps and method != "ligo":
        raise GrowthError(f"{method} has nothing to fit (fit_steps={fit_steps}); only ligo fits")
    known = method_options(method)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise GrowthError(f"{method}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    check_mask_token_id(small, mask_token_id)
    if method == "ligo":
        check_ligo(small, large, opts.get("init", "stack_noisy"), opts.get("tying"), opts.get("depth_init"))
        check_fit_options(small, **{k: v for k, v in opts.items() if k not in LIGO_OPTIONS})
    else:
        _check_fixed(method, small, large, opts)


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
        raise GrowthError("ligo: fit_steps > 0 needs data")
    info: dict[str, Any] = {"method": method, "options": dict(opts), "small": spec_small.to_dict(),
                            "large": spec_large.to_dict(), "fit_steps": fit_steps}
    mlm = {"mlm_fn": mlm_fn, "mask_token_id": mask_token_id}

    def evaluate(spec, canonical):
        return heldout_loss(spec, canonical, eval_data, mlm_prob=opts.get("mlm_prob", 0.15), **mlm)

    if eval_data is not None:
        info["loss_small"] = evaluate(spec_small, canonical_small)
    t0 = time.perf_counter()
    if method == "ligo":
        lopts = {k: opts[k] for k in LIGO_OPTIONS if k in opts}
        fopts = {k: v for k, v in opts.items() if k not in LIGO_OPTIONS}
        op = LiGO(spec_small, canonical_small, spec_large, **lopts)
        info["operator_params"] = op.n_params()
        if eval_data is not None:
            info["loss_grown_init"] = evaluate(spec_large, op.materialize())
        if fit_steps > 0:
            info["fit"] = dataclasses.asdict(fit_ligo(op, data, fit_steps, seed=lopts.get("seed", 0), **mlm, **fopts))
        out = op.materialize()
    else:
        with torch.no_grad():
            out = METHODS[method].fn(spec_small, canonical_small, spec_large, **opts)
        out = {k: t.detach().contiguous() for k, t in out.items()}
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


__all__ = ["grow", "grow_canonical", "check_request", "method_options", "METHODS", "ALL_METHODS", "INITS"]
