#!/usr/bin/env python
"""Tokens/s of an EST step against a full step: does the FLOPs saving turn into speed?

    python benchmarks/est_throughput.py [--family gpt2|llama|both] [--layers 8 --hidden 256]
        [--steps 20] [--out benchmarks/results]

For each phase of dsgrow's default EST schedule (half the blocks, heads and neurons; every block,
half the heads and neurons; the full model) the same model trains `--steps` optimizer steps (AdamW,
forward + backward + step, fp32, one process) with a fresh subnetwork every step, after two
warm-up steps; the phases are interleaved round by round so that a load change on this shared
machine hits all of them alike. Reported per phase: tokens/s (median over rounds), its ratio to
the full model's, and the FLOPs the meter counts (its ratio is what the speed-up would be if time
followed FLOPs). Writes est-throughput.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.families.hf_io import build_hf_model  # noqa: E402
from dsgrow.families.spec import ModelSpec  # noqa: E402
from dsgrow.subnet import Subnetwork, est_config  # noqa: E402

PHASES = {"phase 1 (layers, heads, ffn 0.5)": 0.1, "phase 2 (heads, ffn 0.5)": 0.3, "full model": 0.9}


def measure(spec: ModelSpec, seq: int, batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = build_hf_model(spec, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    est = Subnetwork(model, est_config({}), seed=0, spec=spec)
    x = torch.randint(0, spec.vocab_size, (batch, seq))
    step = 0

    def run(frac: float, n: int) -> float:
        nonlocal step
        t0 = time.perf_counter()
        for _ in range(n):
            with est.active(step, frac):
                model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        return n * batch * seq / (time.perf_counter() - t0)

    for frac in PHASES.values():
        run(frac, 2)  # warm-up: allocator, first-call overheads
    per = {name: [] for name in PHASES}
    for _ in range(rounds):
        for name, frac in PHASES.items():
            per[name].append(run(frac, max(steps // rounds, 1)))
    full_tps = statistics.median(per["full model"])
    full_fpt = est.flops_per_token(PHASES["full model"], seq)
    out = {}
    for name, frac in PHASES.items():
        tps = statistics.median(per[name])
        fpt = est.flops_per_token(frac, seq)
        out[name] = {"tokens_per_s": tps, "speed_ratio": tps / full_tps, "flops_per_token": fpt,
                     "flops_ratio": fpt / full_fpt, "rounds": per[name]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="both", choices=["gpt2", "llama", "both"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args()
    fams = ["gpt2", "llama"] if a.family == "both" else [a.family]
    res = {"date": datetime.date.today().isoformat(), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "torch_threads": torch.get_num_threads(), "args": vars(a), "families": {}}
    lines = [f"# EST throughput ({res['date']}, {res['machine']}, {res['torch_threads']} torch threads, fp32)", ""]
    for fam in fams:
        spec = ModelSpec(family=fam, layers=a.layers, hidden=a.hidden, heads=a.hidden // 32,
                         kv_heads=(a.hidden // 64 if fam == "llama" else None), vocab_size=a.vocab, max_seq_len=a.seq)
        r = measure(spec, a.seq, a.batch, a.steps, a.rounds)
        res["families"][fam] = {"spec": spec.to_dict(), "phases": r}
        lines += [f"{fam} {spec.layers}x{spec.hidden} ({spec.heads} heads, {spec.n_kv_heads} kv), seq {a.seq}, "
                  f"batch {a.batch}, vocab {a.vocab}:", "",
                  "| phase | tokens/s | speed vs full | FLOPs/token vs full | speed if time followed FLOPs |",
                  "|---|---|---|---|---|"]
        for name, v in r.items():
            lines.append(f"| {name} | {v['tokens_per_s']:,.0f} | {v['speed_ratio']:.2f}x | {v['flops_ratio']:.2f} "
                         f"| {1 / v['flops_ratio']:.2f}x |")
        lines.append("")
    md = "\n".join(lines)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "est-throughput.json").write_text(json.dumps(res, indent=1))
    (out / "est-throughput.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
