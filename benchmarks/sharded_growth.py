#!/usr/bin/env python
"""Cost of a growth boundary under ZeRO-3: time and per-rank peak memory of each phase.

    python benchmarks/sharded_growth.py [--sizes small,medium,large] [--worlds 1,2] [--no-demo]
  python benchmarks/sharded_growth.py --sizes "" --out /tmp/demo.json   # the demo share alone

For each size pair (GPT-2, small -> large, LiGO width + depth, a few fit steps) and world size,
a real two-stage run of launchers/pretrain.py under ZeRO-3 with partitioning on
(stage3_param_persistence_threshold 0) and the growth event it logs (dsgrow/train.py _grow, through dsgrow.grow_engine):

- gather: the small fp32 weights onto every rank, the old engine freed;
- fit:    the LiGO operator fitted data-parallel (activations of the large model included);
- write:  the large model built under zero.Init and each rank's slices written, one large layer
          made at a time;
- engine: deepspeed.initialize of the large model (optimizer states are created here).

Memory is the rank's resident-set high-water mark during the phase (Linux VmHWM, reset per
phase, glibc told to mmap every block >= 64 KiB so freed memory leaves the process) minus the
rank's resident memory right after the old engine is freed (which holds the small weights), plus
the small weights: the phase's working set. It is printed against the bound

    large-model shard (fp32 params / world) + small model (fp32) + one large layer (fp32)

for the gather and write phases (the fit also holds activations and the operator, the engine
phase Adam states: they are shown, not bounded), and against the bound plus the LiGO operator's
own maps (they are alive until the last layer is written; at 4x256 -> 8x512 the per-layer FFN
maps alone are 32 MiB). "write rise" is the write phase's peak above its own start: the large
shard and the layer being made, without what the phase was handed (small model, operator, grown
embeddings) or what the fit left behind: about 10-13 MiB of one-time process state at this size,
not tensors (/proc/self/smaps before and after a first fit: ~7 MiB of torch's own code pages,
file-backed, paged in by the first large backward; ~3.5 MiB of MKL's buffer cache, gone with
MKL_DISABLE_FAST_MM=1; ~2 MiB heap and thread arenas; a second fit leaves 0.1 MiB).

"write without code pages" takes out of the write phase's working set the library code paged in
since the base (RssFile, file-backed and shared by every rank on a node; what was resident at the
phase's end, so a lower estimate): the rank's own memory.

Then the README demo (the embedded default recipe, 1 rank, ZeRO-2) is run and growth time is
reported as a share of its second stage's training time. Writes benchmarks/results/sharded_growth.json.
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
MIB = 2 ** 20

SIZES = {  # name: (small layers x hidden, large layers x hidden, vocab)
    "small": ((2, 64), (4, 128), 512),
    "medium": ((4, 128), (8, 256), 2048),
    "large": ((4, 256), (8, 512), 2048),
}
SEQ, BATCH, MICRO = 128, 16, 4


def run(args: list[str], nproc: int, env: dict) -> None:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(29500 + os.getpid() % 1000)]
    cmd += [str(REPO / "launchers" / "pretrain.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def read_run(out: Path) -> tuple[dict, dict, list[dict]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ev = next(m for m in lines if m.get("event") == "growth")
    return ev, json.loads((out / "summary.json").read_text()), lines


def sized_run(name: str, world: int, root: Path, env: dict, fit_steps: int, method: str = "ligo") -> dict:
    (l1, h1), (l2, h2), vocab = SIZES[name]
    step = BATCH * SEQ
    from dsgrow.growth import get_method

    if not get_method(method).fits:
        fit_steps = 0
    grow = (f"{{method: {method}, fit_steps: {fit_steps}, fit_batch: {BATCH}}}" if fit_steps
            else f"{{method: {method}}}")
    stages = (f"[{{model: {{layers: {l1}, hidden: {h1}, heads: {h1 // 32}}}, tokens: {2 * step}}}, "
              f"{{grow: {grow}, model: {{layers: {l2}, hidden: {h2}}}, tokens: {(2 + fit_steps) * step}}}]")
    sets = ["train.tokens=null", f"stages={stages}", f"data.vocab_size={vocab}", f"train.seq_len={SEQ}",
            f"model.max_seq_len={SEQ}", f"train.global_batch={BATCH}", f"train.micro_batch={MICRO}",
            "train.eval_samples=16", "train.checkpoint_every=0", "train.eval_every=0", "export_hf=false",
            "train.log_every=1"]
    out = root / f"{name}-{method}-w{world}"
    run(["--ds_config", str(REPO / "ds_configs" / "zero3_partitioned.json"), "--out", str(out), *[x for s in sets for x in ("--set", s)]], world, env)
    ev, summary, _ = read_run(out)
    small_b, layer_b = ev["bytes_gathered"], ev["largest_layer_bytes"]
    large_b = summary["params"] * 4
    bound = large_b / world + small_b + layer_b
    op_b = ev.get("operator_bytes", 0)
    row = {"size": name, "method": method, "world": world, "small": f"{l1}x{h1}", "large": f"{l2}x{h2}", "vocab": vocab,
           "small_params": small_b // 4, "large_params": summary["params"], "bound_mib": bound / MIB,
           "operator_mib": op_b / MIB,
           "local_param_fraction": summary["local_param_fraction"], "phases": {}}
    for ph in ("gather", "fit", "write", "engine"):
        mem = ev["memory_mib"][ph]
        work = [peak - base + small_b / MIB for peak, base in zip(mem["host_peak"], ev["host_base_mib"])]
        # What the phase itself added on top of what it was handed (for write: without the operator,
        # the grown non-layer tensors, and any runtime state an earlier phase left behind).
        rise = [peak - start for peak, start in zip(mem["host_peak"], mem["host_start"])]
        row["phases"][ph] = {"s": ev[f"{ph}_s"], "working_set_mib": work, "max_working_set_mib": max(work),
                             "rise_mib": rise,
                             "vs_bound": max(work) / (bound / MIB),
                             "vs_bound_with_operator": max(work) / ((bound + op_b) / MIB)}
        if "host_file_end" in mem and "host_base_file_mib" in ev:
            # Without library code paged in since the base (file-backed, shared by every rank on a
            # node): at most what was resident by the phase's end, so this is a lower estimate.
            anon = [w - max(0.0, f - fb) for w, f, fb in zip(work, mem["host_file_end"], ev["host_base_file_mib"])]
            row["phases"][ph].update(anon_working_set_mib=anon, max_anon_working_set_mib=max(anon),
                                     anon_vs_bound_with_operator=max(anon) / ((bound + op_b) / MIB))
    return row


def demo_share(root: Path, env: dict) -> dict:
    out = root / "demo"
    run(["--ds_config", str(REPO / "ds_configs" / "zero2.json"), "--out", str(out), "--set", "export_hf=false"],
        1, env)
    ev, summary, lines = read_run(out)
    grown_at = next(i for i, m in enumerate(lines) if m.get("event") == "growth")
    stage_train_s = lines[-1]["elapsed_s"] - lines[grown_at]["elapsed_s"]
    mech = ev["gather_s"] + ev["write_s"] + ev["engine_s"]
    stage_tokens = summary["tokens"] - ev["tokens"] - ev["fit_tokens"]
    return {"growth_s": ev["growth_s"], "fit_s": ev["fit_s"], "mechanics_s": mech,
            "stage2_train_s": stage_train_s, "growth_share": ev["growth_s"] / stage_train_s,
            "mechanics_share": mech / stage_train_s, "fit_share": ev["fit_s"] / stage_train_s,
            "fit_tokens": ev["fit_tokens"], "stage2_tokens": stage_tokens,
            # fit share = (fit tokens / stage tokens) x (a fit token's time / a training token's):
            # the first is the recipe's choice, the second the fit's own cost.
            "fit_token_share": ev["fit_tokens"] / stage_tokens,
            "fit_time_per_token_ratio": (ev["fit_s"] / ev["fit_tokens"]) / (stage_train_s / stage_tokens),
            "loss_before": ev["loss_before"], "loss_after": ev["loss_after"], "final_val_loss": summary["val_loss"]}


def anon_col(ph: dict) -> str:
    if "max_anon_working_set_mib" not in ph:
        return "-"
    return f"{ph['max_anon_working_set_mib']:.1f} ({ph['anon_vs_bound_with_operator']:.2f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--sizes", default="small,medium,large")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--fit_steps", type=int, default=2)
    p.add_argument("--method", default="ligo", help="growth method (closed-form ones have no fit)")
    p.add_argument("--no-demo", dest="demo", action="store_false")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sharded_growth.json"))
    a = p.parse_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="65536")
    env.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsgrow-sharded-") as tmp:
        root = Path(tmp)
        for name in filter(None, a.sizes.split(",")):
            for world in map(int, a.worlds.split(",")):
                rows.append(sized_run(name, world, root, env, a.fit_steps, a.method))
                r = rows[-1]
                print(f"{name} ({r['small']} -> {r['large']}, {r['large_params'] / 1e6:.1f}M) world {world}: "
                      + ", ".join(f"{k} {v['s']:.2f}s {v['max_working_set_mib']:.0f} MiB" for k, v in r["phases"].items()),
                      flush=True)
        # The demo as the README runs it: glibc's default allocator and the machine's threads (the
        # mmap threshold above makes every allocation a page-faulting mmap, which slows training).
        demo_env = {k: v for k, v in env.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        if "OMP_NUM_THREADS" not in os.environ:
            demo_env.pop("OMP_NUM_THREADS", None)
        demo = demo_share(root, demo_env) if a.demo else None
    print("\nper-rank working set (max over ranks) and time of each growth phase, ZeRO-3, fp32, CPU")
    print("| method, size | world | large params | bound MiB | + operator MiB | gather MiB (x bound) | write MiB (x bound, "
          "x bound+operator) | write without code pages MiB (x bound+operator) | write rise MiB | fit MiB | engine MiB | gather s | fit s | write s | engine s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ph = r["phases"]
        print(f"| {r['method']} {r['small']} -> {r['large']} | {r['world']} | {r['large_params'] / 1e6:.2f}M | {r['bound_mib']:.1f} "
              f"| {r['operator_mib']:.1f} | {ph['gather']['max_working_set_mib']:.1f} ({ph['gather']['vs_bound']:.2f}) "
              f"| {ph['write']['max_working_set_mib']:.1f} ({ph['write']['vs_bound']:.2f}, "
              f"{ph['write']['vs_bound_with_operator']:.2f}) | {anon_col(ph['write'])} | {max(ph['write']['rise_mib']):.1f} "
              f"| {ph['fit']['max_working_set_mib']:.1f} | {ph['engine']['max_working_set_mib']:.1f} "
              f"| {ph['gather']['s']:.2f} | {ph['fit']['s']:.2f} | {ph['write']['s']:.2f} | {ph['engine']['s']:.2f} |")
    if demo:
        print(f"\ndemo (default recipe, 1 rank, ZeRO-2): growth {demo['growth_s']:.2f} s = "
              f"{100 * demo['growth_share']:.1f}% of stage 2's {demo['stage2_train_s']:.1f} s of training "
              f"(fit {demo['fit_s']:.2f} s = {100 * demo['fit_share']:.1f}%, gather+write+engine "
              f"{demo['mechanics_s']:.2f} s = {100 * demo['mechanics_share']:.2f}%; the fit is "
              f"{100 * demo['fit_token_share']:.1f}% of the stage's tokens at {demo['fit_time_per_token_ratio']:.2f}x "
              f"a training token's time); val loss "
              f"{demo['loss_before']:.4f} -> {demo['loss_after']:.4f} at the boundary, {demo['final_val_loss']:.4f} at the end")
    res = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
           "seq_len": SEQ, "global_batch": BATCH, "fit_steps": a.fit_steps, "method": a.method, "runs": rows, "demo": demo}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
