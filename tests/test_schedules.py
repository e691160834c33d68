"""Schedules, budgets, the growth planner and `dsgrow plan`: pure math, no torch, no deepspeed."""
from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from dsgrow.schedules import lr as lr_mod
from dsgrow.schedules.batch import (
    AdaptiveBatch, Constant, GrowInsteadOfDecay, Ramp, ScheduleError, Steps, count_steps, format_tokens,
    lr_factor_at, make_batch_schedule, parse_tokens, scale_lr,
)
from dsgrow.schedules.budget import (
    FITS, Budget, compute_optimal, flops_for_loss, from_params, from_tokens, get_fit, gpu_hours_to_flops, loss,
    optimal_loss, parse_quantity,
)
from dsgrow.schedules.noise_scale import NoiseScaleEstimator
from dsgrow.schedules.plan_cli import add_parser, main
from dsgrow.schedules.planner import SHAPES, plan_growth


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------------------------
# Token counts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("250B", 250 * 10**9), ("2M", 2_000_000), ("2m", 2_000_000), ("1_000", 1000), ("1.5K", 1500),
    ("2e6", 2_000_000), ("1T", 10**12), (7, 7), (2e6, 2_000_000), ("0", 0),
])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("bad", ["abc", "1X", "2MB", "1.5", "", "nan", True, None, 1.5])
def test_parse_tokens_rejects(bad):
    with pytest.raises(ScheduleError) as e:
        parse_tokens(bad)
    one_line_error(e)


def test_format_tokens_roundtrip():
    for n in (0, 1500, 2_000_000, 250 * 10**9, 9_765_625, 3 * 10**12):
        assert parse_tokens(format_tokens(n)) == n
    assert format_tokens(2_000_000) == "2M" and format_tokens(1500) == "1500"


# ----------------------------------------------------------------------------------------------
# Batch schedules
# ----------------------------------------------------------------------------------------------
def test_constant():
    s = Constant(48)
    assert [s.batch_at(t) for t in (0, 1, 10**12)] == [48, 48, 48]
    assert s.sizes() == [48] and s.lr_multiplier_at(123) == 1.0
    s.validate(4, 3)  # 48 = 4 x 3 x 4
    with pytest.raises(ScheduleError, match="48"):
        s.validate(5, 2)
    with pytest.raises(ScheduleError):
        Constant(0)
    with pytest.raises(ScheduleError):
        s.batch_at(-1)


def test_ramp_small_by_hand():
    # start 8, increment 8, end 40: n = (40 - 8) / 8 = 4 increments over 1000 tokens,
    # one every 1000 / 4 = 250 tokens: batch = 8 + 8 * floor(t / 250) until t = 1000.
    r = Ramp(8, 8, 1000, 40)
    assert r.n_increments == 4
    expect = {0: 8, 249: 8, 250: 16, 499: 16, 500: 24, 749: 24, 750: 32, 999: 32, 1000: 40, 10**9: 40}
    assert {t: r.batch_at(t) for t in expect} == expect
    assert r.sizes() == [8, 16, 24, 32, 40]
    assert r.change_points() == [250, 500, 750, 1000]


def test_ramp_rejects():
    with pytest.raises(ScheduleError, match="not a multiple"):
        Ramp(8, 12, 1000, 40)  # 32 is not a multiple of 12
    with pytest.raises(ScheduleError):
        Ramp(64, 8, 1000, 32)  # end < start
    with pytest.raises(ScheduleError):
        Ramp(8, 8, 0, 40)


