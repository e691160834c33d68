"""muP (maximal update parametrisation, Yang et al., Tensor Programs V) on the HF models dsgrow trains.

With `model: {parametrization: mup, base_hidden: B}` and width multiplier m = hidden / B:

* hidden matrices (q, k, v, o, gate, up, down, BERT's MLM transform): init std divided by sqrt(m),
  Adam LR divided by m (param group key ``lr_scale``);
* vector-like tensors (embeddings, biases, norm gains) and the readout: init and LR unchanged;
* readout: the LM head reads its input divided by m (the `mup` package's MuReadout, which also
  leaves the head's bias alone); a tied head is the token embedding read the same way;
* attention: q.k times sqrt(base_head_dim) / head_dim (muP's 1/d, equal to SP's 1/sqrt(d) at the
  base head_dim).

At m = 1 (and head_dim = base_head_dim) a muP model is exactly the SP model of the same seed, so
settings tuned on the base model in SP carry over. The multipliers are set on the built module
(`install`) from its HF config's `dsgrow_mup` attribute, so every path that builds a model from a
config (fresh, ZeRO-3's zero.Init, a growth's large model) gets them; the LR multipliers travel in
the optimizer's param groups (``lr_scale``, ``mup``), never in parameter attributes, which ZeRO
replaces (microsoft/mup issue #59). `fold` turns a muP canonical model into the SP one with the same
function (the head's 1/m into the norm that feeds it, the attention factor into q): exports and
growth operators work on that.
"""
from __future__ import annotations

import math

import torch

from .spec import MUP_CONFIG_KEY, ModelSpec, SpecError

# HF parameter names of the vector-like matrices: embeddings and the LM head (their width is only
# one of their two dimensions, so muP gives them the base LR).
_VECTOR_LIKE = ("wte.", "wpe.", "embed_tokens.", "word_embeddings.", "position_embeddings.",
                "token_type_embeddings.", "lm_head.", "predictions.decoder.")
# Canonical tensors the LM head reads (fold target of the readout multiplier).
HEAD_IN = {"gpt2": ("final_norm.weight", "final_norm.bias"), "llama": ("final_norm.weight",),
           "bert": ("mlm.norm.weight", "mlm.norm.bias")}
HEAD_IN_HF = {"gpt2": ("transformer.ln_f.weight", "transformer.ln_f.bias"), "llama": ("model.norm.weight",),
              "bert": ("cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias")}


def spec_of_config(cfg) -> ModelSpec | None:
    """The muP spec of an HF config, or None for a standard-parametrisation one."""
    if getattr(cfg, MUP_CONFIG_KEY, None) is None:
        return None
    return ModelSpec.from_hf_config(cfg)


def is_hidden(name: str, shape) -> bool:
    """Whether HF parameter `name` is a hidden (matrix-like) weight: both dimensions grow with width."""
    return len(shape) == 2 and not any(v in name for v in _VECTOR_LIKE)


def _readout_input(module, args):
    # A forward pre-hook: x / m into the head. The multiplier is read off the module so a
    # reinstall (another width) updates it; hooks are not saved with weights.
    return (args[0] * module._dsgrow_readout_mult,) + tuple(args[1:])


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Set muP's forward multipliers on an HF model built from a `dsgrow_mup` config (no-op for SP)."""
    spec = spec_of_config(model.config)
    if spec is None:
        return model
    n = 0
    for mod in model.modules():
        # GPT2Attention, LlamaAttention, BertSelfAttention keep their q.k factor in `scaling` and pass it
        # to every attention implementation (eager, sdpa, flash).
        if isinstance(getattr(mod, "scaling", None), float) and ("Attention" in type(mod).__name__):
            mod.scaling = spec.attn_scale
            n += 1
    if n != spec.layers:
        raise SpecError(f"muP: found {n} attention modules with a settable scale in {type(model).__name__}, "
                        f"expected {spec.layers}")
    head = model.get_output_embeddings()
    head._dsgrow_readout_mult = 1.0 / spec.width_mult
    if not getattr(head, "_dsgrow_readout_hooked", False):
        head.register_forward_pre_hook(_readout_input)
        head._dsgrow_readout_hooked = True
    return model


def scale_init_(model: torch.nn.Module) -> None:
    """muP's init of a freshly built model: hidden matrices' std / sqrt(m). Elementwise, so under
    ZeRO-3 each rank scales its own shard."""
    spec = spec_of_config(model.config)
    if spec is None or spec.width_mult == 1.0:
        return
    s = 1.0 / math.sqrt(spec.width_mult)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_hidden(name, getattr(p, "ds_shape", p.shape)):
                (p.ds_tensor if hasattr(p, "ds_tensor") else p).mul_(s)


def prepare(model: torch.nn.Module, fresh: bool) -> torch.nn.Module:
    """`install`, and muP's init when the weights are freshly drawn (not loaded)."""
    if fresh:
        scale_init_(model)
    return install(model)


