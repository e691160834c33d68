"""benchmarks/horizon_trend.py: growth-vs-scratch results of one pair gathered onto one
saving-vs-tokens-per-parameter axis, without re-scoring anything."""
from __future__ import annotations

import json

import pytest

from test_benchmarks import bench_module

PARAMS = 1000
RECIPE = {"name": "pair", "large_tokens": 200, "base": {"model": {"layers": 4}},
          "methods": {"ligo": {"fit_steps": 10}, "fpi": {"noise": 0.2}}}


def result(tmp_path, fname, seeds: dict, scaled=False, horizons=True, methods=None):
    """A growth_vs_scratch result: seeds = {seed: {h: {method: saving given or None}}}."""
    out = []
    for seed, by_h in seeds.items():
        hz = {}
        for h, savings in by_h.items():
            rows = {"scratch": {"curve": {"params": PARAMS}, "saving_given": 0.0}}
            for m, v in savings.items():
                rows[m] = {"saving_given": v, "saving_end_to_end": None if v is None else v - 0.1,
                           "head_start": 0.3 / float(h), "final_val_loss": 4.0, "lr": 3e-3}
            hz[h] = {"rows": rows, "target": 4.5, "large_tokens": RECIPE["large_tokens"] * float(h)}
        first = hz[min(hz, key=float)]
        s = {"seed": seed, "rows": first["rows"], "target": first["target"]}
        if horizons:
            s["horizons"] = hz
        out.append(s)
    recipe = dict(RECIPE, seeds=list(seeds), horizons=[float(h) for h in next(iter(seeds.values()))],
                  small_scales_with_horizon=scaled, methods=methods or RECIPE["methods"])
    path = tmp_path / fname
    path.write_text(json.dumps({"name": "x", "recipe": recipe, "seeds": out}))
    return str(path)


def test_horizons_from_several_results_make_one_trend_per_method_and_timing(tmp_path):
    ht = bench_module("horizon_trend")
    one = result(tmp_path, "1x.json", {11: {"1": {"ligo": 0.5, "fpi": 0.4}}, 12: {"1": {"ligo": 0.6, "fpi": 0.3}}},
                 horizons=False)  # made before horizons existed: 1x at the top level only
    fixed = result(tmp_path, "3x.json", {12: {"3": {"ligo": 0.1, "fpi": None}}})
    scaled = result(tmp_path, "3x9x-smallxh.json", {12: {"3": {"ligo": 0.35, "fpi": 0.3}, "9": {"ligo": 0.2}}},
                    scaled=True)
    rerun = result(tmp_path, "rerun.json", {12: {"1": {"ligo": 0.62}}})  # seed 12's 1x LiGO measured again
    recipe, points, replaced = ht.gather([one, fixed, scaled, rerun])
    assert recipe["name"] == "pair"
    # the rerun replaces seed 12's first 1x LiGO point, is listed, and is never averaged with it
    assert [(p["method"], p["seed"], p["saving_given"], p["source"]) for p in replaced] == [
        ("ligo", 12, 0.6, "1x.json")]
    rows = {(r["method"], r["timing"], r["horizon"]): r for r in ht.summarise(points)}
    # 1x belongs to both growth timings (it is the same run); h > 1 to its own
    for t in (ht.FIXED, ht.SCALED):
        assert rows[("ligo", t, "1")]["seeds"] == [11, 12]
        assert rows[("ligo", t, "1")]["mean_given"] == pytest.approx((0.5 + 0.62) / 2)
    assert rows[("ligo", ht.FIXED, "3")]["mean_given"] == pytest.approx(0.1)
    assert rows[("ligo", ht.SCALED, "3")]["mean_given"] == pytest.approx(0.35)
    assert rows[("ligo", ht.SCALED, "9")]["tokens_per_param"] == pytest.approx(9 * 200 / PARAMS)
    assert ("ligo", ht.FIXED, "9") not in rows
    # a seed that never reached scratch's loss: no mean, and the count says so
    never = rows[("fpi", ht.FIXED, "3")]
    assert never["mean_given"] is None and never["reached"] == 0 and never["saving_given"] == [None]
    assert rows[("fpi", ht.SCALED, "3")]["mean_end_to_end"] == pytest.approx(0.2)
    md = ht.markdown("pair", ht.summarise(points), replaced, ["a"])
    assert "| ligo | small x h | 9x | 1.80 | 12 | 20.0% | 20.0% |" in md
    assert "| fpi | fixed small | 3x | 0.60 | 12 | never | 0 of 1 reached |" in md
    assert "ligo seed 12 1x from 1x.json" in md


def test_results_of_another_pair_or_other_method_options_are_refused(tmp_path):
    ht = bench_module("horizon_trend")
    a = result(tmp_path, "a.json", {11: {"1": {"ligo": 0.5}}})
    other = result(tmp_path, "b.json", {11: {"3": {"ligo": 0.2}}})
    data = json.loads(open(other).read())
    data["recipe"]["large_tokens"] = 400
    open(other, "w").write(json.dumps(data))
    with pytest.raises(SystemExit, match=r"b.json is from another recipe .*differs in large_tokens"):
        ht.gather([a, other])
    relabelled = result(tmp_path, "c.json", {12: {"1": {"ligo": 0.5}}}, methods={"ligo": {"fit_steps": 30}})
    with pytest.raises(SystemExit, match="method ligo has other options in c.json"):
        ht.gather([a, relabelled])


def test_main_writes_the_table_json_and_plot_and_filters(tmp_path):
    ht = bench_module("horizon_trend")
    a = result(tmp_path, "a.json", {11: {"1": {"ligo": 0.5, "fpi": 0.4}, "3": {"ligo": 0.3, "fpi": 0.2}},
                                    12: {"1": {"ligo": 0.7, "fpi": 0.6}, "3": {"ligo": 0.4, "fpi": None}}},
               scaled=True)
    out = tmp_path / "out"
    assert ht.main([a, "--seeds", "12", "--methods", "ligo", "--out", str(out), "--name", "t"]) == 0
    res = json.loads((out / "horizon_trend-t.json").read_text())
    assert {(p["method"], p["seed"]) for p in res["points"]} == {("ligo", 12)}
    assert [r["mean_given"] for r in res["summary"]] == pytest.approx([0.7, 0.4])
    assert (out / "horizon_trend-t.png").stat().st_size > 0 and "| ligo |" in (out / "horizon_trend-t.md").read_text()
    with pytest.raises(SystemExit, match="--methods: stack is in none of the results"):
        ht.main([a, "--methods", "stack", "--out", str(out)])
    with pytest.raises(SystemExit, match="no such result file"):
        ht.main([str(tmp_path / "nope.json"), "--out", str(out)])
    with pytest.raises(SystemExit, match="--seeds: expected a comma list"):
        ht.main([a, "--seeds", "x", "--out", str(out)])