def test_megatron_ramp_bloom():
    # BLOOM-176B: --rampup-batch-size 192 16 9_765_625, global batch 2048 (counter in samples).
    # n_increments = (2048 - 192) / 16 = 1856 / 16 = 116; samples per increment
    # = 9_765_625 / 116 = 84_186.42...; increment k starts at ceil(k * 9_765_625 / 116).
    r = Ramp(192, 16, 9_765_625, 2048)
    assert r.n_increments == 116
    assert r.batch_at(0) == 192
    assert r.batch_at(84_186) == 192       # 84_186 / 84_186.42 = 0.999995 -> 0
    assert r.batch_at(84_187) == 208       # -> 1: 192 + 16
    # k = 58: 58 * 9_765_625 / 116 = 4_882_812.5 -> starts at 4_882_813; 192 + 58 * 16 = 1120
    assert r.batch_at(4_882_812) == 1104 and r.batch_at(4_882_813) == 1120
    # k = 115: 115 * 9_765_625 / 116 = 9_681_438.58 -> 9_681_439; 192 + 115 * 16 = 2032
    assert r.batch_at(9_681_438) == 2016 and r.batch_at(9_681_439) == 2032
    assert r.batch_at(9_765_624) == 2032 and r.batch_at(9_765_625) == 2048 and r.batch_at(10**10) == 2048
    assert len(r.sizes()) == 117 and r.sizes()[-1] == 2048
    # Megatron's own float formula agrees on both sides of every step point
    per_inc = 9_765_625 / 116
    for t in r.change_points():
        for x in (t - 1, t):
            assert r.batch_at(x) == 192 + 16 * int(x / per_inc)
    # BLOOM ran micro batch 2 x DP 8 = 16: every size 192 + 16 k divides; 4 x 8 = 32 does not (208)
    r.validate(2, 8)
    with pytest.raises(ScheduleError, match=r"batch size 208 .* 32") as e:
        r.validate(4, 8)
    one_line_error(e)


def test_count_steps_matches_brute_force():
    def brute(s, total, seq):
        t = n = 0
        while t < total:
            t += s.batch_at(t) * seq
            n += 1
        return n

    r = Ramp(192, 16, 9_765_625, 2048)
    assert count_steps(r, 9_765_625, 1) == brute(r, 9_765_625, 1)
    assert count_steps(r, 20_000_000, 1) == brute(r, 20_000_000, 1)
    st = Steps.parse("0:4 1000:8 1010:16")
    assert count_steps(st, 5000, 3) == brute(st, 5000, 3)
    # constant: ceil(1000 / (8 * 16)) = ceil(7.8125) = 8
    assert count_steps(Constant(8), 1000, 16) == 8


def test_steps_parse_by_hand():
    s = Steps.parse("0:32 2M:64 8M:128")
    expect = {0: 32, 1_999_999: 32, 2_000_000: 64, 7_999_999: 64, 8_000_000: 128, 10**12: 128}
    assert {t: s.batch_at(t) for t in expect} == expect
    assert s.sizes() == [32, 64, 128] and s.change_points() == [2_000_000, 8_000_000]
    assert str(s) == "0:32 2M:64 8M:128"
    # suffixes K/M/B/T, underscores, plain ints, commas, lower case
    s2 = Steps.parse("0:8, 1.5K:16 1_000_000:32 2b:64 1T:128")
    assert s2.points == [(0, 8), (1500, 16), (1_000_000, 32), (2 * 10**9, 64), (10**12, 128)]
    assert s2.batch_at(1499) == 8 and s2.batch_at(1500) == 16


@pytest.mark.parametrize("text,fragment", [
    ("0:-8", "positive"),
    ("0:0", "positive"),
    ("0:32 2M:64 1M:128", "increase"),
    ("0:32 2M:64 2M:128", "increase"),
    ("1M:32 2M:64", "start at 0"),
    ("0:32 2X:64", "suffix"),
    ("0:32 2M", "TOKENS:SIZE"),
    ("0:32.5", "integer"),
    ("0:32 -1M:64", "negative"),
    ("", "empty"),
])
def test_steps_parse_rejects(text, fragment):
    with pytest.raises(ScheduleError) as e:
        Steps.parse(text)
    assert fragment in one_line_error(e)
    assert isinstance(e.value, ValueError)


def test_divisibility_validation_names_the_size():
    s = Steps.parse("0:24 1M:48")
    s.validate(4, 2)  # 24 and 48 divide by 8
    with pytest.raises(ScheduleError) as e:
        s.validate(4, 4)  # 24 % 16 = 8
    assert "batch size 24" in one_line_error(e) and "16" in str(e.value)
    with pytest.raises(ScheduleError, match="micro_batch"):
        s.validate(0, 2)


def base_decay():
    # Base recipe: LR x 0.2 at 30M, 60M and 80M tokens, batch 128; growth capped at 4096.
    return GrowInsteadOfDecay("30M 60M 80M", base_batch=128, max_batch=4096, factor=0.2)


