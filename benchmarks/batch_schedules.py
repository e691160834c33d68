#!/usr/bin/env python
"""Batch-size schedules at one token budget, on the tiny GPT-2 recipe (the embedded default).

    python benchmarks/batch_schedules.py [--tokens 1M] [--ds_config ds_configs/zero2.json]
    python benchmarks/batch_schedules.py --nproc 2          # through torchrun, 2 ranks

Arms (same model, data order, seed, peak LR and token budget):
- constant:     global batch 32, warmup + cosine (the default recipe).
- ramp:         8 -> 32 in steps of 8 over the first 25% of the tokens (Megatron-style), cosine
                LR, no LR scaling while it ramps (Megatron's convention).
- step-decay:   batch 16, constant LR with x0.5 decays at 50% and 75% of the tokens: the base
                schedule of the next arm (grow_instead_of_decay with max_batch = base_batch
                turns every decay into an LR decay).
- grow-batch:   Smith et al.'s "increase the batch instead of decaying the LR": the same decay
                points double the batch 16 -> 32 -> 64 at a constant LR.

Each arm is a real launcher run (launchers/pretrain.py) in its own process, one after the
other; reported: final held-out loss, optimizer steps, wall time and tokens/s from each run's
summary.json. Prints a markdown table and writes benchmarks/results/batch_schedules.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.config import parse_count  # noqa: E402


def arms(tokens: int) -> dict[str, list[str]]:
    q = tokens // 4
    half, three_q = tokens // 2, 3 * tokens // 4
    return {
        "constant": ["train.global_batch=32"],
        "ramp": [f"train.batch_schedule={{type: ramp, start: 8, increment: 8, ramp_tokens: {q}, end: 32}}",
                 "train.global_batch=32"],
        "step-decay": ["train.lr_schedule=constant", "train.global_batch=16",
                       f"train.batch_schedule={{type: grow_instead_of_decay, base_lr_steps: '{half}:0.5 {three_q}:0.5', "
                       "base_batch: 16, max_batch: 16}"],
        "grow-batch": ["train.lr_schedule=constant", "train.global_batch=16",
                       f"train.batch_schedule={{type: grow_instead_of_decay, base_lr_steps: '{half}:0.5 {three_q}:0.5', "
                       "base_batch: 16, max_batch: 64}"],
    }


def run_arm(name: str, overrides: list[str], args, root: Path) -> dict:
    out = root / name
    common = ["stages=null", f"train.tokens={args.tokens}", "train.micro_batch=8", "train.checkpoint_every=0",
              f"train.eval_every={args.tokens}", f"train.eval_samples={args.eval_samples}", "export_hf=false", "train.log_every=1"]
    sets = [x for o in [*common, *overrides] for x in ("--set", o)]
    script = [str(REPO / "launchers" / "pretrain.py"), "--ds_config", args.ds_config, "--out", str(out), *sets]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", *script]
    else:
        cmd = [sys.executable, *script]
    print(f"[{name}] {' '.join(overrides)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    s = json.loads((out / "summary.json").read_text())
    sizes = sorted({json.loads(line)["batch_size"] for line in (out / "metrics.jsonl").read_text().splitlines()
                    if "batch_size" in json.loads(line)})
    return {"arm": name, "val_loss": s["val_loss"], "train_loss": s["train_loss"], "steps": s["steps"],
            "tokens": s["tokens"], "wall_time_s": s["wall_time_s"], "tokens_per_s": s["tokens_per_s"],
            "batch_sizes": sizes, "overrides": overrides}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1M", help="token budget of every arm (default 1M)")
    p.add_argument("--ds_config", default="ds_configs/zero2.json")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--eval-samples", type=int, default=256, help="held-out samples of the final evaluation")
    p.add_argument("--only", default=None, help="comma-separated arms to run")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "batch_schedules.json"))
    args = p.parse_args()
    args.tokens = parse_count(args.tokens, "--tokens")
    chosen = arms(args.tokens)
    if args.only:
        unknown = set(args.only.split(",")) - set(chosen)
        if unknown:
            p.error(f"unknown arm(s) {', '.join(sorted(unknown))} (known: {', '.join(chosen)})")
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    with tempfile.TemporaryDirectory(prefix="dsgrow-batch-") as tmp:
        rows = [run_arm(name, o, args, Path(tmp)) for name, o in chosen.items()]
    print(f"\n| arm | final val loss | optimizer steps | batch sizes | wall s | tokens/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['val_loss']:.4f} | {r['steps']} | {','.join(map(str, r['batch_sizes']))} "
              f"| {r['wall_time_s']:.1f} | {r['tokens_per_s']:,.0f} |")
    result = {"benchmark": "batch_schedules", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count()}, "tokens": args.tokens,
              "ds_config": args.ds_config, "nproc": args.nproc, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
