#!/usr/bin/env python
"""A scoring cascade with the small model first: agreement with the large model alone vs compute.

    python benchmarks/cascade.py [--work runs/draft] [--out benchmarks/results]

Uses the models benchmarks/draft_acceptance.py trained (run it first): for each pair and seed, the
grown model, its ancestor (the small model as it was grown) and an independent small model of the
same size. On the run's held-out split (documents neither model trained on) it scores every
block's next-token loss with each model once, then, for each route share and rule, builds the
cascade's scores exactly as `dsgrow score --cascade` does (dsgrow/infer/cascade.py: route, a
least-squares line onto the large model's scale, the large model's own scores on the routed
blocks) and compares them with the large model alone: Spearman's rank correlation and the share of
blocks given the same keep / drop decision (keep the hardest `fraction`). Rules: margin (nearest
the keep cut in the small model's ranking), entropy (most uncertain), and random (the control).
Compute saved: 1 - (small forward on every block + large forward on the routed ones) / (large
forward on every block). Writes cascade.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from draft_acceptance import held_out_blocks  # noqa: E402  (the models and split are that benchmark's)

SHARES = (0.1, 0.2, 0.3, 0.5)
RULES = ("margin", "entropy", "random")


def cascade_scores(s_loss, s_ent, l_loss, share: float, rule: str, fraction: float, seed: int):
    """The cascade's scores from per-block losses computed once (the routed blocks take the large
    model's; the rest the small model's on the large one's scale), as dsgrow.infer.cascade does."""
    import torch

    from dsgrow.infer.cascade import calibrate, route

    if rule == "random":
        g = torch.Generator().manual_seed(seed)
        routed = torch.sort(torch.randperm(len(s_loss), generator=g)[:max(1, round(share * len(s_loss)))]).values
    else:
        routed = route(s_loss, s_ent, share, rule, fraction, "hard")
    a, b = calibrate(s_loss[routed], l_loss[routed])
    scores = a * s_loss.double() + b
    scores[routed] = l_loss[routed].double()
    return scores.float(), len(routed)


def main() -> int:
    import torch

    from dsgrow.data.prune_cli import load_causal_lm
    from dsgrow.families.spec import ModelSpec
    from dsgrow.growth.cli import src_tokenizer
    from dsgrow.infer.cascade import agreement, loss_and_entropy
    from dsgrow.schedules.flops import flops_per_token

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "draft"), help="draft_acceptance.py's run folder")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--fraction", type=float, default=0.7, help="the keep decision: share kept (hardest)")
    p.add_argument("--name", default="cascade")
    a = p.parse_args()
    work = Path(a.work)
    runs = sorted(d for d in work.glob("*/seed*") if (d / "growth" / "final_model").is_dir()
                  and (d / "independent" / "final_model").is_dir())
    if not runs:
        raise SystemExit(f"{work}: no finished draft_acceptance.py runs (run benchmarks/draft_acceptance.py first)")
    res = {}
    for d in runs:
        recipe = yaml.safe_load((d / "growth.yaml").read_text())
        large, _ = load_causal_lm(str(d / "growth" / "final_model"))
        tok = src_tokenizer(str(d / "growth" / "final_model"))
        blocks = held_out_blocks(recipe, tok)
        seq = blocks.shape[1]
        fwd = {}
        with torch.no_grad():
            l_loss, _ = loss_and_entropy(lambda ids: large(input_ids=ids).logits, blocks)
            for small_name, path in (("ancestor", d / "growth" / "stages" / "stage0-final"),
                                     ("independent", d / "independent" / "final_model")):
                small, _ = load_causal_lm(str(path))
                fwd[small_name] = (loss_and_entropy(lambda ids: small(input_ids=ids).logits, blocks),
                                   ModelSpec.from_hf_config(small.config))
        spec_l = ModelSpec.from_hf_config(large.config)
        f_l = flops_per_token(spec_l, seq)
        entry = {"blocks": len(blocks), "rows": []}
        for small_name, ((s_loss, s_ent), spec_s) in fwd.items():
            f_s = flops_per_token(spec_s, seq)
            base = agreement(s_loss, l_loss, a.fraction, "hard")  # the small model alone, no large model
            entry["rows"].append({"small": small_name, "rule": "small alone", "share": 0.0,
                                  "compute_saved": 1 - f_s / f_l, **base})
            for rule in RULES:
                for share in SHARES:
                    scores, k = cascade_scores(s_loss, s_ent, l_loss, share, rule, a.fraction, seed=len(res))
                    g = agreement(scores, l_loss, a.fraction, "hard")
                    saved = 1 - (len(blocks) * f_s + k * f_l) / (len(blocks) * f_l)
                    entry["rows"].append({"small": small_name, "rule": rule, "share": share, "compute_saved": saved,
                                          **g})
        res[f"{d.parent.name}/{d.name}"] = entry
        print(f"{d.parent.name}/{d.name}: {len(blocks)} held-out blocks", flush=True)
    doc = {"date": datetime.date.today().isoformat(), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "fraction": a.fraction, "results": res}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(doc, indent=1))
    md = table(doc)
    (out / f"{a.name}.md").write_text(md)
    print(md)
    return 0


def table(doc: dict) -> str:
    by: dict = {}
    for key, e in doc["results"].items():
        pair = key.split("/")[0]
        for r in e["rows"]:
            by.setdefault((pair, r["small"], r["rule"], r["share"]), []).append(r)
    lines = [f"# Scoring cascade vs the large model alone ({doc['date']}, {doc['machine']})", "",
             f"Held-out blocks of each run; keep decision: the hardest {100 * doc['fraction']:.0f}% by next-token loss. "
             "Mean [min, max] over seeds.", "",
             "| pair | first stage | rule | routed share | compute saved | Spearman | same keep/drop decision |",
             "|---|---|---|---|---|---|---|"]

    def rng(xs, pct=False):
        m, lo, hi = statistics.fmean(xs), min(xs), max(xs)
        return f"{100 * m:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" if pct else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    for (pair, small, rule, share), rs in by.items():
        lines.append(f"| {pair} | {small} | {rule} | {share:g} | {100 * statistics.fmean(r['compute_saved'] for r in rs):.1f}% "
                     f"| {rng([r['spearman'] for r in rs])} | {rng([r['decision_agreement'] for r in rs], True)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