def test_grow_instead_of_decay_by_hand():
    g = base_decay()
    # 128 / 0.2 = 640; 128 / 0.04 = 3200; 128 / 0.008 = 16000 > 4096 -> capped at 4096, and the LR
    # takes the rest: 0.008 x 4096 / 128 = 0.256.
    table = {0: (128, 1.0), 29_999_999: (128, 1.0), 30_000_000: (640, 1.0), 60_000_000: (3200, 1.0),
             79_999_999: (3200, 1.0), 80_000_000: (4096, 0.256), 10**12: (4096, 0.256)}
    for t, (b, m) in table.items():
        assert g.batch_at(t) == b
        assert g.lr_multiplier_at(t) == pytest.approx(m, rel=1e-12)
    assert g.sizes() == [128, 640, 3200, 4096]
    g.validate(8, 16)  # all multiples of 128
    g.validate(128, 1)  # 640 = 5 x 128, 3200 = 25 x 128, 4096 = 32 x 128
    capped = GrowInsteadOfDecay("30M 60M 80M", base_batch=128, max_batch=4000, factor=0.2)
    assert capped.sizes() == [128, 640, 3200, 4000]
    with pytest.raises(ScheduleError, match="batch size 4000"):
        capped.validate(128, 1)  # 4000 = 31.25 x 128


def test_grow_instead_of_decay_keeps_lr_over_batch():
    g = base_decay()
    base_lr = 0.1
    for t in range(0, 120_000_001, 2_500_000):
        base = lr_mod.step_decay(t, base_lr, [30_000_000, 60_000_000, 80_000_000], 0.2)
        assert base == pytest.approx(base_lr * g.base_lr_multiplier_at(t), rel=1e-12)
        grown_lr = base_lr * lr_factor_at(g, t, base_batch=128, rule="none")
        # the SGD noise scale lr / B follows the base schedule everywhere ...
        assert grown_lr / g.batch_at(t) == pytest.approx(base / 128, rel=1e-12)
        # ... and the LR itself is untouched until the batch reaches max_batch
        if g.batch_at(t) < 4096:
            assert grown_lr == pytest.approx(base_lr, rel=1e-12)
        else:
            assert grown_lr < base_lr
    # fewer updates for the same 100M tokens at seq 1024 (tokens/step = batch x 1024):
    #   base: ceil(1e8 / 131_072) = 763 steps
    #   grow: [0, 30M) at 131_072: 229 steps -> 30_015_488; [.., 60M) at 655_360: ceil(29_984_512 /
    #   655_360) = 46 -> 60_162_048; [.., 80M) at 3_276_800: ceil(19_837_952 / 3_276_800) = 7 ->
    #   83_099_648; then 4_194_304: ceil(16_900_352 / 4_194_304) = 5. Total 229 + 46 + 7 + 5 = 287.
    assert count_steps(Constant(128), 100_000_000, 1024) == 763
    assert count_steps(g, 100_000_000, 1024) == 287
    with pytest.raises(ScheduleError, match="none"):
        lr_factor_at(g, 0, 128, "linear")


def test_grow_instead_of_decay_uneven_factor():
    # factor 0.3: 32 / 0.3 = 106.67 -> batch 107; the LR absorbs the rounding: 0.3 x 107 / 32 = 1.003125
    g = GrowInsteadOfDecay([(1000, 0.3)], base_batch=32, max_batch=1024)
    assert g.batch_at(1000) == 107
    assert g.lr_multiplier_at(1000) == pytest.approx(1.003125)
    assert g.lr_multiplier_at(1000) / 107 == pytest.approx(0.3 / 32)
    for bad in ("0 10M", "10M 5M"):
        with pytest.raises(ScheduleError):
            GrowInsteadOfDecay(bad, 32, 64)
    with pytest.raises(ScheduleError, match=r"\(0, 1\)"):
        GrowInsteadOfDecay("1M", 32, 64, factor=2.0)
    with pytest.raises(ScheduleError):
        GrowInsteadOfDecay("1M", 64, 32)


