"""FLOPs counted from what ran (dsgrow/schedules/flop_count.py) match the analytic count: on CPU,
torch's FlopCounterMode alone sees scaled_dot_product_attention as 0 FLOPs; dsgrow registers the
CPU kernels, so a model's forward + backward and a LiGO fit count their attention."""
from __future__ import annotations

import pytest
import torch

from dsgrow.families.hf_io import build_hf_model
from dsgrow.families.spec import ModelSpec
from dsgrow.schedules.flop_count import count_flops
from dsgrow.schedules.flops import flops_per_token

T = 64


@pytest.mark.parametrize("family, extra", [("gpt2", {}), ("llama", {"kv_heads": 2})])
def test_counted_training_flops_match_the_analytic_count_attention_included(family, extra):
    spec = ModelSpec(family=family, layers=2, hidden=64, heads=4, vocab_size=256, max_seq_len=T, **extra)
    model = build_hf_model(spec, seed=0)
    assert model.config._attn_implementation == "sdpa"
    x = torch.randint(0, 256, (4, T), generator=torch.Generator().manual_seed(0))
    _, counted = count_flops(lambda: model(input_ids=x, labels=x).loss.backward())
    analytic = flops_per_token(spec, T) * x.numel()  # 6N plus 12 * layers * hidden * seq per token
    assert counted == pytest.approx(analytic, rel=0.02)
    attention = 12 * spec.layers * spec.hidden * T * x.numel()
    assert attention > 0.1 * analytic  # the attention term is large enough here to be missed


def test_a_ligo_fit_counts_the_large_models_attention_and_the_operator():
    """memory: full (no recompute): a fit step costs the large model's forward + backward (6ND plus
    attention, as schedules/flops.py counts a training token) plus the operator's matmuls."""
    from dsgrow.growth import grow

    small_spec = ModelSpec("gpt2", layers=2, hidden=32, heads=4, vocab_size=256, max_seq_len=T)
    small = build_hf_model(small_spec, seed=0)
    data = torch.randint(0, 256, (64, T), generator=torch.Generator().manual_seed(1))
    _, info = grow(small, {"layers": 4, "hidden": 64}, method="ligo", data=data, fit_steps=2, batch_size=8,
                   memory="full", return_info=True)
    fit = info["fit"]
    assert fit["flops"] == pytest.approx(fit["flops_model_6nd"] + fit["flops_operator"], rel=0.02)
