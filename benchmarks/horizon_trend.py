#!/usr/bin/env python
"""The saving against the large model's tokens per parameter, gathered from growth-vs-scratch results.

    python benchmarks/horizon_trend.py RESULT.json [RESULT.json ...] [--name NAME] [--seeds 12]
        [--methods ligo,fpi-noise] [--out benchmarks/results]

growth_vs_scratch.py measures one horizon (or a few) per invocation, and the horizons of one study
are run in different invocations (1x on seeds 11-13, 3x on 12-14, 9x on one seed, ...). This puts
them on one axis: every (method, growth timing, seed, horizon) point of the given results, a table
per series (a method under one growth timing) and a plot of the saving (small model given) against
tokens per parameter. Nothing is run or re-scored: each point is the row its benchmark wrote.

- One pair on one corpus: the results must come from the same recipe apart from its seeds,
  horizons, growth timing and method list, and a method label must mean the same options in every
  file (else a one-line error).
- Growth timing: at horizon h > 1 a grown row started either from the 1x small model ("fixed
  small") or from one trained h times as long ("small x h", `small_scales_with_horizon`); at 1x the
  two are the same run, so the 1x points belong to both series.
- The same point in two files (a seed's run measured twice): the file given later wins, and the
  replaced one is listed in the output (so a rerun is never averaged with the run it repeats).
- Means are over the seeds each horizon has (the table names them); `--seeds` keeps only some, for a
  like-for-like trend. A mean is given only where every seed reached scratch's loss.
Writes horizon_trend-NAME.json, .md and .png under --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# recipe keys that may differ between the results of one trend
VARYING = {"seeds", "horizons", "small_scales_with_horizon", "methods"}
FIXED, SCALED = "fixed small", "small x h"


def _hkey(h: str) -> float:
    return float(h)


def _horizons(seed: dict) -> dict:
    """The seed's horizons in one shape ({"1": {rows, target, large_tokens?}}); results made before
    horizons existed hold 1x at the top level only."""
    return seed.get("horizons") or {"1": {"rows": seed["rows"], "target": seed["target"]}}


def gather(paths: list[str]) -> tuple[dict, list[dict], list[dict]]:
    """(the common recipe, the points, the points a later file replaced)."""
    base, opts, points, replaced = None, {}, {}, []
    for path in paths:
        res = json.loads(Path(path).read_text())
        recipe = res["recipe"]
        common = {k: v for k, v in recipe.items() if k not in VARYING}
        if base is None:
            base = common
        elif common != base:
            diff = sorted(k for k in set(common) | set(base) if common.get(k) != base.get(k))
            raise SystemExit(f"horizon_trend: {Path(path).name} is from another recipe than {Path(paths[0]).name} "
                             f"(differs in {', '.join(diff)}); a trend is one pair on one corpus")
        scaled = bool(recipe.get("small_scales_with_horizon", False))
        for seed in res["seeds"]:
            for h, hz in _horizons(seed).items():
                rows = hz["rows"]
                params = rows["scratch"]["curve"]["params"]
                tokens = hz.get("large_tokens", recipe["large_tokens"] * _hkey(h))
                timing = "" if _hkey(h) == 1 else (SCALED if scaled else FIXED)
                for m, row in rows.items():
                    if m == "scratch":
                        continue
                    o = (recipe.get("methods") or {}).get(m)
                    if m in opts and o != opts[m][0]:
                        raise SystemExit(f"horizon_trend: method {m} has other options in {Path(path).name} "
                                         f"({o}) than in {opts[m][1]} ({opts[m][0]})")
                    opts.setdefault(m, (o, Path(path).name))
                    p = {"method": m, "timing": timing, "seed": seed["seed"], "horizon": h,
                         "tokens_per_param": tokens / params, "target": hz["target"],
                         "saving_given": row.get("saving_given"), "saving_end_to_end": row.get("saving_end_to_end"),
                         "head_start": row.get("head_start"), "final_val_loss": row.get("final_val_loss"),
                         "lr": row.get("lr"), "source": Path(path).name}
                    key = (m, timing, seed["seed"], h)
                    if key in points:
                        replaced.append(points[key])
                    points[key] = p
    return base, list(points.values()), replaced


def series(points: list[dict]) -> dict:
    """{(method, timing): {horizon: [points by seed]}}; 1x points join every timing of their method
    (and make a series of their own only where the method has no longer horizon)."""
    out: dict = {}
    timings = {(p["method"], p["timing"]) for p in points if p["timing"]}
    for p in sorted(points, key=lambda p: (p["method"], _hkey(p["horizon"]), p["seed"])):
        ts = [t for (m, t) in timings if m == p["method"]] if not p["timing"] else [p["timing"]]
        for t in ts or [FIXED]:
            out.setdefault((p["method"], t), {}).setdefault(p["horizon"], []).append(p)
    return out


def _mean(vals: list):
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def summarise(points: list[dict]) -> list[dict]:
    rows = []
    for (m, t), by_h in sorted(series(points).items()):
        for h in sorted(by_h, key=_hkey):
            ps = by_h[h]
            given = [p["saving_given"] for p in ps]
            rows.append({"method": m, "timing": t, "horizon": h, "tokens_per_param": ps[0]["tokens_per_param"],
                         "seeds": [p["seed"] for p in ps], "saving_given": given,
                         "mean_given": _mean(given), "mean_end_to_end": _mean([p["saving_end_to_end"] for p in ps]),
                         "mean_head_start": _mean([p["head_start"] for p in ps]),
                         "reached": sum(v is not None for v in given)})
    return rows


def _pct(x) -> str:
    return "never" if x is None else f"{100 * x:.1f}%"


def markdown(name: str, summary: list[dict], replaced: list[dict], sources: list[str]) -> str:
    lines = [f"# Saving vs horizon: {name}", "", "From: " + ", ".join(sources), "",
             "| method | growth timing | horizon | tokens / param | seeds | saving given per seed | mean given "
             "| mean end to end | mean head start |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        mean = _pct(r["mean_given"]) if r["mean_given"] is not None else f"{r['reached']} of {len(r['seeds'])} reached"
        lines.append(f"| {r['method']} | {r['timing']} | {r['horizon']}x | {r['tokens_per_param']:.2f} | "
                     f"{', '.join(map(str, r['seeds']))} | {' / '.join(_pct(v) for v in r['saving_given'])} | {mean} | "
                     f"{_pct(r['mean_end_to_end']) if r['mean_end_to_end'] is not None else '-'} | "
                     f"{_pct(r['mean_head_start']) if r['mean_head_start'] is not None else '-'} |")
    if replaced:
        lines += ["", "Replaced by a later file: " + "; ".join(
            f"{p['method']} seed {p['seed']} {p['horizon']}x from {p['source']}" for p in replaced)]
    return "\n".join(lines) + "\n"


def plot(name: str, summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    by = {}
    for r in summary:
        by.setdefault((r["method"], r["timing"]), []).append(r)
    for (m, t), rs in by.items():
        xs = [r["tokens_per_param"] for r in rs if r["mean_given"] is not None]
        ys = [100 * r["mean_given"] for r in rs if r["mean_given"] is not None]
        line, = ax.plot(xs, ys, marker="o", ls="-" if t == SCALED else "--", label=f"{m} ({t})")
        for r in rs:  # every seed's own point, small; a seed that never reached sits open at 0
            for v in r["saving_given"]:
                ax.plot([r["tokens_per_param"]], [0.0 if v is None else 100 * v], ls="none", marker=".",
                        mfc="none" if v is None else line.get_color(), color=line.get_color(), alpha=0.6)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("large model's training tokens per parameter")
    ax.set_ylabel("FLOPs saved to scratch's loss, small model given (%)")
    ax.set_title(f"{name}: saving vs horizon (line: mean over seeds; dots: seeds)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("results", nargs="+", help="growth_vs_scratch result JSONs of one pair and corpus")
    p.add_argument("--name", default=None, help="output name (default: the recipe's name)")
    p.add_argument("--seeds", default=None, help="comma list: keep only these seeds")
    p.add_argument("--methods", default=None, help="comma list: keep only these methods")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args(argv)
    missing = [r for r in a.results if not Path(r).is_file()]
    if missing:
        raise SystemExit(f"horizon_trend: no such result file: {missing[0]}")
    try:
        seeds = {int(x) for x in a.seeds.split(",")} if a.seeds else None
    except ValueError:
        raise SystemExit(f"--seeds: expected a comma list of integers, got {a.seeds!r}") from None
    recipe, points, replaced = gather(a.results)
    if seeds is not None:
        points = [q for q in points if q["seed"] in seeds]
    if a.methods:
        want = a.methods.split(",")
        unknown = sorted(set(want) - {q["method"] for q in points})
        if unknown:
            raise SystemExit(f"--methods: {unknown[0]} is in none of the results")
        points = [q for q in points if q["method"] in want]
    if not points:
        raise SystemExit("horizon_trend: no grown rows left to plot")
    name = a.name or recipe["name"]
    summary = summarise(points)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(name, summary, replaced, [Path(r).name for r in a.results])
    (out / f"horizon_trend-{name}.md").write_text(md)
    (out / f"horizon_trend-{name}.json").write_text(json.dumps(
        {"name": name, "recipe": recipe, "sources": [Path(r).name for r in a.results], "summary": summary,
         "points": points, "replaced": replaced}, indent=1))
    plot(name, summary, out / f"horizon_trend-{name}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
