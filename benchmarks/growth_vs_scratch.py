#!/usr/bin/env python
"""Growth vs scratch: FLOPs and wall time to the scratch run's held-out loss, per growth method.

    python benchmarks/growth_vs_scratch.py --recipe benchmarks/recipes/tiny-gpt2.yaml [--quick]
        [--work DIR] [--methods ligo,stack] [--out benchmarks/results]

Every run is a real launcher run (launchers/pretrain.py, 1 rank, the given ds_config) on the same
corpus, tokenizer, data order, held-out split, LR schedule shape and seed:

- scratch: the large model from random init for `large_tokens` (one run per LR in `scratch_lrs`,
           default `lrs`: scratch may get its own, wider sweep);
- small:   the small model for its own `small.tokens` (shared by every grown run);
- grown:   per method, the small model grown in one process (dsgrow.growth.grow; LiGO fitted on
           the training split with its FLOPs counted), then the large model trained from those
           weights (train.init_from) for `large_tokens` (one run per LR in `lrs`).

A `methods` entry is a method's options (`ligo: {fit_steps: 20}`) or a labelled variant naming its
method (`ligo-fit10: {method: ligo, fit_steps: 10}`). Two keys of an entry are for the grown run,
not the growth: `lrs` (that method's own LR sweep) and `train` (recipe `train:` fields for the runs
after growth, e.g. a longer post-growth warmup `{warmup_tokens: 0.15}`; not `lr`, use `lrs`).

Runs whose LR is swept pick their LR by final TRAINING loss: nothing is tuned on the held-out
split. The target is the scratch run's final held-out loss. Per method it reports the FLOPs and
wall time to reach it (linear interpolation between evaluations), the saving (a) with the small
model given (operator fit counted, the papers' setting) and (b) end to end (the small model's
training counted too), the held-out loss at equal FLOPs, and whether the target was reached.
Writes growth_vs_scratch-NAME.json, .md (table) and .png (loss vs FLOPs) under --out. Finished
runs in --work are reused, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.config import parse_count  # noqa: E402

KNOWN = {"name", "base", "small", "large_tokens", "evals", "lrs", "scratch_lrs", "seeds", "methods", "quick"}


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "methods" else v
    return out


def read_bench(path: str, known: set) -> dict:
    """A benchmark YAML as a mapping whose top-level keys are all in `known` (else one line, exit)."""
    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping")
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown key {unknown[0]} (known: {', '.join(sorted(known))})")
    return cfg


def load_bench(path: str, quick: bool) -> dict:
    cfg = read_bench(path, KNOWN)
    if quick:
        cfg = merge(cfg, cfg.get("quick") or {})
    cfg.pop("quick", None)
    for key in ("base", "small", "large_tokens", "methods"):
        if key not in cfg:
            raise SystemExit(f"{path}: missing {key}")
    cfg["small"]["tokens"] = parse_count(cfg["small"]["tokens"], "small.tokens")
    cfg["large_tokens"] = parse_count(cfg["large_tokens"], "large_tokens")
    cfg.setdefault("evals", 16)
    cfg.setdefault("lrs", [cfg["base"].get("train", {}).get("lr", 1e-3)])
    cfg.setdefault("scratch_lrs", cfg["lrs"])
    cfg.setdefault("seeds", [1234])
    return cfg


class Runner:
    def __init__(self, cfg: dict, work: Path, ds_config: str, env: dict):
        self.cfg, self.work, self.ds_config, self.env = cfg, work, ds_config, env

    def recipe(self, name: str, model: dict, tokens: int, lr: float, seed: int, init_from: str | None = None,
               export: bool = False, train: dict | None = None) -> Path:
        base = self.cfg["base"]
        r = merge(base, {"model": model})
        r["name"] = name
        r["export_hf"] = export
        r["train"] = {**r.get("train", {}), **(train or {}), "tokens": tokens, "lr": lr, "seed": seed,
                      "eval_every": max(tokens // self.cfg["evals"], 1), "init_from": init_from}
        p = self.work / f"{name}.yaml"
        p.write_text(yaml.safe_dump(r, sort_keys=False))
        return p

    def run(self, name: str, recipe: Path) -> Path:
        out = self.work / name
        if (out / "summary.json").is_file():
            return out  # finished in an earlier invocation
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an interrupted run starts over (its stream would differ otherwise)
        cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--ds_config", self.ds_config,
               "--recipe", str(recipe), "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        return out


def curve(out: Path) -> dict:
    """Held-out loss against training FLOPs and wall time (this run's clock) of one run."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    s = json.loads((out / "summary.json").read_text())
    fpt = s["flops"] / s["tokens"]
    vals = [m for m in lines if "val_loss" in m and "event" not in m]
    train = [m["loss"] for m in lines if "loss" in m]
    t0 = vals[0]["elapsed_s"]  # the first evaluation, before any step: the run's start
    return {"flops": [m["tokens"] * fpt for m in vals], "loss": [m["val_loss"] for m in vals],
            "wall": [m["elapsed_s"] - t0 for m in vals], "final_train_loss": train[-1],
            "total_flops": s["flops"], "final_val_loss": s["val_loss"], "params": s["params"]}


def crossing(xs: list[float], ys: list[float], target: float):
    """The first x where the piecewise-linear y(x) falls to `target` (None if it never does)."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0:
                return xs[0]
            x0, x1, y0 = xs[i - 1], xs[i], ys[i - 1]
            return x0 + (x1 - x0) * (y0 - target) / (y0 - y)
    return None


def at(xs: list[float], ys: list[float], x: float):
    """y(x) by linear interpolation; None outside the curve."""
    if x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1 = xs[i - 1], xs[i]
            return ys[i - 1] + (ys[i] - ys[i - 1]) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.0)
    return ys[-1]


def grow_small(cfg: dict, small_dir: Path, method: str, opts: dict, dest: Path, seed: int) -> dict:
    """The small model grown by `method` (in this process), saved as an HF dir; returns fit numbers.
    `opts` may name the method itself (`method: ligo`), so one method can run in several variants."""
    info_path = dest / "growth.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    import torch
    import transformers as tf

    from dsgrow.recipe import load_recipe
    from dsgrow.growth import get_method, grow
    from dsgrow.run.setup import prepare_data

    small = tf.AutoModelForCausalLM.from_pretrained(str(small_dir), local_files_only=True, dtype=torch.float32)
    target = {k: v for k, v in cfg["base"]["model"].items() if k in ("layers", "hidden", "heads", "kv_heads", "ffn")}
    opts = dict(opts)
    method = opts.pop("method", method)  # an entry may be a labelled variant: {method: ligo, ...}
    fit_steps = int(opts.pop("fit_steps", 0)) if get_method(method).fits else 0
    fit_batch = int(opts.pop("fit_batch", 16))
    data = None
    if fit_steps:
        recipe = load_recipe(str(small_dir.parent.parent / "small.yaml"))  # the small run's data settings
        data = prepare_data(recipe, 0).train  # the training split: the held-out one is never seen
        opts.setdefault("batch_size", fit_batch)
    t0 = time.perf_counter()
    model, info = grow(small, target, method=method, data=data, fit_steps=fit_steps, return_info=True, **opts)
    wall = time.perf_counter() - t0
    fit = info.get("fit") or {}
    res = {"method": method, "fit_steps": fit_steps, "fit_flops": fit.get("flops", 0.0),  # all the fit ran, the operator included
           "fit_flops_operator": fit.get("flops_operator", 0.0),
           "fit_tokens": fit.get("tokens", 0), "grow_wall_s": wall,
           "fit_loss_first": (fit.get("losses") or [None])[0], "fit_loss_last": (fit.get("losses") or [None])[-1]}
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest))
    info_path.write_text(json.dumps(res))
    return res


def split_entry(cfg: dict, label: str) -> tuple[dict, list, dict]:
    """A methods entry as (growth options, the grown runs' LRs, their extra `train:` fields)."""
    opts = dict(cfg["methods"][label] or {})
    lrs = opts.pop("lrs", cfg["lrs"])
    train = opts.pop("train", None) or {}
    if not isinstance(lrs, list) or not lrs or not all(isinstance(x, (int, float)) for x in lrs):
        raise SystemExit(f"growth_vs_scratch: methods.{label}.lrs: expected a list of numbers, got {lrs!r}")
    if not isinstance(train, dict) or "lr" in train or "tokens" in train or "seed" in train:
        raise SystemExit(f"growth_vs_scratch: methods.{label}.train: expected a mapping of train fields "
                         f"other than lr, tokens and seed (use lrs for the LR), got {train!r}")
    return opts, lrs, train


def validate(cfg: dict, methods: list[str], work: Path) -> None:
    """Every run's recipe and every growth request, checked before anything trains (SystemExit,
    one line)."""
    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe
    from dsgrow.growth import GrowthError, check_request, get_method

    runner = Runner(cfg, work, "", {})
    seed = cfg["seeds"][0]

    def load_checked(where: str, name: str, *args, **kwargs):
        """The dsgrow recipe a run would get, loaded and its file removed again."""
        try:
            return load_recipe(str(runner.recipe(name, *args, seed=seed, **kwargs)))
        except (ConfigError, ValueError) as e:
            raise SystemExit(f"growth_vs_scratch: {where}{e}") from None
        finally:
            (work / f"{name}.yaml").unlink(missing_ok=True)

    small = load_checked("", "check-small", cfg["small"]["model"], cfg["small"]["tokens"],
                         cfg["small"].get("lr", cfg["lrs"][0]))
    large = load_checked("", "check-large", {}, cfg["large_tokens"], cfg["lrs"][0])
    vocab = large.data.vocab_size
    s_spec, l_spec = small.model.with_vocab(vocab), large.model.with_vocab(vocab)
    for label in methods:
        opts, lrs, train = split_entry(cfg, label)
        if train:
            load_checked(f"methods.{label}.train: ", "check-large", {}, cfg["large_tokens"], lrs[0], train=train)
        method = opts.pop("method", label)
        try:
            fit_steps = int(opts.pop("fit_steps", 0)) if get_method(method).fits else 0
            opts.pop("fit_batch", None)
            check_request(s_spec, l_spec, method, fit_steps, **opts)
        except GrowthError as e:
            raise SystemExit(f"growth_vs_scratch: methods.{label}: {e}") from None


def pick(runs: dict) -> tuple[float, dict]:
    """(lr, curve) with the lowest final training loss."""
    lr = min(runs, key=lambda k: runs[k]["final_train_loss"])
    return lr, runs[lr]


def bench_seed(cfg: dict, runner: Runner, seed: int, methods: list[str]) -> dict:
    work = runner.work
    L = cfg["large_tokens"]
    sm = cfg["small"]
    small_recipe = runner.recipe("small", sm["model"], sm["tokens"], sm.get("lr", cfg["lrs"][0]), seed, export=True)
    small_out = runner.run("small", small_recipe)
    small_c = curve(small_out)
    small_wall = small_c["wall"][-1]
    scratch = {lr: curve(runner.run(f"scratch-lr{lr:g}", runner.recipe(f"scratch-lr{lr:g}", {}, L, lr, seed)))
               for lr in cfg["scratch_lrs"]}
    s_lr, s = pick(scratch)
    target, F, W = s["final_val_loss"], s["total_flops"], s["wall"][-1]
    rows = {"scratch": {"lr": s_lr, "flops_to_target": F, "wall_to_target_s": W, "final_val_loss": target,
                        "curve": s, "reached": True, "saving_given": 0.0, "saving_end_to_end": 0.0,
                        "sweep": {str(lr): {"final_train_loss": c["final_train_loss"], "final_val_loss": c["final_val_loss"]}
                                  for lr, c in scratch.items()}}}
    for m in methods:
        opts, lrs, train = split_entry(cfg, m)
        g = grow_small(cfg, small_out / "final_model", m, opts, work / f"grown-{m}", seed)
        runs = {lr: curve(runner.run(f"{m}-lr{lr:g}", runner.recipe(f"{m}-lr{lr:g}", {}, L, lr, seed,
                                                                      init_from=str(work / f"grown-{m}"),
                                                                      train=train)))
                for lr in lrs}
        lr, c = pick(runs)
        fit = g["fit_flops"]
        f_hit = crossing(c["flops"], c["loss"], target)
        w_hit = crossing(c["wall"], c["loss"], target)
        row = {"lr": lr, "fit_flops": fit, "fit_tokens": g["fit_tokens"], "grow_wall_s": g["grow_wall_s"],
               "fit_loss_first": g["fit_loss_first"], "fit_loss_last": g["fit_loss_last"],
               "loss_after_growth": c["loss"][0], "final_val_loss": c["final_val_loss"], "curve": c,
               "reached": f_hit is not None}
        if f_hit is not None:
            row["flops_to_target"] = fit + f_hit
            row["wall_to_target_s"] = g["grow_wall_s"] + w_hit
            row["saving_given"] = 1 - row["flops_to_target"] / F
            row["saving_end_to_end"] = 1 - (small_c["total_flops"] + row["flops_to_target"]) / F
            row["wall_saving_given"] = 1 - row["wall_to_target_s"] / W
            row["wall_saving_end_to_end"] = 1 - (small_wall + row["wall_to_target_s"]) / W
        row["loss_at_equal_flops_given"] = at(c["flops"], c["loss"], F - fit)
        row["loss_at_equal_flops_end_to_end"] = at(c["flops"], c["loss"], F - fit - small_c["total_flops"])
        rows[m] = row
    return {"seed": seed, "target": target, "scratch_flops": F, "scratch_wall_s": W, "small": small_c, "rows": rows}


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def table(res: dict) -> str:
    seeds = res["seeds"]
    methods = list(seeds[0]["rows"])
    targets = ", ".join(format(s["target"], ".4f") for s in seeds)
    seed_list = ", ".join(str(s["seed"]) for s in seeds)
    small = seeds[0]["small"]
    sweep = seeds[0]["rows"]["scratch"].get("sweep", {})
    picked = ", ".join(format(s["rows"]["scratch"]["lr"], "g") for s in seeds)
    lines = [f"Target: scratch final held-out loss {targets} (seed(s) {seed_list}); scratch LR {picked}, picked "
             f"by final train loss of {', '.join(sweep) or picked}; small model: "
             f"{small['total_flops']:.3e} FLOPs, final held-out loss {small['final_val_loss']:.4f}.", "",
             "| method | reached | FLOPs to target | saving, small given | saving, end to end | wall to target s "
             "| wall saving, given | loss at equal FLOPs (given) | final loss | loss right after growth |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [s["rows"][m] for s in seeds]

        def col(key, spec, pct=False):
            vals = [r.get(key) for r in rs]
            if any(v is None for v in vals):
                return "-" if all(v is None for v in vals) else " / ".join(fmt(v, spec) for v in vals)
            vals = [100 * v if pct else v for v in vals]
            if len(vals) == 1:
                return format(vals[0], spec) + ("%" if pct else "")
            mean = sum(vals) / len(vals)
            spread = (max(vals) - min(vals)) / 2
            return f"{mean:{spec}} ± {spread:{spec}}" + ("%" if pct else "")

        reached = "/".join("yes" if r["reached"] else "no" for r in rs)
        after = "-" if m == "scratch" else col("loss_after_growth", ".4f")
        eq = "-" if m == "scratch" else col("loss_at_equal_flops_given", ".4f")
        lines.append(f"| {m} | {reached} | {col('flops_to_target', '.3e')} | {col('saving_given', '.1f', True)} "
                     f"| {col('saving_end_to_end', '.1f', True)} | {col('wall_to_target_s', '.0f')} "
                     f"| {col('wall_saving_given', '.1f', True)} | {eq} | {col('final_val_loss', '.4f')} | {after} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["seeds"][0]
    fig, ax = plt.subplots(figsize=(8, 5))
    for m, row in s["rows"].items():
        c = row["curve"]
        off = row.get("fit_flops", 0.0)  # grown curves start after their fit: small model given
        ax.plot([f + off for f in c["flops"]], c["loss"], marker=".", label=m, lw=2.5 if m in ("scratch", "ligo") else 1.2)
    ax.axhline(s["target"], color="grey", ls="--", lw=0.8, label="scratch final loss")
    ax.set_xlabel("training FLOPs of the large model (+ operator fit)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{res['name']}: growth vs scratch (seed {s['seed']}, small model given)")
    lo = min(min(r["curve"]["loss"]) for r in s["rows"].values())
    ax.set_ylim(lo - 0.1, min(max(r["curve"]["loss"][0] for r in s["rows"].values()), lo + 2.5))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--recipe", default=str(REPO / "benchmarks" / "recipes" / "tiny-gpt2.yaml"))
    p.add_argument("--quick", action="store_true", help="the recipe's quick: section (a smoke test)")
    p.add_argument("--methods", default=None, help="comma list (default: the recipe's methods)")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--work", default=None, help="run folder (default runs/growth_vs_scratch/NAME[-quick])")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the JSON/MD/PNG go")
    p.add_argument("--seeds", default=None,
                   help="comma list of the recipe's seeds to run (results named NAME-seedS...); two "
                        "processes can run two seeds side by side, a later full run reuses their runs")
    a = p.parse_args()
    cfg = load_bench(a.recipe, a.quick)
    suffix = ""
    if a.seeds:
        seeds = [int(x) for x in a.seeds.split(",")]
        if not set(seeds) <= set(cfg["seeds"]):
            raise SystemExit(f"--seeds: {a.seeds} is not a subset of the recipe's seeds {cfg['seeds']}")
        cfg["seeds"], suffix = seeds, "-seed" + "-".join(map(str, seeds))
    methods = a.methods.split(",") if a.methods else list(cfg["methods"])
    from dsgrow.growth import ALL_METHODS

    bad = [m for m in methods if m not in cfg["methods"]
           or (cfg["methods"][m] or {}).get("method", m) not in ALL_METHODS]
    if bad:
        raise SystemExit(f"--methods: {bad[0]} is not one of the recipe's methods ({', '.join(cfg['methods'])})")
    name = cfg["name"] + ("-quick" if a.quick else "")
    work_root = Path(a.work or REPO / "runs" / "growth_vs_scratch" / name)
    name += suffix
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    work_root.mkdir(parents=True, exist_ok=True)
    validate(cfg, methods, work_root)
    t0 = time.perf_counter()
    seeds = []
    for seed in cfg["seeds"]:
        work = work_root / f"seed{seed}"
        work.mkdir(parents=True, exist_ok=True)
        print(f"seed {seed}: runs in {work}", flush=True)
        seeds.append(bench_seed(cfg, Runner(cfg, work, a.ds_config, env), seed, methods))
    res = {"name": name, "date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "cpus": os.cpu_count(), "recipe": cfg, "quick": a.quick, "seeds": seeds,
           "wall_s": time.perf_counter() - t0}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"growth_vs_scratch-{name}.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / f"growth_vs_scratch-{name}.md").write_text(
        f"# Growth vs scratch: {name} ({res['date']}, {res['machine']}, {res['cpus']} CPUs)\n\n{md}\n")
    plot(res, out / f"growth_vs_scratch-{name}.png")
    print("\n" + md)
    print(f"\nwrote {out}/growth_vs_scratch-{name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