def mup_model(model: torch.nn.Module, base_hidden: int, base_head_dim: int | None = None,
              fresh: bool = True) -> torch.nn.Module:
    """Make a user's HF GPT-2 / LLaMA / BERT model muP (in place; returns it): the base sizes go into
    its config (so `grow_engine` and `export_hf` see them), the forward multipliers are set, and
    with `fresh` (weights just drawn, not loaded) the hidden matrices get muP's init. Then build
    the optimizer from `mup_param_groups(model, weight_decay)` and set each group's LR as
    `lr * group["lr_scale"]` (`dsgrow.set_lr` does)."""
    if spec_of_config(model.config) is not None:
        raise SpecError("mup_model: the model is muP already")
    setattr(model.config, MUP_CONFIG_KEY, {"base_hidden": base_hidden, "base_head_dim": base_head_dim})
    try:
        ModelSpec.from_hf_config(model.config)  # validates the base sizes (one line)
    except SpecError:
        delattr(model.config, MUP_CONFIG_KEY)
        raise
    return prepare(model, fresh)


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Optimizer groups of a muP model: hidden matrices (LR x 1/m, decayed), other matrices
    (embeddings, head; LR x 1, decayed), vectors (LR x 1, no decay). `lr_scale` multiplies the
    schedule's LR (runtime.set_lr); `mup` names the role so a growth can rescale it. With `lr`,
    each group's starting LR is set (lr x lr_scale), so `torch.optim.AdamW(groups)` and a
    LambdaLR-style scheduler (which scales each group's own LR) keep the multipliers."""
    spec = spec_of_config(model.config)
    if spec is None:
        raise SpecError("muP param groups: the model's config has no dsgrow_mup (it is standard-parametrised)")
    hidden, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)
        (hidden if is_hidden(name, shape) else matrices if len(shape) >= 2 else vectors).append(p)
    m = spec.width_mult
    groups = [{"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / m, "mup": "hidden"},
              {"params": matrices, "weight_decay": weight_decay, "lr_scale": 1.0, "mup": "vector"},
              {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0, "mup": "vector"}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
    return groups


mup_param_groups = param_groups  # the public name (dsgrow.mup_param_groups)


def rescale_groups(group_hparams: list[dict], large: ModelSpec) -> None:
    """A growth's carried param-group settings, for the grown width: every hidden group keeps its
    base LR (LR / lr_scale, the small model's tuned one) with the large model's 1/m."""
    for g in group_hparams:
        if g.get("mup") == "hidden":
            base = g["lr"] / g["lr_scale"]
            g["lr_scale"] = 1.0 / large.width_mult
            g["lr"] = base * g["lr_scale"]


def _q_factor(spec: ModelSpec) -> float:
    """muP's attention factor over SP's: what q carries in the folded (SP) model."""
    return spec.attn_scale * math.sqrt(spec.head_dim)


def _rescale(spec: ModelSpec, canonical: dict, power: int) -> dict:
    """The readout's norm times m**power, q times q_factor**-power (-1 folds, +1 unfolds).
    Tensors not touched are shared."""
    out = dict(canonical)
    for k in HEAD_IN[spec.family]:
        out[k] = canonical[k] * spec.width_mult ** power
    q = _q_factor(spec)
    if q != 1.0:
        for k in canonical:
            if k.startswith("layers.") and k.split(".", 2)[2] in ("q.weight", "q.bias"):
                out[k] = canonical[k] * q ** -power
    return out


def fold(spec: ModelSpec, canonical: dict) -> tuple[ModelSpec, dict]:
    """(SP spec, SP canonical) with the same function as the muP model: the readout's 1/m folded
    into the norm the head reads (exact for tied and untied heads: the head is linear in it), the
    attention factor into q (RoPE commutes with a scalar)."""
    if not spec.mup:
        return spec, canonical
    return spec.as_sp(), _rescale(spec, canonical, -1)


def unfold_stream(spec: ModelSpec, stream) -> None:
    """Inverse of `fold` on a growth's output (growth.stream.LayerStream) for a muP `spec`: the
    readout's norm in its HF-named globals now, q in each layer as it is made."""
    for k in HEAD_IN_HF[spec.family]:
        stream.glob[k] = stream.glob[k] * spec.width_mult
    q = _q_factor(spec)
    if q != 1.0:
        make = stream.make_layer

        def unfold_q(i: int) -> dict:
            layer = make(i)
            for s in ("q.weight", "q.bias"):
                if s in layer:
                    layer[s] = layer[s] / q
            return layer

        stream.make_layer = unfold_q


def unfold(spec: ModelSpec, canonical: dict) -> dict:
    """Inverse of `fold`: the muP `spec`'s canonical weights with the function of an SP canonical
    model of the same sizes (an exported, folded model trained on under muP)."""
    return _rescale(spec, canonical, +1)


def fold_hf_state_dict(spec: ModelSpec, sd: dict) -> dict:
    """`fold` on an HF state dict of `spec`'s family: the SP state dict with the same function."""
    from .canonical import from_canonical, to_canonical

    sp, canonical = fold(spec, to_canonical(spec, sd))
    return from_canonical(sp, canonical)


def sp_config(cfg):
    """A copy of an HF config without the muP attribute (what a folded model loads with)."""
    import copy

    out = copy.deepcopy(cfg)
    if hasattr(out, MUP_CONFIG_KEY):
        delattr(out, MUP_CONFIG_KEY)
    return out


def check_same_base(small: ModelSpec, large: ModelSpec) -> str | None:
    """Why `small` cannot grow into `large` under muP (one line), or None."""
    for name in ("parametrization", "base_hidden", "base_head_dim"):
        if getattr(small, name) != getattr(large, name):
            return (f"{name} must match across a growth (small {getattr(small, name)}, target "
                    f"{getattr(large, name)}): muP's multipliers are relative to one base")
    return None


__all__ = ["mup_model", "mup_param_groups", "install", "prepare", "scale_init_", "param_groups", "rescale_groups", "fold", "unfold", "fold_hf_state_dict", "sp_config", "unfold_stream",
           "is_hidden", "spec_of_config", "check_same_base", "HEAD_IN"]
