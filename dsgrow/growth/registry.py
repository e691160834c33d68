"""Growth methods as a registry: one entry per method, everything about it in one place.

An entry says which options the method takes (with their defaults, written only here), how a
request is checked before any work, how the large model is made one large layer at a time
(`stream`, what a sharded write consumes), whether it learns from data (`fits`: LiGO's fit, whose
tokens count in a stage), whether Adam's moments have an exact image (`transfer`) and its card.
Callers (`grow`, `grow_engine`, the trainer, the offline `dsgrow grow`, the recipe checks) ask the
entry; none of them branches on a method's name.

A new method is one `register(GrowthMethod(...))`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..families import ModelSpec
from .cards import CARDS
from .depth import DEPTH_KINDS
from .fit import FIT_OPTIONS, check_fit_options, fit_ligo
from .hyperclone import hyperclone, hyperclone_growth
from .interpolate import interpolate, interpolate_growth
from .ligo import LiGO, check_ligo
from .net2net import aki, aki_growth, fpi, fpi_growth
from .ops import GrowthError, check_growth
from .random_init import random_init
from .stack import stack, stack_growth


@dataclass
class FitRequest:
    """Data and hooks for a method that learns (LiGO's fit); ignored by the others."""

    steps: int = 0
    data: Any = None
    """Blocks [N, T], an iterable of model-input dicts, or a callable step -> batch (fit.batches)."""
    device: Optional[torch.device] = None
    grad_hook: Optional[Callable[[list], None]] = None
    """Runs on the operator's gradients after each backward (data-parallel averaging)."""
    mlm_fn: Optional[Callable] = None
    mask_token_id: Optional[int] = None
    on_fitted: Optional[Callable[[Any], None]] = None
    """Called with the fitted operator (e.g. to save it) before the large model is made."""
    before_fit: Optional[Callable[[Any], None]] = None
    """Called with the operator before its fit (e.g. to score its starting point)."""


@dataclass
class Built:
    """What `GrowthMethod.stream` made: the large model's tensors by HF name, one layer at a time."""

    stream: Any                  # growth.stream.LayerStream
    fit: Optional[Any] = None    # fit.FitReport of a method that learned
    operator_bytes: Optional[int] = None


@dataclass(frozen=True)
class GrowthMethod:
    name: str
    card: str
    options: dict
    """Every option the method takes, with its default."""
    check: Callable[[ModelSpec, ModelSpec, dict], None]
    """(small, large, options given) -> None or GrowthError; run before any work."""
    build: Callable[..., dict]
    """(small, canonical, large, **options) -> the whole large canonical dict."""
    layerwise: Optional[Callable] = None
    """Same arguments as build; a depth.FixedGrowth that makes one large layer at a time (or None)."""
    fits: bool = False
    """Learns from data (fit_steps > 0 allowed; the fit's tokens count in a stage)."""
    transfer: bool = False
    """Adam's moments have an exact image (function-preserving copy maps; growth/moments.py)."""
    streamer: Optional[Callable] = None
    """(small, canonical, large, options, FitRequest) -> Built; default: `layerwise` or `build`."""
    make_operator: Optional[Callable] = None
    """A method that fits: (small, canonical, large, options) -> (operator module, fit options)."""

    def stream(self, small: ModelSpec, canonical: dict, large: ModelSpec, opts: dict,
               fit: Optional[FitRequest] = None) -> Built:
        if small.mup:
            # Operators (and LiGO's fit) work on the SP model with the same function: the small
            # model folded in, the large one's readout multiplier taken back out. Function
            # preservation in SP is then function preservation under muP.
            from ..families import mup

            small_sp, canonical = mup.fold(small, canonical)
            built = self._stream(small_sp, canonical, large.as_sp(), opts, fit)
            mup.unfold_stream(large, built.stream)
            built.stream.spec = large
            return built
        return self._stream(small, canonical, large, opts, fit)

    def _stream(self, small: ModelSpec, canonical: dict, large: ModelSpec, opts: dict,
                fit: Optional[FitRequest] = None) -> Built:
        from .stream import canonical_stream, fixed_layer_stream

        if self.streamer is not None:
            return self.streamer(small, canonical, large, opts, fit or FitRequest())
        fixed = self.layerwise(small, canonical, large, **opts) if self.layerwise is not None else None
        if fixed is not None:
            return Built(fixed_layer_stream(large, fixed))
        with torch.no_grad():
            whole = self.build(small, canonical, large, **opts)
        return Built(canonical_stream(large, {k: t.detach().contiguous() for k, t in whole.items()}))

    def fit_tokens(self, steps: int, blocks_per_step: int, seq_len: int) -> int:
        return steps * blocks_per_step * seq_len if self.fits else 0


REGISTRY: dict[str, GrowthMethod] = {}


def register(method: GrowthMethod) -> GrowthMethod:
    REGISTRY[method.name] = method
    return method


def get_method(name) -> GrowthMethod:
    if not isinstance(name, str) or name not in REGISTRY:
        raise GrowthError(f"unknown growth method {name!r} (choose from {', '.join(REGISTRY)})")
    return REGISTRY[name]


# -- the closed-form (copy and mix) operators ---------------------------------------------------
CHOICES = {"select": ("even", "random"), "depth": DEPTH_KINDS, "mode": ("stack", "interleave")}


def _defaults(fn: Callable) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect._empty}


