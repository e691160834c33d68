"""Fitting a LiGO operator: only the map trains; the small weights stay frozen.

Each step computes the large weights from the operator and runs the real Hugging Face large model
on them with `torch.func.functional_call` (causal LM loss for gpt2/llama, MLM for bert); AdamW
updates the map (lr 2e-4, weight decay 0.1, as in the official LiGO code, both options).

Memory. The HF large model is only a skeleton: its own parameters are freed after it is built, so
the large model exists once, as the operator's output. With ``memory="layerwise"`` (default)
not even that: the L1 width-grown small layers are computed once per step, and each large layer's
weights are mixed from them inside that layer's forward under activation checkpointing, so
autograd keeps one large layer's weights (and the layer inputs) at a time and recomputes them in
backward. Live during a step: small weights + map + its Adam state + the L1 widened layers +
one large layer + the non-layer weights (embeddings, head). ``memory="full"`` materialises every
large tensor before the forward (faster, no recompute; holds the whole large model plus all of its
activations).

FLOPs. The first step runs under `torch.utils.flop_counter.FlopCounterMode`, which counts every
matmul that really runs (large forward + backward, checkpoint recompute, operator and its
backward), attention included (schedules/flop_count.py teaches the counter the CPU SDPA kernels,
which it would count as 0); that count times the steps is `flops`, the fit's whole cost. The operator's share of it
is counted the same way (`flops_operator`, part of `flops`, not on top of it), and `flops_model_6nd` is the usual 6 N D + attention estimate of the large
model for the fitted tokens (dsgrow.schedules.flops), for comparison with papers.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..families import ModelSpec, build_hf_model, from_canonical
from .ligo import LiGO
from .ops import GrowthError

# Options of the fit (grow(..., method="ligo", **opts)); masking options are grow's own arguments.
FIT_OPTIONS = {"lr": 2e-4, "weight_decay": 0.1, "batch_size": 8, "memory": "layerwise", "mlm_prob": 0.15,
               "log_every": 0, "grad_clip": 1.0}


def check_fit_options(small: ModelSpec, lr=2e-4, weight_decay=0.1, batch_size=8, memory="layerwise",
                      mlm_prob=0.15, log_every=0, grad_clip=1.0, mask_token_id=None) -> None:
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise GrowthError(f"ligo: lr must be > 0, got {lr!r}")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise GrowthError(f"ligo: weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise GrowthError(f"ligo: batch_size must be a positive integer, got {batch_size!r}")
    if memory not in ("layerwise", "full"):
        raise GrowthError(f"ligo: memory must be 'layerwise' or 'full', got {memory!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise GrowthError(f"ligo: log_every must be an integer >= 0, got {log_every!r}")
    if not isinstance(grad_clip, (int, float)) or grad_clip < 0:
        raise GrowthError(f"ligo: grad_clip must be >= 0 (0: off), got {grad_clip!r}")
    if not 0 < mlm_prob < 1:
        raise GrowthError(f"ligo: mlm_prob must be in (0, 1), got {mlm_prob!r}")
    check_mask_token_id(small, mask_token_id)


def check_mask_token_id(spec: ModelSpec, mask_token_id) -> None:
    if mask_token_id is not None and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int)
                                      or not 0 <= mask_token_id < spec.vocab_size):
        raise GrowthError(f"mask_token_id {mask_token_id!r} is outside the vocabulary ({spec.vocab_size})")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
class _MaskOnly:
    """The tokenizer fields dsgrow.data.mlm_mask reads, for a vocabulary known only by its size."""

    def __init__(self, mask_id: int, vocab_size: int):
        self.mask_id, self.vocab_size, self.special_ids = mask_id, vocab_size, (mask_id,)


def make_masker(spec: ModelSpec, mlm_fn: Optional[Callable] = None, mask_token_id: Optional[int] = None,
                prob: float = 0.15, seed: int = 0) -> Optional[Callable[[torch.Tensor, int], dict]]:
    """``(input_ids, position) -> {"input_ids", "labels"}`` for BERT batches without labels.

    `mlm_fn(input_ids, position)` returns a dict or an (inputs, labels) pair; without it, given
    `mask_token_id`, dsgrow.data.mlm_mask masks (15%: 80% [MASK], 10% random, 10% kept; the mask
    of a row depends only on (seed, position), so evaluation is reproducible).
    """
    if mlm_fn is None and mask_token_id is None:
        return None
    if mlm_fn is None:
        from ..data import mlm_mask

        tok = _MaskOnly(mask_token_id, spec.vocab_size)

        def mlm_fn(ids, position):
            return mlm_mask(ids, tok, prob, seed, position)

    def masker(ids: torch.Tensor, position: int) -> dict:
        out = mlm_fn(ids, position)
        return dict(out) if isinstance(out, dict) else {"input_ids": out[0], "labels": out[1]}
    return masker


def _with_labels(b, spec: ModelSpec, masker, position: int, what: str) -> dict:
    b = dict(b) if isinstance(b, dict) else {"input_ids": b}
    ids = b.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise GrowthError(f"{what}: every batch needs input_ids as a LongTensor [B, T]")
    if int(ids.max()) >= spec.vocab_size or int(ids.min()) < 0:
        raise GrowthError(f"{what}: token id {int(ids.max())} outside the model's vocabulary ({spec.vocab_size})")
    if "labels" not in b:
        if spec.causal:
            b["labels"] = ids
        elif masker is not None:
            b.update(masker(ids, position))
        else:
            raise GrowthError(f"{what}: BERT batches need MLM labels (give dict batches with labels, "
                              "mlm_fn or mask_token_id)")
    return b


def batches(data, spec: ModelSpec, batch_size: int = 8, seed: int = 0, masker=None) -> Iterator[dict]:
    """An endless stream of model inputs (dicts with input_ids and labels) from `data`.

    `data`: a LongTensor [N, T] of blocks (shuffled with `seed`, `batch_size` rows a batch), a
    callable ``step -> batch``, or an iterable of batches (cycled). A batch is a LongTensor [B, T]
    or a dict with input_ids (and labels). Causal families use labels = input_ids (the model
    shifts); BERT batches without labels go through `masker` (see `make_masker`).
    """
    g = torch.Generator().manual_seed(seed)

    def raw() -> Iterator:
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or data.dtype != torch.long:
                raise GrowthError(f"data: expected a LongTensor [N, T], got {data.dtype} {list(data.shape)}")
            while True:
                perm = torch.randperm(data.shape[0], generator=g)
                for i in range(0, max(data.shape[0] - batch_size, 0) + 1, batch_size):
                    yield data[perm[i:i + batch_size]]
        elif callable(data):
            for step in itertools.count():
                yield data(step)
        else:
            while True:
                empty = True
                for b in data:
                    empty = False
                    yield b
                if empty:
                    raise GrowthError("data: the iterable gave no batches")
                if iter(data) is data:  # a one-shot iterator: it cannot be cycled
                    raise GrowthError("data: the iterator ran out; pass a list, a tensor or a callable")

    position = 0
    for b in raw():
        b = _with_labels(b, spec, masker, position, "data")
        position += b["input_ids"].shape[0]
        yield b


# ------------------------------------------------------------------------------------------------
# Running the HF large model on generated weights
# ------------------------------------------------------------------------------------------------
def _free_parameters(model: nn.Module) -> None:
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _layer_list(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and len(list(m[0].parameters())):
            return name, m
    raise GrowthError(f"{type(model).__name__}: no list of {n_layers} blocks found")


def one_block_hf(spec1: ModelSpec, glob: Optional[dict], layer0: Optional[dict], consume: bool = False) -> dict:
    """HF tensors of the one-block model `spec1` made of the canonical non-layer tensors `glob` and
    one layer's `layer0` ({suffix: tensor}); zero placeholders where either is None. How a single
    large layer (or the globals alone) is named and laid out the HF way without the whole model.
    consume=True empties `layer0` into the conversion (from_canonical's consume), so the caller's
    dict does not keep the canonical layer alive beside its HF copy."""
    from ..families import canonical_shapes

    c = {}
    for k, shape in canonical_shapes(spec1).items():
        if k.startswith("layers.0."):
            if layer0 is None:
                c[k] = torch.zeros(()).expand(shape)
            else:
                c[k] = layer0.pop(k[9:]) if consume else layer0[k[9:]]
        else:
            c[k] = glob[k] if glob is not None else torch.zeros(()).expand(shape)
    return from_canonical(spec1, c, consume=consume)


class _GeneratedLayer(nn.Module):
    """Stands in for one HF block: makes the block's weights, then runs the block on them, under
    activation checkpointing (so the weights are remade in backward instead of kept)."""

    def __init__(self, inner: nn.Module, bind: Callable[[], Callable[[], dict]], use_checkpoint: bool):
        super().__init__()
        self.inner = inner
        self._bind = bind
        self._ckpt = use_checkpoint

    def forward(self, *args, **kwargs):
        make = self._bind()  # bound now: the recompute in backward must see this step's operator state

        def run(*a, **kw):
            return functional_call(self.inner, make(), a, kw, strict=False)

        if self._ckpt and torch.is_grad_enabled():
            return checkpoint(run, *args, use_reentrant=False, **kwargs)
        return run(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


class LargeRunner:
    """The large HF model run on the weights a LiGO operator makes (see the module docstring).

    The HF model is a skeleton whose own parameters are freed. layerwise: its blocks are wrapped
    so each makes its weights inside its forward; otherwise every weight is made up front.
    """

    def __init__(self, spec: ModelSpec, layerwise: bool = True):
        self.spec = spec
        self.model = build_hf_model(spec)
        _free_parameters(self.model)
        self.layerwise = layerwise
        # One-block spec: from_canonical of it maps one canonical layer to one HF block's names.
        self.spec1 = dataclasses.replace(spec, layers=1)
        self.list_name, self.blocks = _layer_list(self.model, spec.layers)
        self.prefix1 = f"{self.list_name}.0."
        self._current: dict[str, Any] = {}
        if layerwise:
            for i in range(spec.layers):
                self.blocks[i] = _GeneratedLayer(self.blocks[i], self._maker(i), use_checkpoint=True)

    def _hf(self, glob: dict, layer0: Optional[dict]) -> dict:
        return one_block_hf(self.spec1, glob, layer0)

    def _maker(self, i: int) -> Callable[[], Callable[[], dict]]:
        def bind() -> Callable[[], dict]:
            op, widened = self._current["op"], self._current["widened"]

            def make() -> dict:
                hf = self._hf(None, op.large_layer(widened, i))
                n = len(self.prefix1)
                return {k[n:]: t for k, t in hf.items() if k.startswith(self.prefix1)}
            return make
        return bind

    def __call__(self, op: LiGO, batch: dict):
        """Model output (with .loss) of the large model made by `op` on `batch`."""
        kwargs = dict(batch)
        if self.layerwise:
            res = op.res_map()
            glob = op.global_weights(res)
            self._current = {"op": op, "widened": op.widened_layers(res)}
            try:
                params = {k: t for k, t in self._hf(glob, None).items() if not k.startswith(self.prefix1)}
                return functional_call(self.model, params, (), kwargs, strict=False)
            finally:
                self._current = {}
        params = from_canonical(self.spec, op())
        return functional_call(self.model, params, (), kwargs, strict=False)


# ------------------------------------------------------------------------------------------------
# Fitting and evaluation
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FitReport:
    steps: int
    tokens: int
    losses: list
    wall_s: float
    flops: float                 # everything that ran (measured on step 1, times steps)
    flops_operator: float        # the operator's forward + backward alone, all steps
    flops_model_6nd: float       # 6 N D + attention estimate of the large model on the fitted tokens
    memory: str
    lr: float
    weight_decay: float


def _count_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    from ..schedules.flop_count import count_flops  # SDPA's attention counted on CPU too

    return count_flops(fn)


def operator_flops(op: LiGO) -> float:
    """FLOPs of one operator forward + backward: the part of a fit step's count (`FitReport.flops`,
    which already includes it) that the operator adds to the large model's own cost.

    The width maps are the operator's matmuls; the depth mix is elementwise (scale and add), which
    the counter does not count, so widening the L1 small layers and the non-layer tensors gives
    the same count as the whole `op()` without making the L2 large layers (at GPU sizes, the
    whole large model with gradients)."""
    def run():
        res = op.res_map()
        parts = [op.global_weights(res), *op.widened_layers(res)]
        torch.stack([t.sum() for part in parts for t in part.values()]).sum().backward()
    _, f = _count_flops(run)
    op.zero_grad(set_to_none=True)
    return f


def fit_ligo(op: LiGO, data, steps: int, lr: float = 2e-4, weight_decay: float = 0.1, batch_size: int = 8,
             memory: str = "layerwise", mlm_fn: Optional[Callable] = None, mask_token_id: Optional[int] = None,
             mlm_prob: float = 0.15, log_every: int = 0, grad_clip: float = 1.0, seed: int = 0,
             grad_hook: Optional[Callable[[list], None]] = None, device: Optional[torch.device] = None) -> FitReport:
    """Train the operator's maps for `steps` AdamW steps on the LM loss of the large model.

    `grad_hook(grads)` runs after each backward, before clipping: data-parallel callers average
    the operator's gradients over ranks there (torch.distributed; nothing here knows of ranks).
    `device`: where the batches go (the operator's device; a user's batches may sit on the CPU)."""
    from ..schedules.flops import flops_per_token

    check_fit_options(op.small, lr, weight_decay, batch_size, memory, mlm_prob, log_every, grad_clip, mask_token_id)
    if steps < 0:
        raise GrowthError(f"fit_steps must be >= 0, got {steps}")
    runner = LargeRunner(op.large, layerwise=memory == "layerwise")
    # The skeleton's buffers (rotary frequencies, masks) follow the operator to its device.
    runner.model.to(next(op.parameters()).device)
    stream = batches(data, op.large, batch_size, seed, make_masker(op.large, mlm_fn, mask_token_id, mlm_prob, seed))
    opt = torch.optim.AdamW(op.parameters(), lr=lr, weight_decay=weight_decay)
    op.train()
    losses, tokens, step_flops, seq_len = [], 0, 0.0, None
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(stream)
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        seq_len = batch["input_ids"].shape[1]

        def one_step():
            loss = runner(op, batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss

        if step == 0:
            loss, step_flops = _count_flops(one_step)
        else:
            loss = one_step()
        if grad_hook is not None:
            grad_hook([p.grad for p in op.parameters() if p.grad is not None])
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(op.parameters(), grad_clip)
        opt.step()
        tokens += batch["input_ids"].numel()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  ligo fit step {step + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    wall = time.perf_counter() - t0
    op.zero_grad(set_to_none=True)  # the gradients would otherwise live as long as the operator
    del opt
    op.eval()
    f_op = operator_flops(op) * steps if steps else 0.0
    return FitReport(steps=steps, tokens=tokens, losses=losses, wall_s=wall, flops=step_flops * steps,
                     flops_operator=f_op,
                     flops_model_6nd=flops_per_token(op.large, seq_len) * tokens if steps else 0.0,
                     memory=memory, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def heldout_loss(spec: ModelSpec, model_or_canonical, val, batch_size: int = 16, mlm_fn: Optional[Callable] = None,
                 mask_token_id: Optional[int] = None, mlm_prob: float = 0.15, seed: int = 1234) -> float:
    """Token-weighted mean loss over all of `val` (LongTensor [M, T] or list of batches).

    BERT batches without labels are masked from a fixed `seed` (see `make_masker`), so two
    models are scored on the same masked positions.
    """
    if isinstance(model_or_canonical, dict):
        model = build_hf_model(spec)
        model.load_state_dict(from_canonical(spec, model_or_canonical), strict=True)
    else:
        model = model_or_canonical
    model.eval()
    chunks = list(val.split(batch_size)) if isinstance(val, torch.Tensor) else list(val)
    masker = make_masker(spec, mlm_fn, mask_token_id, mlm_prob, seed)
    total, n, position = 0.0, 0, 0
    for b in chunks:
        b = _with_labels(b, spec, masker, position, "eval data")
        position += b["input_ids"].shape[0]
        out = model(**b)
        labels = b["labels"]
        count = int((labels[:, 1:] != -100).sum()) if spec.causal else int((labels != -100).sum())
        total += float(out.loss) * count
        n += count
    return total / n if n else math.nan


__all__ = ["fit_ligo", "heldout_loss", "batches", "make_masker", "LargeRunner", "FitReport", "operator_flops",
           "FIT_OPTIONS", "check_fit_options", "check_mask_token_id"]
