"""A grown model's Hugging Face tensors, made one large layer at a time.

Writing a grown model into a sharded (ZeRO-3) engine needs each parameter once, in the model's
own order, and each rank keeps only its slice. `LayerStream` answers "the full tensor named X"
by making the large layer X belongs to when it is first asked for and dropping the previous
one, so a rank never holds more than the non-layer tensors (embeddings, final norm, head) and
one large layer beside whatever the operator itself needs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..families import ModelSpec
from ..families.hf_io import hf_model_class
from .fit import _layer_list, one_block_hf
from .ops import GrowthError


def _meta_model(spec: ModelSpec):
    """The HF model of `spec` on the meta device (names and shapes, no memory)."""
    with torch.device("meta"):
        return hf_model_class(spec).from_config(spec.to_hf_config())


def _hf_block_names(spec: ModelSpec) -> str:
    """The dotted name of the HF model's list of blocks ("transformer.h", "model.layers", ...)."""
    name, _ = _layer_list(_meta_model(spec), spec.layers)
    return name


def collect_stream(spec: ModelSpec, stream) -> dict:
    """The whole large canonical dict from a LayerStream (one process, e.g. `grow` and the offline
    `dsgrow grow`): every HF parameter asked in the model's order, as a sharded write asks them.
    The tensors are fresh copies, never views of the small model's."""
    from ..families import to_canonical

    names = [n for n, _ in _meta_model(spec).named_parameters()]
    return to_canonical(spec, {n: stream(n).detach().clone() for n in names})


class LayerStream:
    """`stream(name)` -> the full fp32 tensor of HF parameter `name` of the grown model.

    glob: the canonical non-layer tensors (tok_emb, final_norm.*, head.*, ...).
    make_layer(i): large layer i as {canonical suffix: tensor}.
    Layers may be asked in any order; in the model's order each is made exactly once.
    """

    def __init__(self, spec: ModelSpec, glob: dict, make_layer: Callable[[int], dict]):
        self.spec = spec
        self.spec1 = dataclasses.replace(spec, layers=1)
        self.prefix = _hf_block_names(spec) + "."
        self.make_layer = make_layer
        self.glob = {k: v for k, v in self._hf(glob, None).items() if not k.startswith(self.prefix)}
        self._layer: tuple[Optional[int], dict] = (None, {})
        self.layers_made = 0
        self.peak_layer_bytes = 0

    def _hf(self, glob: Optional[dict], layer0: Optional[dict], consume: bool = False) -> dict:
        return one_block_hf(self.spec1, glob, layer0, consume=consume)

    def _make(self, i: int) -> dict:
        self._layer = (None, {})  # drop the previous layer before making the next
        # consume: each canonical tensor dies as its HF copy is made (GPT-2 copies), so one large
        # layer is alive, not a canonical and an HF one side by side.
        hf = self._hf(None, self.make_layer(i), consume=True)
        block0 = self.prefix + "0."
        layer = {k[len(block0):]: t for k, t in hf.items() if k.startswith(block0)}
        self.layers_made += 1
        self.peak_layer_bytes = max(self.peak_layer_bytes, sum(t.numel() * t.element_size() for t in layer.values()))
        return layer

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.glob:
            return self.glob[name]
        if not name.startswith(self.prefix):
            raise GrowthError(f"grown model has no tensor {name}")
        idx, rest = name[len(self.prefix):].split(".", 1)
        i = int(idx)
        if self._layer[0] != i:
            self._layer = (i, self._make(i))
        if rest not in self._layer[1]:
            raise GrowthError(f"grown model has no tensor {name}")
        return self._layer[1][rest]


def _contiguous(layer: dict) -> dict:
    """The layer's tensors made contiguous (the widening maps leave some strided), each original
    dropped as its copy is made: one layer alive, not the strided one and its copy side by side."""
    return {s: layer.pop(s).detach().contiguous() for s in list(layer)}


def ligo_stream(op) -> LayerStream:
    """The large model a fitted LiGO operator makes, one large layer at a time."""
    with torch.no_grad():
        res = op.res_map()
        glob = op.broken_global({k: t.detach() for k, t in op.global_weights(res).items()})

    def make(i: int) -> dict:
        with torch.no_grad():
            layer = op.streamed_layer(i, res)
            return _contiguous(op.broken_layer(i, layer, res))

    return LayerStream(op.large, glob, make)


def canonical_stream(spec: ModelSpec, large: dict) -> LayerStream:
    """A large canonical dict already in memory (the closed-form operators), served the same way."""
    glob = {k: v for k, v in large.items() if not k.startswith("layers.")}

    def make(i: int) -> dict:
        p = f"layers.{i}."
        return {k[len(p):]: v for k, v in large.items() if k.startswith(p)}

    return LayerStream(spec, glob, make)


def fixed_layer_stream(spec_large: ModelSpec, fixed) -> LayerStream:
    """A closed-form method's large model (depth.FixedGrowth) one large layer at a time."""
    return LayerStream(spec_large, fixed.glob, lambda i: _contiguous(fixed.layer(i)))