def test_make_batch_schedule():
    assert make_batch_schedule(32).batch_at(10**9) == 32
    assert isinstance(make_batch_schedule("64"), Constant)
    assert make_batch_schedule("0:32 2M:64").batch_at(2_000_000) == 64
    r = make_batch_schedule({"type": "ramp", "start": 8, "increment": 8, "ramp_tokens": "1K", "end": 40})
    assert isinstance(r, Ramp) and r.batch_at(500) == 24
    assert make_batch_schedule({"type": "steps", "steps": [[0, 16], ["1M", 32]]}).batch_at(10**6) == 32
    g = make_batch_schedule({"type": "grow_instead_of_decay", "base_lr_steps": "30M 60M", "base_batch": 8,
                             "max_batch": 64, "factor": 0.5})
    assert g.batch_at(60_000_000) == 32
    assert make_batch_schedule([(0, 4), ("1K", 8)]).batch_at(1000) == 8
    same = Constant(3)
    assert make_batch_schedule(same) is same
    for bad, fragment in [({"type": "cosine"}, "unknown type"), ({"start": 8}, "missing 'type'"),
                          ({"type": "ramp", "start": 8, "increment": 8, "end": 16}, "ramp_tokens"),
                          ({"type": "constant", "size": 8, "sise": 8}, "sise"), (True, "expected"), (0, "positive")]:
        with pytest.raises(ScheduleError) as e:
            make_batch_schedule(bad)
        assert fragment in one_line_error(e)


def test_scale_lr():
    assert scale_lr(3e-4, 256, 512, "linear") == pytest.approx(6e-4)   # x 512/256
    assert scale_lr(3e-4, 256, 1024, "sqrt") == pytest.approx(6e-4)    # x sqrt(4)
    assert scale_lr(3e-4, 256, 1024, "none") == 3e-4
    assert scale_lr(1.0, 100, 50, "linear") == pytest.approx(0.5)
    r = Steps.parse("0:32 1M:128")
    assert lr_factor_at(r, 10**6, base_batch=32, rule="linear") == pytest.approx(4.0)
    assert lr_factor_at(r, 10**6, base_batch=32, rule="sqrt") == pytest.approx(2.0)
    with pytest.raises(ScheduleError, match="rule"):
        scale_lr(1.0, 1, 2, "cubic")
    with pytest.raises(ScheduleError):
        scale_lr(1.0, 0, 2)


def test_adaptive_batch():
    a = AdaptiveBatch(32, 512, 32)
    assert a.propose(None, 64) == 64
    assert a.propose(100.0, 64) == 96       # 100 / 32 = 3.125 -> 3 x 32
    assert a.propose(112.0, 64) == 128      # 3.5 -> 4 x 32 (half rounds up)
    assert a.propose(47.0, 64) == 64        # 47 -> 32, but monotone keeps 64
    assert AdaptiveBatch(32, 512, 32, monotone=False).propose(47.0, 64) == 32
    assert a.propose(1e6, 64) == 512        # clamped to max
    assert a.propose(10.0, 32) == 32        # 0 x 32 -> clamped to min
    assert a.propose(-5.0, 64) == 64 and a.propose(float("nan"), 64) == 64
    assert AdaptiveBatch(32, 512, 32, scale=0.5).propose(400.0, 32) == 192  # 200 / 32 = 6.25 -> 6
    assert a.sizes()[:3] == [32, 64, 96] and a.sizes()[-1] == 512
    a.validate(4, 8)
    with pytest.raises(ScheduleError):
        a.validate(8, 8)  # 32 % 64
    with pytest.raises(ScheduleError, match="multiple"):
        AdaptiveBatch(48, 512, 32)
    with pytest.raises(ScheduleError, match="multiple"):
        a.propose(100.0, 40)


# ----------------------------------------------------------------------------------------------
# Noise scale
# ----------------------------------------------------------------------------------------------
def test_noise_scale_exact_expectations():
    # |G|^2 = 4, tr(Sigma) = 320 -> B_simple = 80. E|G_B|^2 = |G|^2 + tr / B:
    # B_small 8: 4 + 320 / 8 = 44; B_big 64: 4 + 320 / 64 = 9.
    # |G|^2 = (64 x 9 - 8 x 44) / (64 - 8) = (576 - 352) / 56 = 4
    # tr = (44 - 9) / (1/8 - 1/64) = 35 / (7/64) = 320
    assert NoiseScaleEstimator.estimates(44.0, 9.0, 8, 64) == pytest.approx((4.0, 320.0))
    est = NoiseScaleEstimator(beta=0.9)
    assert est.b_simple is None and est.g_sq is None
    for _ in range(5):
        est.update(44.0, 9.0, 8, 64)
    # bias-corrected EMA of a constant is the constant
    assert est.g_sq == pytest.approx(4.0) and est.trace_sigma == pytest.approx(320.0)
    assert est.b_simple == pytest.approx(80.0)


