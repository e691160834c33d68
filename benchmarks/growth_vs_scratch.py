#!/usr/bin/env python
"""Growth vs scratch: FLOPs and wall time to the scratch run's held-out loss, per growth method.

    python benchmarks/growth_vs_scratch.py --recipe benchmarks/recipes/tiny-gpt2.yaml [--quick]
        [--work DIR] [--methods ligo,stack] [--out benchmarks/results] [--seeds 11] [--horizons 1,3]
        [--jobs 2]

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
Writes growth_vs_scratch-NAME.json, .md (table) and .png (loss vs FLOPs) under --out.

`horizons: [1, 3, 9]` repeats the large runs (scratch and grown, each with its LR sweep) at those
multiples of `large_tokens`, each horizon against its own scratch target, and adds a plot of the
saving against the large model's tokens per parameter (NAME-horizons.png); with
`small_scales_with_horizon: true` (or --small_scales_with_horizon) the small model is trained h
times as long at horizon h too (growth timing scaled with the budget; end to end pays for it).
Each grown row also gives its head start: scratch's FLOPs to the loss the grown model starts at (a
fixed small model's head start is fixed FLOPs, so the saving it alone explains falls as
1/horizon).

A finished run in --work is reused only when its key matches: the full dsgrow recipe it ran, the
key of what it started from (a grown run: the growth's options, the small run's key), the code
(dsgrow's sources and the launcher) and the DeepSpeed config; never by its label alone. So an
interrupted benchmark continues where it stopped, and a changed option or code reruns what it
touches.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.config import parse_count  # noqa: E402
from runcache import KeyedRuns, key_of  # noqa: E402  (this folder is on sys.path: a script, or the tests)

KNOWN = {"name", "base", "small", "large_tokens", "evals", "lrs", "scratch_lrs", "seeds", "methods", "quick",
         "horizons", "small_scales_with_horizon"}


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
    cfg["horizons"] = check_horizons(cfg.get("horizons", [1]), f"{path}: horizons")
    cfg.setdefault("small_scales_with_horizon", False)
    if not isinstance(cfg["small_scales_with_horizon"], bool):
        raise SystemExit(f"{path}: small_scales_with_horizon: expected true or false, "
                         f"got {cfg['small_scales_with_horizon']!r}")
    return cfg


def check_horizons(h, where: str) -> list:
    # any ascending horizons: a study of one long horizon (--horizons 3) need not pay for 1x again;
    # the first one listed is the result's top level
    ok = isinstance(h, list) and h and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                           for x in h)
    if not ok or any(b <= a for a, b in zip(h, h[1:])):
        raise SystemExit(f"{where}: expected an ascending list of positive multiples of large_tokens, got {h!r}")
    return h


class Runner(KeyedRuns):
    def __init__(self, cfg: dict, work: Path, ds_config: str, env: dict, code: str | None = None, jobs: int = 1):
        super().__init__(work, ds_config, env, code)
        self.cfg, self.jobs = cfg, jobs

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

    def run(self, name: str, recipe: Path, start: str = "") -> Path:
        """Run `recipe` (or reuse the run of an earlier invocation when its key matches); `start` is
        the key of the weights it starts from (a grown model's growth key)."""
        out, secs = self.launch(name, recipe, start)
        if secs is not None:
            print(f"  {name}: {secs:.0f} s", flush=True)
        return out

    def run_all(self, jobs: dict) -> dict:
        """{name: (recipe, start)} -> {name: run folder}, up to self.jobs training processes at once
        (each run is its own process, so they contend for cores alike: read FLOPs, not wall time)."""
        if self.jobs <= 1:
            return {name: self.run(name, r, start) for name, (r, start) in jobs.items()}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futs = {name: pool.submit(self.run, name, r, start) for name, (r, start) in jobs.items()}
            return {name: f.result() for name, f in futs.items()}


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


def grow_small(cfg: dict, small_dir: Path, small_recipe: Path, method: str, opts: dict, dest: Path, seed: int,
               key: str = "") -> dict:
    """The small model grown by `method` (in this process), saved as an HF dir; returns fit numbers
    and `key`, which names everything the growth depends on (the caller's: the options, the small
    run's key, the code). A saved growth is reused only under the same key.
    `opts` may name the method itself (`method: ligo`), so one method can run in several variants."""
    info_path = dest / "growth.json"
    if info_path.is_file():
        res = json.loads(info_path.read_text())
        if res.get("key") == key:
            return res
        shutil.rmtree(dest)
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
        recipe = load_recipe(str(small_recipe))  # the small run's data settings
        data = prepare_data(recipe, 0).train  # the training split: the held-out one is never seen
        opts.setdefault("batch_size", fit_batch)
    t0 = time.perf_counter()
    model, info = grow(small, target, method=method, data=data, fit_steps=fit_steps, return_info=True, **opts)
    wall = time.perf_counter() - t0
    fit = info.get("fit") or {}
    res = {"method": method, "fit_steps": fit_steps, "fit_flops": fit.get("flops", 0.0),  # all the fit ran, the operator included
           "fit_flops_operator": fit.get("flops_operator", 0.0),
           "fit_tokens": fit.get("tokens", 0), "grow_wall_s": wall,
           "fit_loss_first": (fit.get("losses") or [None])[0], "fit_loss_last": (fit.get("losses") or [None])[-1],
           "key": key}
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

    runner = Runner(cfg, work, "", {}, code="")
    seed = cfg["seeds"][0]

    def load_checked(where: str, name: str, *args, **kwargs):
        """The dsgrow recipe a run would get, loaded and its file removed again."""
        try:
            return load_recipe(str(runner.recipe(name, *args, seed=seed, **kwargs)))
        except (ConfigError, ValueError) as e:
            raise SystemExit(f"growth_vs_scratch: {where}{e}") from None
        finally:
            (work / f"{name}.yaml").unlink(missing_ok=True)

    small = load_checked("", f"check-small-{os.getpid()}", cfg["small"]["model"], cfg["small"]["tokens"],
                         cfg["small"].get("lr", cfg["lrs"][0]))  # pid: two --seeds processes may share a folder
    large = load_checked("", f"check-large-{os.getpid()}", {}, cfg["large_tokens"], cfg["lrs"][0])
    vocab = large.data.vocab_size
    s_spec, l_spec = small.model.with_vocab(vocab), large.model.with_vocab(vocab)
    for label in methods:
        opts, lrs, train = split_entry(cfg, label)
        if train:
            load_checked(f"methods.{label}.train: ", f"check-large-{os.getpid()}", {}, cfg["large_tokens"], lrs[0],
                         train=train)
        method = opts.pop("method", label)
        try:
            fit_steps = int(opts.pop("fit_steps", 0)) if get_method(method).fits else 0
            opts.pop("fit_batch", None)
            check_request(s_spec, l_spec, method, fit_steps, **opts)
        except GrowthError as e:
            raise SystemExit(f"growth_vs_scratch: methods.{label}: {e}") from None


def sweep_summary(runs: dict) -> dict:
    """Each LR's final training and held-out loss (what the pick saw, and what it did not use)."""
    return {str(lr): {"final_train_loss": c["final_train_loss"], "final_val_loss": c["final_val_loss"]}
            for lr, c in runs.items()}


def pick(runs: dict) -> tuple[float, dict]:
    """(lr, curve) with the lowest final training loss."""
    lr = min(runs, key=lambda k: runs[k]["final_train_loss"])
    return lr, runs[lr]


def score_row(c: dict, fit_flops: float, grow_wall_s: float, small: dict, scratch: dict) -> dict:
    """A grown run's row against scratch: FLOPs and wall time to scratch's final held-out loss,
    counting the operator fit (small model given) and the small model's training too (end to end);
    the loss at scratch's FLOPs. `c` is the grown run's curve (curve()), its FLOPs from the first
    step after growth; `small`, `scratch` are curves."""
    target, F, W = scratch["final_val_loss"], scratch["total_flops"], scratch["wall"][-1]
    f_hit = crossing(c["flops"], c["loss"], target)
    w_hit = crossing(c["wall"], c["loss"], target)
    row = {"fit_flops": fit_flops, "grow_wall_s": grow_wall_s, "loss_after_growth": c["loss"][0],
           "final_val_loss": c["final_val_loss"], "curve": c, "reached": f_hit is not None,
           # the head start: scratch's FLOPs to the loss the grown model starts at. If growth only
           # skipped that stretch, its saving would be this over scratch's budget, and would fall as
           # 1/horizon with a fixed small model; saving / head start above 1 is what training after
           # growth adds.
           "head_start_flops": crossing(scratch["flops"], scratch["loss"], c["loss"][0])}
    if row["head_start_flops"] is not None:
        row["head_start"] = row["head_start_flops"] / F
    if f_hit is not None:
        row["flops_to_target"] = fit_flops + f_hit
        row["wall_to_target_s"] = grow_wall_s + w_hit
        row["saving_given"] = 1 - row["flops_to_target"] / F
        row["saving_end_to_end"] = 1 - (small["total_flops"] + row["flops_to_target"]) / F
        row["wall_saving_given"] = 1 - row["wall_to_target_s"] / W
        row["wall_saving_end_to_end"] = 1 - (small["wall"][-1] + row["wall_to_target_s"]) / W
    row["loss_at_equal_flops_given"] = at(c["flops"], c["loss"], F - fit_flops)
    row["loss_at_equal_flops_end_to_end"] = at(c["flops"], c["loss"], F - fit_flops - small["total_flops"])
    return row


def horizon_tag(h: float) -> str:
    """Run-name prefix of a horizon (none at 1x, so the first horizon's runs keep their names)."""
    return "" if h == 1 else f"h{h:g}x-"


def bench_seed(cfg: dict, runner: Runner, seed: int, methods: list[str]) -> dict:
    work = runner.work
    sm = cfg["small"]

    made = {}  # tag -> what growths_for returned: horizons sharing a small model look it up once

    def growths_for(h: float) -> tuple[dict, dict, str]:
        """The small run and its growths a horizon starts from: (small curve, growths by method,
        the grown folders' prefix). One small model for every horizon, unless
        `small_scales_with_horizon` (growth timing: the small model trained h times as long)."""
        tag = horizon_tag(h) if cfg["small_scales_with_horizon"] else ""
        if tag not in made:
            made[tag] = small_and_growths(tag, h)
        return made[tag]

    def small_and_growths(tag: str, h: float) -> tuple[dict, dict, str]:
        name = f"{tag}small"
        small_out = runner.run(name, runner.recipe(name, sm["model"], int(round(sm["tokens"] * (h if tag else 1))),
                                                   sm.get("lr", cfg["lrs"][0]), seed, export=True))
        small_key = (small_out / "bench_key").read_text()
        grown = {}
        for m in methods:
            opts, _, _ = split_entry(cfg, m)
            gkey = key_of(json.dumps(opts, sort_keys=True), m, small_key, runner.code)
            grown[m] = grow_small(cfg, small_out / "final_model", work / f"{name}.yaml", m, opts,
                                  work / f"{tag}grown-{m}", seed, gkey)
        return curve(small_out), grown, tag

    horizons = {}
    for h in cfg["horizons"]:
        L, tag = int(round(cfg["large_tokens"] * h)), horizon_tag(h)
        small_c, grown, gtag = growths_for(h)
        # every run of the horizon is independent once the growths exist: name them all, then run
        # them (up to runner.jobs at once)
        jobs = {}

        def plan(label: str, lrs: list, init_from: str | None = None, train: dict | None = None,
                 start: str = "") -> list[str]:
            names = [f"{tag}{label}-lr{lr:g}" for lr in lrs]
            for name, lr in zip(names, lrs):
                jobs[name] = (runner.recipe(name, {}, L, lr, seed, init_from=init_from, train=train), start)
            return names

        planned = {"scratch": dict(zip(cfg["scratch_lrs"], plan("scratch", cfg["scratch_lrs"])))}
        for m in methods:
            _, lrs, train = split_entry(cfg, m)
            # grown from a horizon's own small model: its own run names, so the runs grown from the
            # shared small model stay
            label = f"smallxh-{m}" if gtag else m
            planned[m] = dict(zip(lrs, plan(label, lrs, str(work / f"{gtag}grown-{m}"), train, grown[m]["key"])))
        done = runner.run_all(jobs)

        def sweep(label: str) -> dict:
            return {lr: curve(done[name]) for lr, name in planned[label].items()}

        scratch = sweep("scratch")
        s_lr, s = pick(scratch)
        rows = {"scratch": {"lr": s_lr, "flops_to_target": s["total_flops"], "wall_to_target_s": s["wall"][-1],
                            "final_val_loss": s["final_val_loss"], "curve": s, "reached": True,
                            "saving_given": 0.0, "saving_end_to_end": 0.0, "sweep": sweep_summary(scratch)}}
        for m in methods:
            g = grown[m]
            runs = sweep(m)
            lr, c = pick(runs)
            row = score_row(c, g["fit_flops"], g["grow_wall_s"], small_c, s)
            row.update(lr=lr, fit_tokens=g["fit_tokens"], fit_loss_first=g["fit_loss_first"],
                       fit_loss_last=g["fit_loss_last"], sweep=sweep_summary(runs))
            rows[m] = row
        horizons[f"{h:g}"] = {"large_tokens": L, "target": s["final_val_loss"], "scratch_flops": s["total_flops"],
                              "scratch_wall_s": s["wall"][-1], "small": small_c, "rows": rows}
    first = horizons[f"{cfg['horizons'][0]:g}"]
    # the first horizon's numbers stay at the top level, as results made before horizons existed
    return {"seed": seed, "target": first["target"], "scratch_flops": first["scratch_flops"],
            "scratch_wall_s": first["scratch_wall_s"], "small": first["small"], "rows": first["rows"],
            "horizons": horizons}


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def at_horizon(res: dict, h: str) -> list[dict]:
    """The per-seed results of horizon `h` ("1", "3", ...) in the top-level shape (rows, target)."""
    out = []
    for s in res["seeds"]:
        hz = s.get("horizons", {}).get(h) or {"rows": s["rows"], "target": s["target"]}
        out.append({**s, **hz})
    return out


def table(res: dict, h: str = "1") -> str:
    seeds = at_horizon(res, h)
    peak = res.get("peak_tflops")
    methods = list(seeds[0]["rows"])
    targets = ", ".join(format(s["target"], ".4f") for s in seeds)
    seed_list = ", ".join(str(s["seed"]) for s in seeds)
    small = seeds[0]["small"]
    sweep = seeds[0]["rows"]["scratch"].get("sweep", {})
    picked = ", ".join(format(s["rows"]["scratch"]["lr"], "g") for s in seeds)
    tokens = seeds[0].get("large_tokens", res["recipe"]["large_tokens"])
    tpp = tokens / seeds[0]["rows"]["scratch"]["curve"]["params"]
    lines = [f"Horizon {h}x: {tokens:,} tokens for the large model ({tpp:.2f} tokens per parameter).", "",
             f"Target: scratch final held-out loss {targets} (seed(s) {seed_list}); scratch LR {picked}, picked "
             f"by final train loss of {', '.join(sweep) or picked}; small model: "
             f"{small['total_flops']:.3e} FLOPs, final held-out loss {small['final_val_loss']:.4f}.", "",
             "| method | reached | LR picked | FLOPs to target | saving, small given | saving, end to end | wall to target s "
             "| wall saving, given | loss at equal FLOPs (given) | final loss | loss right after growth "
             "| head start (scratch's FLOPs to that loss) |" + (" MFU |" if peak else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
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
        mfu_col = ""
        if peak:  # the large run's training FLOPs over its clock (evaluations included) / the peak
            mfu = [r["curve"]["total_flops"] / max(r["curve"]["wall"][-1], 1e-9) / (peak * 1e12) for r in rs]
            mfu_col = f" {100 * sum(mfu) / len(mfu):.1f}% |"
        after = "-" if m == "scratch" else col("loss_after_growth", ".4f")
        eq = "-" if m == "scratch" else col("loss_at_equal_flops_given", ".4f")
        lrs = "/".join(format(r["lr"], "g") for r in rs)
        lines.append(f"| {m} | {reached} | {lrs} | {col('flops_to_target', '.3e')} | {col('saving_given', '.1f', True)} "
                     f"| {col('saving_end_to_end', '.1f', True)} | {col('wall_to_target_s', '.0f')} "
                     f"| {col('wall_saving_given', '.1f', True)} | {eq} | {col('final_val_loss', '.4f')} | {after} "
                     f"| {'-' if m == 'scratch' else col('head_start', '.1f', True)} |{mfu_col}")
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


def plot_horizons(res: dict, path: Path) -> None:
    """Saving (small model given) against the large model's tokens per parameter, per method: the
    mean over seeds where every seed reached the target; an open marker at 0 where one did not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = list(res["seeds"][0].get("horizons", {"1": None}))
    params = res["seeds"][0]["rows"]["scratch"]["curve"]["params"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in [m for m in res["seeds"][0]["rows"] if m != "scratch"]:
        xs, ys, miss = [], [], []
        for h in hs:
            seeds = at_horizon(res, h)
            x = seeds[0].get("large_tokens", res["recipe"]["large_tokens"]) / params
            vals = [s["rows"][m].get("saving_given") for s in seeds]
            if any(v is None for v in vals):
                miss.append(x)
            else:
                xs.append(x)
                ys.append(100 * sum(vals) / len(vals))
        line, = ax.plot(xs, ys, marker="o", label=m)
        if miss:
            ax.plot(miss, [0.0] * len(miss), ls="none", marker="o", mfc="none", color=line.get_color())
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("large model's training tokens per parameter")
    ax.set_ylabel("FLOPs saved to scratch's loss, small model given (%)")
    ax.set_title(f"{res['name']}: saving vs horizon (mean of {len(res['seeds'])} seed(s); open: not reached)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(res: dict, out: Path) -> str:
    """NAME.json, NAME.md (a table per horizon), NAME.png (seed 1's curves) and, with more than one
    horizon, NAME-horizons.png; returns the markdown."""
    name = res["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"growth_vs_scratch-{name}.json").write_text(json.dumps(res, indent=1))
    hs = list(res["seeds"][0].get("horizons", {"1": None}))
    md = "\n\n".join(table(res, h) for h in hs)
    (out / f"growth_vs_scratch-{name}.md").write_text(
        f"# Growth vs scratch: {name} ({res['date']}, {res['machine']}, {res['cpus']} CPUs)\n\n{md}\n")
    plot(res, out / f"growth_vs_scratch-{name}.png")
    if len(hs) > 1:
        plot_horizons(res, out / f"growth_vs_scratch-{name}-horizons.png")
    return md


def combine(paths: list[str], name: str) -> dict:
    """One result from per-seed results of the same recipe (runs made side by side with --seeds)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    recipes = {json.dumps({k: v for k, v in r["recipe"].items() if k != "seeds"}, sort_keys=True) for r in parts}
    if len(recipes) != 1:
        raise SystemExit("--combine: the results come from different recipes")
    seeds = sorted((s for r in parts for s in r["seeds"]), key=lambda s: s["seed"])
    recipe = dict(parts[0]["recipe"], seeds=[s["seed"] for s in seeds])
    return {**parts[0], "name": name, "recipe": recipe, "seeds": seeds, "wall_s": sum(r["wall_s"] for r in parts),
            "combined_from": [Path(p).name for p in paths]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--recipe", default=str(REPO / "benchmarks" / "recipes" / "tiny-gpt2.yaml"))
    p.add_argument("--quick", action="store_true", help="the recipe's quick: section (a smoke test)")
    p.add_argument("--methods", default=None, help="comma list (default: the recipe's methods)")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--work", default=None, help="run folder (default runs/growth_vs_scratch/NAME[-quick])")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where the JSON/MD/PNG go")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak dense TFLOP/s in the run's precision: adds an MFU column")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="write one result (the recipe's name) from per-seed result JSONs; runs nothing")
    p.add_argument("--seeds", default=None,
                   help="comma list of the recipe's seeds to run (results named NAME-seedS...); two "
                        "processes can run two seeds side by side, a later full run reuses their runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at once within a horizon (each its own process: give each a core, "
                        "e.g. OMP_NUM_THREADS=1 --jobs 2 on two cores)")
    p.add_argument("--horizons", default=None,
                   help="ascending comma list of multiples of large_tokens (3 alone: one long horizon) instead "
                        "of the recipe's horizons (results named NAME[-seedS]-hH1-H2...)")
    p.add_argument("--small_scales_with_horizon", action="store_true",
                   help="train the small model h times as long at horizon h (results named ...-smallxh)")
    a = p.parse_args()
    if a.jobs < 1:
        raise SystemExit(f"--jobs: expected a positive number of runs at once, got {a.jobs}")
    cfg = load_bench(a.recipe, a.quick)
    if a.combine:
        res = combine(a.combine, cfg["name"] + ("-quick" if a.quick else ""))
        print(write_results(res, Path(a.out)))
        return 0
    suffix = ""
    if a.seeds:
        seeds = [int(x) for x in a.seeds.split(",")]
        if not set(seeds) <= set(cfg["seeds"]):
            raise SystemExit(f"--seeds: {a.seeds} is not a subset of the recipe's seeds {cfg['seeds']}")
        cfg["seeds"], suffix = seeds, "-seed" + "-".join(map(str, seeds))
    if a.horizons:
        try:
            hs = [float(x) for x in a.horizons.split(",")]
        except ValueError:
            raise SystemExit(f"--horizons: expected a comma list of numbers, got {a.horizons!r}") from None
        cfg["horizons"] = check_horizons([int(x) if x.is_integer() else x for x in hs], "--horizons")
        suffix += "-h" + "-".join(f"{x:g}" for x in hs)
    if a.small_scales_with_horizon and not cfg["small_scales_with_horizon"]:
        cfg["small_scales_with_horizon"] = True
        suffix += "-smallxh"
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
        seeds.append(bench_seed(cfg, Runner(cfg, work, a.ds_config, env, jobs=a.jobs), seed, methods))
    res = {"name": name, "date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "cpus": os.cpu_count(), "recipe": cfg, "quick": a.quick, "seeds": seeds, "peak_tflops": a.peak_tflops,
           "wall_s": time.perf_counter() - t0}
    out = Path(a.out)
    md = write_results(res, out)
    print("\n" + md)
    print(f"\nwrote {out}/growth_vs_scratch-{name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
