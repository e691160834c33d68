#!/usr/bin/env python
"""Progressive training vs scratch: whole many-stage runs, small stages counted, to scratch's loss.

    python benchmarks/progressive.py --bench benchmarks/recipes/progressive/tiny-gpt2.yaml [--quick]
        [--work DIR] [--out benchmarks/results] [--only-tune]

Each variant is one dsgrow recipe run end to end by launchers/pretrain.py (1 rank): scratch (the
final model alone), or stages (e.g. a one-layer model grown to full depth at 80% of the tokens,
as Bu 2025, arXiv 2511.04981, runs it; or depth 1 -> 2 -> 4 -> 8), under cosine (each stage its own
warmup and decay: lr_after_growth restart) or WSD (one schedule over the run, stable through every
growth). Every FLOP that runs is counted: small stages, growth fits, the final stage.

Protocol (nothing is chosen on held-out loss, nothing is reported on the seed that chose it):
1. Tuning seed: every variant runs each LR of its sweep at the horizon (`tokens`); each variant
   keeps the LR with the lowest final TRAINING loss. The scratch baseline is the scratch variant
   (cosine or WSD) with the lowest final training loss: scratch gets its best schedule too.
2. Report seeds: scratch at its chosen LR and schedule gives the target, its final held-out
   loss, and its FLOPs. Each other variant runs at its chosen LR on a ladder of total token
   scales (1.0, then down or up the `scales` ladder until the target is bracketed); each rung is a
   complete run with its own full schedule (a WSD run's loss mid-stable-phase is not what a
   shorter run would end at, so curves are not cut). FLOPs to target: log-linear interpolation of
   final held-out loss against total FLOPs between the two rungs around the target.
3. Saving = 1 - FLOPs to target / scratch FLOPs, per seed, then mean and spread. Also the final
   loss at equal tokens (scale 1.0) against scratch's, the paper's comparison.
Variants with `tune_only: true` (e.g. growth timing) run on the tuning seed only, as does the
scratch schedule that lost there. A variant's `train:` (and a stage's) is merged into the run's
train section: `train: {subnetwork: {method: est}}` makes an EST variant (benchmarks/recipes/est/),
whose steps count their subnetwork's FLOPs; a variant with neither stages nor a subnetwork is a
scratch baseline. Wall time to target is interpolated the same way (indicative on a shared CPU).

A finished run is reused only when its key (the full recipe it ran and a hash of dsgrow's source
and the launcher) matches; anything else runs again. Writes progressive-NAME.json, .md and .png.
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.config import parse_count  # noqa: E402
from growth_vs_scratch import merge, read_bench  # noqa: E402  (this folder is on sys.path: a script, or the tests)
from runcache import KeyedRuns  # noqa: E402

KNOWN = {"name", "base", "tokens", "lrs", "tune_seed", "seeds", "scales", "variants", "quick"}
VARIANT_KEYS = {"schedule", "stages", "grow", "lrs", "tune_only", "train"}


def load_bench(path: str, quick: bool) -> dict:
    cfg = read_bench(path, KNOWN)
    if quick:
        q = cfg.get("quick") or {}
        cfg = merge(cfg, {k: v for k, v in q.items() if k != "variants"})
        cfg["variants"] = q.get("variants", cfg["variants"])  # replaced, not merged
    cfg.pop("quick", None)
    for key in ("base", "tokens", "variants", "lrs"):
        if key not in cfg:
            raise SystemExit(f"{path}: missing {key}")
    cfg["tokens"] = parse_count(cfg["tokens"], "tokens")
    cfg.setdefault("tune_seed", 1)
    cfg.setdefault("seeds", [2, 3, 4])
    cfg.setdefault("scales", [0.44, 0.67, 1.0, 1.5, 2.25])
    if 1.0 not in cfg["scales"] or cfg["scales"] != sorted(cfg["scales"]):
        raise SystemExit(f"{path}: scales must be ascending and contain 1.0")
    if cfg["tune_seed"] in cfg["seeds"]:
        raise SystemExit(f"{path}: the tuning seed {cfg['tune_seed']} may not be a report seed")
    scratch = [k for k, v in cfg["variants"].items() if is_scratch(v)]
    if not scratch:
        raise SystemExit(f"{path}: at least one scratch variant (no stages) is needed")
    for label, v in cfg["variants"].items():
        bad = sorted(set(v) - VARIANT_KEYS)
        if bad:
            raise SystemExit(f"{path}: variants.{label}: unknown key {bad[0]} (known: {', '.join(sorted(VARIANT_KEYS))})")
    return cfg


def is_scratch(v: dict) -> bool:
    """A scratch baseline: the final model alone, every step the full model (no stages, no EST)."""
    return not v.get("stages") and not (v.get("train") or {}).get("subnetwork")


def block_tokens(cfg: dict) -> int:
    t = cfg["base"]["train"]
    return int(t["global_batch"]) * int(t["seq_len"])


def recipe_of(cfg: dict, label: str, lr: float, seed: int, scale: float) -> dict:
    """The dsgrow recipe of one run: variant `label` at LR `lr`, `scale` x the horizon's tokens.
    Stage boundaries are `until` fractions of the run, rounded to whole optimizer steps."""
    v = cfg["variants"][label]
    blk = block_tokens(cfg)
    total = max(int(round(cfg["tokens"] * scale / blk)), 1) * blk
    r = copy.deepcopy(cfg["base"])
    r["name"] = f"{cfg['name']}-{label}"
    r["export_hf"] = False
    tr = {**r.get("train", {}), **(v.get("train") or {}), "lr": lr, "seed": seed,
          "lr_schedule": v.get("schedule", "cosine")}
    tr["eval_every"] = total  # the final evaluation is what counts; evaluations cost wall time only
    stages = v.get("stages")
    if not stages:
        r["stages"] = None
        tr["tokens"] = total
    else:
        tr["tokens"] = None
        out, done = [], 0
        for i, s in enumerate(stages):
            end = total if i == len(stages) - 1 else int(round(total * float(s["until"]) / blk)) * blk
            st = {"model": dict(s.get("model") or {}), "tokens": end - done}
            if i > 0:
                st["grow"] = dict(s.get("grow") or v.get("grow") or {"method": "stack"})
            if s.get("train"):
                st["train"] = dict(s["train"])
            out.append(st)
            done = end
        r["stages"] = out
    r["train"] = tr
    return r


class Runner(KeyedRuns):
    def run(self, name: str, recipe: dict) -> dict:
        """Run (or reuse, when the key matches) one recipe; its summary and final train loss."""
        self.work.mkdir(parents=True, exist_ok=True)
        rp = self.work / f"{name}.yaml"
        rp.write_text(yaml.safe_dump(recipe, sort_keys=True))
        out, secs = self.launch(name, rp)
        res = result(out)
        if secs is not None:
            print(f"  {name}: {secs:.0f} s, val {res['val_loss']:.4f}, {res['flops']:.3e} FLOPs", flush=True)
        return res


def result(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "growth"]
    return {"val_loss": s["val_loss"], "train_loss": s["train_loss"], "flops": s["flops"], "tokens": s["tokens"],
            "wall_s": s["wall_time_s"],
            "growths": [{"step": e["step"], "loss_before": e["loss_before"], "loss_after": e["loss_after"]}
                        for e in events]}


def flops_to_target(points: list[tuple[float, float]], target: float):
    """(flops, bound) from (flops, final loss) rungs sorted by FLOPs: log-linear interpolation
    between the last rung above `target` and the first at or below it. bound: "=" interpolated,
    "<=" reached already at the cheapest rung, None never reached."""
    pts = sorted(points)
    for i, (f, loss) in enumerate(pts):
        if loss <= target:
            if i == 0:
                return f, "<="
            f0, l0 = pts[i - 1]
            w = (l0 - target) / (l0 - loss)
            return math.exp(math.log(f0) + w * (math.log(f) - math.log(f0))), "="
    return None, None


def ladder(cfg: dict, runner: Runner, label: str, lr: float, seed: int, target: float) -> list[dict]:
    """Rungs of `label` at `lr` from scale 1.0, down while the target is reached, up while not."""
    scales = cfg["scales"]
    i = scales.index(1.0)
    rungs = []

    def rung(j):
        res = runner.run(f"{label}-s{scales[j]:g}-lr{lr:g}", recipe_of(cfg, label, lr, seed, scales[j]))
        rungs.append({"scale": scales[j], **res})
        return res["val_loss"] <= target

    if rung(i):
        for j in range(i - 1, -1, -1):
            if not rung(j):
                break
    else:
        for j in range(i + 1, len(scales)):
            if rung(j):
                break
    return sorted(rungs, key=lambda r: r["flops"])


def bench(cfg: dict, work_root: Path, ds_config: str, env: dict, only_tune: bool) -> dict:
    variants = cfg["variants"]
    tune = Runner(work_root / f"seed{cfg['tune_seed']}", ds_config, env)
    print(f"tuning seed {cfg['tune_seed']}: runs in {tune.work}", flush=True)
    sweeps = {}
    for label, v in variants.items():
        runs = {lr: tune.run(f"{label}-s1-lr{lr:g}", recipe_of(cfg, label, lr, cfg["tune_seed"], 1.0))
                for lr in v.get("lrs", cfg["lrs"])}
        best = min(runs, key=lambda lr: runs[lr]["train_loss"])
        sweeps[label] = {"lr": best, "runs": {f"{lr:g}": r for lr, r in runs.items()}}
    scratch = [k for k, v in variants.items() if is_scratch(v)]
    base = min(scratch, key=lambda k: sweeps[k]["runs"][f"{sweeps[k]['lr']:g}"]["train_loss"])
    res = {"tuning": sweeps, "scratch_choice": base, "seeds": {}}
    if only_tune:
        return res
    for seed in cfg["seeds"]:
        runner = Runner(work_root / f"seed{seed}", ds_config, env)
        print(f"report seed {seed}: runs in {runner.work}", flush=True)
        lr = sweeps[base]["lr"]
        ref = runner.run(f"{base}-s1-lr{lr:g}", recipe_of(cfg, base, lr, seed, 1.0))
        per = {"target": ref["val_loss"], "scratch": {"label": base, "lr": lr, **ref}, "variants": {}}
        for label, v in variants.items():
            if label == base or v.get("tune_only"):
                continue
            if is_scratch(v):  # scratch's other schedule lost on the tuning seed: not rerun
                continue
            per["variants"][label] = {"lr": sweeps[label]["lr"],
                                      "rungs": ladder(cfg, runner, label, sweeps[label]["lr"], seed, ref["val_loss"])}
            entry = per["variants"][label]
            f, bound = flops_to_target([(r["flops"], r["val_loss"]) for r in entry["rungs"]], ref["val_loss"])
            one = next(r for r in entry["rungs"] if r["scale"] == 1.0)
            # Wall time to target the same way (this shared 2-core CPU: indicative, not a claim).
            w, _ = flops_to_target([(r["wall_s"], r["val_loss"]) for r in entry["rungs"]], ref["val_loss"])
            entry.update(flops_to_target=f, bound=bound,
                         saving=(1.0 - f / ref["flops"]) if f is not None else None,
                         wall_saving=(1.0 - w / ref["wall_s"]) if w is not None else None,
                         equal_tokens_loss=one["val_loss"], equal_tokens_flops_ratio=one["flops"] / ref["flops"])
        res["seeds"][str(seed)] = per
    return res


def summarise(cfg: dict, res: dict) -> dict:
    out = {}
    for label in cfg["variants"]:
        rows = [s["variants"][label] for s in res["seeds"].values() if label in s["variants"]]
        if not rows:
            continue
        savings = [r["saving"] for r in rows]
        deltas = [(r["equal_tokens_loss"] / s["target"] - 1.0) for s, r in
                  zip(res["seeds"].values(), rows)]
        got = [x for x in savings if x is not None]
        out[label] = {
            "seeds_reached": f"{len(got)}/{len(rows)}",
            "saving_mean": statistics.mean(got) if got else None,
            "saving_min": min(got) if got else None, "saving_max": max(got) if got else None,
            "bounds": [r["bound"] for r in rows],
            "equal_tokens_loss_delta_mean": statistics.mean(deltas),
            "equal_tokens_flops_ratio": statistics.mean(r["equal_tokens_flops_ratio"] for r in rows),
            "wall_saving_mean": (statistics.mean(x for x in (r.get("wall_saving") for r in rows) if x is not None)
                                 if any(r.get("wall_saving") is not None for r in rows) else None),
        }
    return out


def pct(x, spec=".1f"):
    return "-" if x is None else f"{100 * x:{spec}}%"


def table(cfg: dict, res: dict, summ: dict) -> str:
    tune = res["tuning"]
    lines = [f"Tuning seed {cfg['tune_seed']} (LR picked by final train loss; scratch baseline: "
             f"{res['scratch_choice']}):", "",
             "| variant | LR sweep (final train loss) | picked | held-out at picked | FLOPs |", "|---|---|---|---|---|"]
    for label, s in tune.items():
        sweep = ", ".join(f"{lr}: {r['train_loss']:.4f}" for lr, r in s["runs"].items())
        r = s["runs"][f"{s['lr']:g}"]
        lines.append(f"| {label} | {sweep} | {s['lr']:g} | {r['val_loss']:.4f} | {r['flops']:.3e} |")
    if res["seeds"]:
        seeds = ", ".join(res["seeds"])
        lines += ["", f"Report seeds {seeds} (target: each seed's scratch final held-out loss):", "",
                  "| variant | saving to target, mean [min, max] | reached | loss at equal tokens vs scratch | FLOPs at equal tokens "
                  "| wall-time saving to target (mean) |",
                  "|---|---|---|---|---|---|"]
        for label, s in summ.items():
            bounds = "" if all(b == "=" for b in s["bounds"] if b) else f" (bounds: {s['bounds']})"
            lines.append(f"| {label} | {pct(s['saving_mean'])} [{pct(s['saving_min'])}, {pct(s['saving_max'])}]{bounds} "
                         f"| {s['seeds_reached']} | {s['equal_tokens_loss_delta_mean'] * 100:+.2f}% "
                         f"| {100 * s['equal_tokens_flops_ratio']:.0f}% | {pct(s.get('wall_saving_mean'))} |")
        lines += ["", "Targets: " + ", ".join(f"seed {k}: {v['target']:.4f} ({v['scratch']['flops']:.3e} FLOPs)"
                                            for k, v in res["seeds"].items())]
    return "\n".join(lines) + "\n"


def plot(cfg: dict, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (seed, per) in enumerate(res["seeds"].items()):
        ax.axhline(per["target"], color="k", lw=0.6, ls=":")
        ax.scatter([per["scratch"]["flops"]], [per["target"]], color="k", marker="x", label="scratch" if k == 0 else None)
        for i, (label, v) in enumerate(per["variants"].items()):
            xs = [r["flops"] for r in v["rungs"]]
            ys = [r["val_loss"] for r in v["rungs"]]
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=label if k == 0 else None, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("total training FLOPs (every stage, fits included)")
    ax.set_ylabel("final held-out loss")
    ax.set_title(f"{cfg['name']}: complete runs per token scale; dotted: scratch, per seed", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="benchmark YAML (benchmarks/recipes/progressive/*.yaml, "
                   "benchmarks/recipes/est/*.yaml)")
    p.add_argument("--quick", action="store_true", help="the file's quick: overrides (a smoke test, no claims)")
    p.add_argument("--work", default=None, help="run folder (default runs/progressive/NAME[-quick])")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--only-tune", action="store_true", help="the tuning seed's sweeps only")
    a = p.parse_args()
    cfg = load_bench(a.bench, a.quick)
    name = cfg["name"] + ("-quick" if a.quick else "")
    check_recipes(cfg)
    work = Path(a.work or REPO / "runs" / "progressive" / name)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    t0 = time.time()
    res = bench(cfg, work, a.ds_config, env, a.only_tune)
    summ = summarise(cfg, res)
    res.update(name=name, bench=cfg, summary=summ, wall_s=time.time() - t0,
               date=datetime.date.today().isoformat(), machine=f"{platform.platform()}, {os.cpu_count()} CPUs")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"progressive-{name}.json").write_text(json.dumps(res, indent=1))
    md = f"# Progressive training: {name} ({res['date']}, {res['machine']})\n\n" + table(cfg, res, summ)
    (out / f"progressive-{name}.md").write_text(md)
    if res["seeds"]:
        plot(cfg, res, out / f"progressive-{name}.png")
    print(md)
    return 0


def check_recipes(cfg: dict) -> None:
    """Every run's recipe loads (stages, growth requests, schedules) before anything trains."""
    from dsgrow.config import ConfigError
    from dsgrow.recipe import recipe_from_tree

    for label, v in cfg["variants"].items():
        for scale in cfg["scales"]:
            try:
                recipe_from_tree(recipe_of(cfg, label, v.get("lrs", cfg["lrs"])[0], cfg["tune_seed"], scale))
            except (ConfigError, ValueError) as e:
                raise SystemExit(f"variants.{label} at scale {scale:g}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