def test_noise_scale_synthetic_gradients():
    # d = 16, true gradient 0.25 per coordinate -> |G|^2 = 16 x 0.0625 = 1; per-example noise
    # N(0, 2) per coordinate -> tr(Sigma) = 16 x 2 = 32; B_simple = 32. Rank 0 holds 4 of the 32
    # examples of the global batch, like data parallelism with 8 ranks.
    rng = random.Random(0)
    d, b_small, b_big, sd = 16, 4, 32, math.sqrt(2.0)
    est = NoiseScaleEstimator(beta=0.995)
    for _ in range(1500):
        ex = [[0.25 + sd * rng.gauss(0.0, 1.0) for _ in range(d)] for _ in range(b_big)]
        small = [sum(e[k] for e in ex[:b_small]) / b_small for k in range(d)]
        big = [sum(e[k] for e in ex) / b_big for k in range(d)]
        est.update(sum(x * x for x in small), sum(x * x for x in big), b_small, b_big)
    assert est.g_sq == pytest.approx(1.0, rel=0.15)
    assert est.trace_sigma == pytest.approx(32.0, rel=0.15)
    assert est.b_simple == pytest.approx(32.0, rel=0.2)


def test_noise_scale_state_and_edge_cases():
    a, b = NoiseScaleEstimator(0.9), NoiseScaleEstimator(0.5)
    data = [(44.0, 9.0), (40.0, 10.0), (50.0, 8.0), (43.0, 9.5)]
    for s, g in data[:2]:
        a.update(s, g, 8, 64)
    b.load_state_dict(a.state_dict())
    assert b.beta == 0.9
    for s, g in data[2:]:
        assert a.update(s, g, 8, 64) == b.update(s, g, 8, 64)
    assert a.state_dict() == b.state_dict()
    # an overflowed step is skipped, not folded in
    before = a.state_dict()
    assert a.update(float("inf"), 9.0, 8, 64) == a.b_simple
    assert a.skipped == 1 and a.count == before["count"]
    # signal swamped by noise: |G|^2 estimate <= 0 -> undefined
    c = NoiseScaleEstimator()
    c.update(10.0, 1.0, 8, 64)  # (64 x 1 - 8 x 10) / 56 < 0
    assert c.g_sq < 0 and c.b_simple is None
    with pytest.raises(ValueError):
        c.update(1.0, 1.0, 64, 8)  # b_big must exceed b_small
    with pytest.raises(ValueError):
        c.update(-1.0, 1.0, 8, 64)
    with pytest.raises(ValueError):
        NoiseScaleEstimator(beta=1.0)


# ----------------------------------------------------------------------------------------------
# Chinchilla budgets
# ----------------------------------------------------------------------------------------------
C70 = 6 * 70e9 * 1.4e12  # 5.88e23, Chinchilla's 70B / 1.4T point


def test_chinchilla_hoffmann_at_70b_point():
    # alpha A = 0.34 x 406.4 = 138.176; beta B = 0.28 x 410.7 = 114.996; ratio 1.201572
    # G = 1.201572^(1 / 0.62) = 1.344711; a = 0.28 / 0.62 = 0.451613; b = 0.548387
    # C/6 = 9.8e22, log10 = 22.991226
    # N = G x 10^(0.451613 x 22.991226) = 1.344711 x 10^10.383134 = 1.344711 x 2.41621e10 = 3.2491e10
    # D = 10^(0.548387 x 22.991226) / G = 4.05594e12 / 1.344711 = 3.0162e12 (92.8 tokens/param)
    f = get_fit("hoffmann")
    assert f.G == pytest.approx(1.344711, rel=1e-6)
    n, d = compute_optimal(C70, "hoffmann")
    assert n == pytest.approx(3.2491e10, rel=1e-4)
    assert d == pytest.approx(3.0162e12, rel=1e-4)
    assert 6 * n * d == pytest.approx(C70, rel=1e-12)
    # loss at the optimum: 1.69 + 406.4 / N^0.34 + 410.7 / D^0.28 = 1.69 + 0.10838 + 0.13161 = 1.92999
    assert loss(n, d, "hoffmann") == pytest.approx(1.92999, abs=1e-5)
    # Chinchilla itself: 1.69 + 406.4 / 70e9^0.34 + 410.7 / 1.4e12^0.28 = 1.69 + 0.08349 + 0.16316 = 1.93665
    assert loss(70e9, 1.4e12, "hoffmann") == pytest.approx(1.93665, abs=1e-5)
    # the published constants put the optimum at half the size and ~93 tokens/param, not 20
    assert d / n == pytest.approx(92.83, rel=1e-3)


