"""Growth operators on the canonical layout (pure torch): LiGO (learned), FPI/AKI (bert2BERT),
Net2Net identity depth (fpi's depth="identity"), HyperCloning, stacking (StackBERT/G_stack), interpolation, and the random
from-scratch reference. Every family (gpt2, llama, bert) gets every operator.

    from dsgrow.growth import grow
    large = grow(small_hf_model, {"layers": 4, "hidden": 128}, method="ligo", data=blocks, fit_steps=100)

`REGISTRY` holds one `GrowthMethod` per method (options, checks, layer-at-a-time builder, fit,
optimizer transfer, card); `CARDS` describes each method; `GrowthError` (a ValueError) is raised, before any work, for a
request that cannot be carried out.
"""
from .api import ALL_METHODS, check_request, grow, grow_canonical, method_options
from .cards import CARDS, PAPER_FORMS
from .fit import FitReport, fit_ligo, heldout_loss
from .hyperclone import hyperclone
from .interpolate import interpolate
from .ligo import INITS, LiGO
from .net2net import aki, fpi
from .ops import GrowthError, resolve_target
from .random_init import random_init
from .registry import REGISTRY, FitRequest, GrowthMethod, get_method, register
from .report import GrowthReport, PhaseReport
from .stack import stack

__all__ = [
    "grow", "grow_canonical", "check_request", "method_options", "ALL_METHODS", "CARDS", "PAPER_FORMS",
    "REGISTRY", "GrowthMethod", "FitRequest", "get_method", "register", "GrowthReport", "PhaseReport",
    "GrowthError", "resolve_target", "LiGO", "INITS", "fit_ligo", "heldout_loss", "FitReport",
    "fpi", "aki", "hyperclone", "stack", "interpolate", "random_init",
]
