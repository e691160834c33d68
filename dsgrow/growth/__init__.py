"""Growth operators on the canonical layout (pure torch): LiGO (learned), FPI/AKI (bert2BERT),
Net2Net identity depth (fpi's depth="identity"), HyperCloning, stacking (StackBERT/G_stack), interpolation, and the random
from-scratch reference. Every family (gpt2, llama, bert) gets every operator.

    from dsgrow.growth import grow
    large = grow(small_hf_model, {"layers": 4, "hidden": 128}, method="ligo", data=blocks, fit_steps=100)

`CARDS` describes each method; `GrowthError` (a ValueError) is raised, before any work, for a
request that cannot be carried out.
"""
from .api import ALL_METHODS, METHODS, check_request, grow, grow_canonical, method_options
from .cards import CARDS
from .fit import FitReport, fit_ligo, heldout_loss
from .hyperclone import hyperclone
from .interpolate import interpolate
from .ligo import INITS, LiGO
from .net2net import aki, fpi
from .ops import GrowthError, resolve_target
from .random_init import random_init
from .stack import stack

__all__ = [
    "grow", "grow_canonical", "check_request", "method_options", "METHODS", "ALL_METHODS", "CARDS",
    "GrowthError", "resolve_target", "LiGO", "INITS", "fit_ligo", "heldout_loss", "FitReport",
    "fpi", "aki", "hyperclone", "stack", "interpolate", "random_init",
]