def test_chinchilla_epoch_at_70b_point():
    # alpha A = 0.3478 x 482.01 = 167.6431; beta B = 0.3658 x 2085.43 = 762.8503; ratio 0.219759
    # G = 0.219759^(1 / 0.7136) = 0.119630; a = 0.3658 / 0.7136 = 0.512612; b = 0.487388
    # N = 0.119630 x 10^(0.512612 x 22.991226) = 0.119630 x 10^11.785581 = 0.119630 x 6.10353e11 = 7.3016e10
    # D = 10^(0.487388 x 22.991226) / G = 1.60563e11 / 0.119630 = 1.3422e12 (18.4 tokens/param)
    f = get_fit("epoch")
    assert f.G == pytest.approx(0.119630, rel=1e-5)
    n, d = compute_optimal(C70, "epoch")
    assert n == pytest.approx(7.3016e10, rel=1e-4)
    assert d == pytest.approx(1.3422e12, rel=1e-4)
    # 1.8172 + 482.01 / N^0.3478 + 2085.43 / D^0.3658 = 1.8172 + 0.08031 + 0.07636 = 1.97386
    assert loss(n, d) == pytest.approx(1.97386, abs=1e-5)
    # Chinchilla 70B / 1.4T is nearly optimal under the refit: 1.8172 + 0.08149 + 0.07519 = 1.97388
    assert loss(70e9, 1.4e12, "epoch") == pytest.approx(1.97388, abs=1e-5)
    assert optimal_loss(C70) <= loss(70e9, 1.4e12, "epoch")


def test_tokens_per_param_at_1e22():
    # the notes: the refit gives D/N ~ 20 at 1e22, the published constants ~63
    n, d = compute_optimal(1e22, "epoch")
    assert 19.0 < d / n < 22.0          # 20.37
    n, d = compute_optimal(1e22, "hoffmann")
    assert 60.0 < d / n < 66.0          # 62.58


def test_from_tokens_and_params():
    for fit in FITS:
        n, d = compute_optimal(1e21, fit)
        assert from_params(n, fit=fit)[1] == pytest.approx(d, rel=1e-9)
        assert from_tokens(d, fit=fit)[0] == pytest.approx(n, rel=1e-9)
    assert from_tokens(1.4e12, flops=C70) == pytest.approx((70e9, 1.4e12))
    assert from_params(70e9, flops=C70) == pytest.approx((70e9, 1.4e12))
    # flops_for_loss inverts optimal_loss
    assert flops_for_loss(optimal_loss(1e21)) == pytest.approx(1e21, rel=1e-6)
    with pytest.raises(ScheduleError):
        flops_for_loss(1.0)  # below E
    with pytest.raises(ScheduleError):
        compute_optimal(-1.0)
    with pytest.raises(ScheduleError, match="unknown loss fit"):
        get_fit("kaplan")


def test_gpu_hours_and_quantities():
    # 1000 h x 3600 s x 0.4 x 989e12 = 1.42416e21
    assert gpu_hours_to_flops(1000, 0.4, 989) == pytest.approx(1.42416e21)
    with pytest.raises(ScheduleError):
        gpu_hours_to_flops(1000, 1.5, 989)
    with pytest.raises(ScheduleError):
        gpu_hours_to_flops(-1, 0.4, 989)
    assert parse_quantity("1e21", "flops") == 1e21 and parse_quantity("70B", "params") == 7e10
    assert parse_quantity("1.4T", "tokens") == pytest.approx(1.4e12)
    for bad in ("0", "-3", "x", "1Q", "inf"):
        with pytest.raises(ScheduleError):
            parse_quantity(bad, "flops")


def test_budget_tokens_stages():
    b = Budget(tokens="10M")
    assert b.kind == "tokens" and b.fraction_to_tokens(0.25) == 2_500_000
    assert b.stage_tokens([0.25, None]) == [2_500_000, 7_500_000]
    assert b.stage_tokens([0.25, "5M", "rest"]) == [2_500_000, 5_000_000, 2_500_000]
    assert b.stage_tokens(["25%", 0.75]) == [2_500_000, 7_500_000]
    assert b.stage_tokens([0.1, 0.2, 0.7]) == [1_000_000, 2_000_000, 7_000_000]
    assert sum(Budget(tokens=1001).stage_tokens([1 / 3, 1 / 3, None])) == 1001
    for stages, fragment in [([0.5, 0.6], "more than"), ([0.25, 0.5], "add up"), ([0.5, 0.5, None], "nothing is left"),
                             ([None, None], "at most one"), (["11M"], "more than"), ([0.0, None], "fraction"),
                             ([-5, None], "positive"), (["150%"], "fraction"), ([], "no stages")]:
        with pytest.raises(ScheduleError) as e:
            b.stage_tokens(stages)
        assert fragment in one_line_error(e), (stages, str(e.value))