def _fixed_check(name: str, integer_fields: tuple = (), copies: bool = True):
    def check(small: ModelSpec, large: ModelSpec, opts: dict) -> None:
        o = {**REGISTRY[name].options, **opts}
        for key, choices in CHOICES.items():
            if key in o and o[key] not in choices:
                raise GrowthError(f"{name}: {key} must be one of {', '.join(choices)}, got {o[key]!r}")
        if "noise" in o and (not isinstance(o["noise"], (int, float)) or o["noise"] < 0):
            raise GrowthError(f"{name}: noise must be a number >= 0, got {o['noise']!r}")
        if not isinstance(o.get("seed", 0), int):
            raise GrowthError(f"{name}: seed must be an integer, got {o['seed']!r}")
        fields = integer_fields + (("layers",) if o.get("depth") in ("stack", "interleave") else ())
        check_growth(small, large, name if "depth" not in opts else f"{name} with depth={o['depth']}",
                     copy_heads=copies, integer_fields=[f for f in fields if f != "layers"],
                     integer_layers="layers" in fields)
    return check


def _fixed(name: str, fn: Callable, layerwise: Optional[Callable] = None, integer_fields: tuple = (),
           copies: bool = True, transfer: bool = False) -> GrowthMethod:
    return register(GrowthMethod(name, CARDS[name], _defaults(fn), _fixed_check(name, integer_fields, copies), fn,
                                 layerwise, transfer=transfer))


# -- LiGO: a learned operator, fitted on data, then applied one large layer at a time -------------
LIGO_OPTIONS = {"init": "stack_noisy", "tying": None, "noise": 0.03, "seed": 0, "depth_init": None,
                "symmetry_noise": 0.0}


def split_ligo_options(opts: dict) -> tuple[dict, dict]:
    """(the operator's own options, the fit's options)."""
    return ({k: v for k, v in opts.items() if k in LIGO_OPTIONS},
            {k: v for k, v in opts.items() if k not in LIGO_OPTIONS})


def _ligo_check(small: ModelSpec, large: ModelSpec, opts: dict) -> None:
    own, fit = split_ligo_options(opts)
    check_ligo(small, large, own.get("init", "stack_noisy"), own.get("tying"), own.get("depth_init"),
               own.get("symmetry_noise", 0.0))
    check_fit_options(small, **fit)


def _ligo_operator(small: ModelSpec, canonical: dict, large: ModelSpec, opts: dict) -> tuple[LiGO, dict]:
    own, fopts = split_ligo_options(opts)
    return LiGO(small, canonical, large, **own), {"seed": own.get("seed", 0), **fopts}


def _ligo_build(small: ModelSpec, canonical: dict, large: ModelSpec, **opts) -> dict:
    return _ligo_operator(small, canonical, large, opts)[0].materialize()


def _ligo_stream(small: ModelSpec, canonical: dict, large: ModelSpec, opts: dict, fit: FitRequest) -> Built:
    from .stream import ligo_stream

    op, fopts = REGISTRY["ligo"].make_operator(small, canonical, large, opts)
    if fit.device is not None:
        op = op.to(fit.device)
    report = None
    if fit.before_fit is not None:
        fit.before_fit(op)
    if fit.steps:
        if fit.data is None:
            raise GrowthError("ligo: fit_steps > 0 needs data")
        report = fit_ligo(op, fit.data, fit.steps, grad_hook=fit.grad_hook,
                          mlm_fn=fit.mlm_fn, mask_token_id=fit.mask_token_id, device=fit.device, **fopts)
    if fit.on_fitted is not None:
        fit.on_fitted(op)
    size = sum(p.numel() * p.element_size() for p in op.parameters())
    return Built(ligo_stream(op), report, size)  # the stream keeps the operator alive until written


register(GrowthMethod("ligo", CARDS["ligo"], {**LIGO_OPTIONS, **FIT_OPTIONS}, _ligo_check, _ligo_build,
                      fits=True, streamer=_ligo_stream, make_operator=_ligo_operator))
_fixed("fpi", fpi, fpi_growth, transfer=True)
_fixed("aki", aki, aki_growth)
_fixed("hyperclone", hyperclone, hyperclone_growth, ("hidden", "heads", "kv_heads", "ffn"), transfer=True)
_fixed("stack", stack, stack_growth, ("layers",))
_fixed("interpolate", interpolate, interpolate_growth)
_fixed("random", random_init, copies=False)


def check_request(small: ModelSpec, large: ModelSpec, method: str, fit_steps: int = 0, **opts) -> GrowthMethod:
    """Every check of a growth request, done before any work (GrowthError, one line)."""
    m = get_method(method)
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
        raise GrowthError(f"fit_steps must be an integer >= 0, got {fit_steps!r}")
    if fit_steps and not m.fits:
        raise GrowthError(f"{method} has nothing to fit (fit_steps={fit_steps}); "
                          f"methods that fit: {', '.join(n for n, e in REGISTRY.items() if e.fits)}")
    unknown = sorted(set(opts) - set(m.options))
    if unknown:
        raise GrowthError(f"{method}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(m.options))})")
    m.check(small, large, opts)
    return m


__all__ = ["GrowthMethod", "FitRequest", "Built", "REGISTRY", "register", "get_method", "check_request",
           "LIGO_OPTIONS", "split_ligo_options"]