def test_budget_flops_stages():
    # 6e18 FLOPs; stage 0 is a 1e8-param model (6e8 FLOPs/token), stage 1 4e8 params (2.4e9).
    b = Budget(flops=6e18)
    # 0.25 x 6e18 = 1.5e18 / 6e8 = 2.5e9 tokens; the rest 4.5e18 / 2.4e9 = 1.875e9 tokens
    assert b.stage_tokens([0.25, None], flops_per_token=[6e8, 2.4e9]) == [2_500_000_000, 1_875_000_000]
    # 1B tokens on stage 0 = 6e17 FLOPs; the rest 5.4e18 / 2.4e9 = 2.25e9
    assert b.stage_tokens(["1B", "rest"], flops_per_token=[6e8, 2.4e9]) == [10**9, 2_250_000_000]
    assert b.fraction_to_tokens(0.5, flops_per_token=6e8) == 5 * 10**9
    with pytest.raises(ScheduleError, match="flops_per_token"):
        b.stage_tokens([0.25, None])
    with pytest.raises(ScheduleError, match="more than"):
        b.stage_tokens(["11B", None], flops_per_token=[6e8, 2.4e9])  # 11B x 6e8 = 6.6e18 > 6e18
    with pytest.raises(ScheduleError, match="nothing is left"):
        b.stage_tokens(["10B", None], flops_per_token=[6e8, 2.4e9])  # 10B x 6e8 = the whole 6e18


def test_budget_validation():
    for kwargs in ({}, {"tokens": 10, "flops": 1e20}):
        with pytest.raises(ScheduleError, match="exactly one"):
            Budget(**kwargs)
    for kwargs in ({"tokens": 0}, {"tokens": "-1M"}, {"flops": 0.0}, {"flops": "-1e20"}):
        with pytest.raises(ScheduleError):
            Budget(**kwargs)
    assert Budget(flops="1e21").total == 1e21 and Budget(flops="1e21").kind == "flops"


# ----------------------------------------------------------------------------------------------
# Planner
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fit", sorted(FITS))
def test_plan_growth_is_consistent(fit):
    C = 1e21
    p = plan_growth(C, fit)
    f = get_fit(fit)
    n_opt, d_opt = compute_optimal(C, fit)
    assert (p.scratch_params, p.scratch_tokens) == pytest.approx((n_opt, d_opt))
    # same FLOP budget, spent exactly
    assert p.small.flops + p.large.flops == pytest.approx(C, rel=1e-9)
    assert p.small.flops == pytest.approx(6 * p.small.params * p.small.tokens)
    # small model is one of the half-width/depth shapes
    assert any(p.small.params == pytest.approx(r * p.large.params) for r in SHAPES)
    # the credited tokens are loss-matched: L(N2, D_eq) = L(N1, D1)
    assert f.loss(p.large.params, p.effective_tokens) == pytest.approx(p.small.loss_end, rel=1e-9)
    assert p.predicted_loss == pytest.approx(f.loss(p.large.params, p.effective_tokens + p.large.tokens))
    assert p.helps and p.predicted_loss < p.scratch_loss
    assert flops_for_loss(p.predicted_loss, fit) == pytest.approx(p.scratch_flops_same_loss)
    assert 0 < p.flops_saving < 0.2
    # the chosen growth point is a local optimum: moving it 5% either way is not better
    for scale in (0.95, 1.05):
        fixed = plan_growth(C, fit, ratios=[p.small.params / p.large.params],
                            final_scale=p.large.params / n_opt,
                            grow_at=scale * p.grow_at_ratio)
        assert fixed.predicted_loss >= p.predicted_loss - 1e-12
    assert len(p.assumptions) >= 5 and all(isinstance(a, str) for a in p.assumptions)
    json.dumps(p.to_dict())


def test_plan_growth_values():
    e = plan_growth(1e21, "epoch")
    # epoch fit: half width (1/4 params), grown past the small model's compute-optimal point
    assert e.small.params / e.large.params == pytest.approx(0.25)
    assert 1.0 < e.grow_at_ratio < 1.6
    assert e.scratch_loss == pytest.approx(2.30553, abs=1e-5)
    assert e.predicted_loss == pytest.approx(2.3014, abs=5e-4)
    h = plan_growth(1e21, "hoffmann")
    assert h.small.params / h.large.params == pytest.approx(0.5)
    assert h.scratch_loss == pytest.approx(2.32888, abs=1e-5)
    # the relative plan is budget-independent (E cancels, both reducible terms scale alike)
    e2 = plan_growth(1e24, "epoch")
    assert e2.grow_at_ratio == pytest.approx(e.grow_at_ratio, rel=1e-2)
    assert e2.flops_saving == pytest.approx(e.flops_saving, rel=1e-2)


def test_plan_growth_options():
    none = plan_growth(1e21, transfer=0.0)
    assert not none.helps and none.predicted_loss == pytest.approx(none.scratch_loss, abs=1e-6)
    fixed = plan_growth(1e21, ratios=[0.25], final_scale=1.0, grow_at=2.0)
    assert fixed.large.params == pytest.approx(fixed.scratch_params)
    assert fixed.small.tokens == pytest.approx(2.0 * from_params(fixed.small.params)[1])
    with pytest.raises(ScheduleError, match="does not fit"):
        plan_growth(1e21, ratios=[0.5], final_scale=1.0, grow_at=100.0)
    for kwargs in ({"transfer": 2.0}, {"ratios": [1.5]}, {"final_scale": 0}):
        with pytest.raises(ScheduleError):
            plan_growth(1e21, **kwargs)
    with pytest.raises(ScheduleError):
        plan_growth(0)


# ----------------------------------------------------------------------------------------------
# dsgrow plan
# ----------------------------------------------------------------------------------------------
def test_cli_flops(capsys):
    assert main(["--flops", "1e21"]) == 0
    out = capsys.readouterr().out
    for piece in ("epoch", "2.78B", "60B", "21.6", "2.3055", "growth plan", "stage 1", "grow at", "stage 2",
                  "assumptions:", "function-preserving"):
        assert piece in out, piece
    assert main(["--flops", "1e21", "--fit", "hoffmann"]) == 0
    out = capsys.readouterr().out
    # hoffmann at 1e21: N 1.824e9, D 9.136e10, 50.1 tokens/param, loss 2.3289
    for piece in ("1.82B", "91.4B", "50.1", "2.3289"):
        assert piece in out, piece


def test_cli_variants(capsys):
    assert main(["--tokens", "1.4T"]) == 0
    out = capsys.readouterr().out
    n = from_tokens(1.4e12)[0]
    assert f"{n:.4g}" in out and "1.4T" in out
    assert main(["--params", "70B"]) == 0
    out = capsys.readouterr().out
    assert f"{from_params(70e9)[1]:.4g}" in out
    assert main(["--gpu-hours", "1000", "--mfu", "0.4", "--peak-tflops", "989"]) == 0
    assert "1.42e+21 FLOPs" in capsys.readouterr().out
    assert main(["--flops", "1e21", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["compute_optimal"]["params"] == pytest.approx(compute_optimal(1e21)[0])
    assert d["plan"]["small"]["tokens"] > 0


@pytest.mark.parametrize("argv", [
    [], ["--flops", "1e21", "--tokens", "1T"], ["--flops", "-1"], ["--flops", "0"], ["--flops", "abc"],
    ["--params", "1X"], ["--flops", "1e21", "--mfu", "0.3"], ["--gpu-hours", "10", "--mfu", "1.5"],
    ["--gpu-hours", "0"], ["--flops", "1e21", "--fit", "kaplan"], ["--flops", "1e21", "--transfer", "2"],
])
def test_cli_bad_input(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("dsgrow plan: error: ")


def test_cli_as_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="dsgrow")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--flops", "1e20"])
    assert args.func(args) == 0
    assert "compute-optimal" in capsys.readouterr().out
    args = parser.parse_args(["plan", "--flops", "1e20", "--mfu", "0.5"])
    assert args.func(args) == 2
    assert "dsgrow plan: error: --mfu" in capsys.readouterr().err
