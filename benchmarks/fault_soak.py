#!/usr/bin/env python
"""Fault soak: SIGKILL a training run at random moments, resume it each time, and check that it
ends exactly where an uninterrupted run ends.

    python benchmarks/fault_soak.py                          # 25 kills, 1 rank, two-stage run
    python benchmarks/fault_soak.py --kills 25 --nproc 2 --ds_config ds_configs/zero3_partitioned.json

Not only at the named fault points of the crash tests: one kill in five lands at a random moment
of the start-up, the others at a random moment of what is left of the training (timed from the
attempt's first stage line, over the reference run's training time), so they hit steps,
evaluations, checkpoint writes and prunes, the growth (fit, operator, new engine) and the final
export wherever they happen to be. The whole process group dies at once (torchrun and
every rank), as on a node failure. After every kill the output folder must hold a complete
`latest` checkpoint or none; the run is restarted (`--resume` when a checkpoint exists, and once
with recipe.yaml deleted, which must be recovered from the checkpoint) until it finishes.

Checked at the end, against the uninterrupted reference run with the same arguments:
- final weights bitwise equal (1 rank; 2 ranks with gloo's order-fixed sums),
- metrics.jsonl holds each training step once, summary.json is valid JSON with finite figures,
- no leftovers (`*.partial`, `.trash-*`, `.*.tmp*`) in the output folder.

Prints a table of the kills and writes benchmarks/results/fault_soak.json. tests/test_trust.py
runs the same harness with 3 kills.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.run.guard import find_leftovers  # noqa: E402

# A tiny two-stage GPT-2 (growth by LiGO with a short fit), 12 + 16 steps, a checkpoint every 2.
TINY = ["stages=null", "model.layers=2", "model.hidden=64", "model.heads=4", "model.max_seq_len=64",
        "data.vocab_size=512", "train.seq_len=64", "train.micro_batch=4", "train.global_batch=16",
        "train.lr=3e-3", "train.eval_samples=32", "train.log_every=2", "train.eval_every=4096",
        "train.checkpoint_every=2048", "train.keep_checkpoints=1", "train.tokens=null",
        "stages=[{model: {layers: 2, hidden: 32, heads: 4}, tokens: 12288}, "
        "{grow: {method: ligo, fit_steps: 3}, model: {layers: 4, hidden: 64, heads: 8}, tokens: 16384}]"]


def default_args() -> list[str]:
    out = []
    for o in TINY:
        out += ["--set", o]
    return out


def _command(args: list[str], out: Path, nproc: int, resume: bool, port: int) -> list[str]:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    return cmd + [str(REPO / "launchers" / "pretrain.py"), *args, "--out", str(out)] + (["--resume"] if resume else [])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str]) -> tuple[subprocess.Popen, list[str], threading.Event, threading.Event]:
    """Start a run in its own process group; returns the process, its collected output lines, an
    event set when training begins (the first 'stage 1/' line) and one set when the summary
    is printed (after that only the process teardown is left)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DSGROW_FAULT", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    started, summarised = threading.Event(), threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if ": stage " in line:
                started.set()
            if "dsgrow run summary" in line:
                summarised.set()
        started.set()
        summarised.set()

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines, started, summarised


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a node failure would. torchrun starts each
    rank in a session of its own, so the launcher's process group alone would miss them (psutil
    comes with DeepSpeed)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family[1:], timeout=10)


def run_to_end(cmd: list[str], timeout: float = 600) -> tuple[float, float, str]:
    """(seconds until training started, seconds until the summary, output) of an uninterrupted run."""
    t0 = time.monotonic()
    proc, lines, started, summarised = _start(cmd)
    started.wait(timeout)
    t_start = time.monotonic() - t0
    summarised.wait(timeout)
    t_end = time.monotonic() - t0
    rc = proc.wait(timeout)
    if rc != 0:
        raise RuntimeError(f"run failed ({rc}):\n{''.join(lines)[-4000:]}")
    return t_start, t_end, "".join(lines)


def soak(work: Path, kills: int, seed: int, nproc: int = 1, ds_config: str | None = None,
         extra: list[str] | None = None, say=print) -> dict:
    """Reference run, then `kills` random SIGKILLs with resumes, then the comparison. A run that
    reaches its end before all kills are spent is checked and a new one starts (a cycle)."""
    args = default_args() + (extra or []) + (["--ds_config", ds_config] if ds_config else [])
    ref = work / "reference"
    t_start, t_total, _ = run_to_end(_command(args, ref, nproc, False, _free_port()))
    say(f"reference: training starts at {t_start:.1f} s, summary at {t_total:.1f} s")
    total = json.loads((ref / "summary.json").read_text())["tokens"]
    rng = random.Random(seed)
    rows: list[dict] = []
    cycles: list[dict] = []
    while len(rows) < kills:
        out = work / f"soaked{len(cycles)}"
        rows += _cycle(args, out, nproc, kills - len(rows), len(rows), rng, t_start, t_total, total, say)
        cycles.append(_check(ref, out))
        say(f"cycle {len(cycles)}: {cycles[-1]}")
    worst = max(c["max_weight_diff"] for c in cycles)
    return {"kills": rows, "cycles": cycles, "max_weight_diff": worst,
            "duplicate_steps": sum(c["duplicate_steps"] for c in cycles),
            "leftovers": [x for c in cycles for x in c["leftovers"]],
            "recipe_recovered": any(c["recipe_recovered"] for c in cycles),
            "reference_weights_equal": worst == 0.0, "seed": seed, "nproc": nproc,
            "ds_config": ds_config or "default (ZeRO-2)"}


def _cycle(args, out: Path, nproc: int, budget: int, done: int, rng: random.Random, t_start: float,
           t_total: float, total: int, say) -> list[dict]:
    """Kill one run up to `budget` times, resuming it each time, then let it finish."""
    from dsgrow.engine.checkpoint import latest_tag, verify

    rows: list[dict] = []
    attempts = 0
    while len(rows) < budget and _tokens_at(out, latest_tag(out / "checkpoints")) < total:
        attempts += 1
        if attempts > 4 * budget + 4:
            raise RuntimeError(f"{budget} kills not reached in {attempts} attempts")
        resume = latest_tag(out / "checkpoints") is not None
        if resume and not (out / ".recipe-deleted").exists() and len(rows) >= 1:
            (out / "recipe.yaml").unlink(missing_ok=True)  # must come back from the checkpoint
            (out / ".recipe-deleted").write_text("")
        t0 = time.monotonic()
        proc, lines, started, _ = _start(_command(args, out, nproc, resume, _free_port()))
        # One kill in five lands in the start-up (imports, lock, verify, conversion, engine
        # build); the others uniformly over what is left of this attempt's training, timed from
        # its own first stage line (a resumed run has less to do and starts more slowly).
        if rng.random() < 0.2:
            deadline = t0 + rng.uniform(0.0, t_start)
        else:
            started.wait(600)
            left = 1.0 - (_tokens_at(out, latest_tag(out / "checkpoints")) / total if resume else 0.0)
            # (at least a quarter of the run's span: near the end, a window shorter than one
            # checkpoint interval would kill every attempt before it could checkpoint again)
            deadline = time.monotonic() + rng.uniform(0.0, max(left, 0.25) * (t_total - t_start))
        try:
            rc = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
        if rc is not None:
            if rc != 0:
                raise RuntimeError(f"attempt {attempts} failed ({rc}):\n{''.join(lines)[-4000:]}")
            break  # reached the end before this kill
        tag = latest_tag(out / "checkpoints")
        if tag is not None:
            verify(out / "checkpoints", tag)  # complete and intact, or this raises
        last = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("[", " "))]
        rows.append({"kill": done + len(rows) + 1, "after_s": round(time.monotonic() - t0, 2), "resumed": resume,
                     "latest": tag, "last_line": (last[-1] if last else "")[:80]})
        say(f"kill {rows[-1]['kill']}: after {rows[-1]['after_s']:.1f} s, latest {tag}, "
            f"last line: {rows[-1]['last_line']}")
    if not (out / "summary.json").is_file() or _tokens_at(out, latest_tag(out / "checkpoints")) < total:
        run_to_end(_command(args, out, nproc, latest_tag(out / "checkpoints") is not None, _free_port()))
    elif not (out / "final_model").is_dir():
        run_to_end(_command(args, out, nproc, True, _free_port()))
    return rows


def _check(ref: Path, out: Path) -> dict:
    """A finished soaked run against the reference."""
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "final_model" / "model.safetensors")), load_file(str(out / "final_model" / "model.safetensors"))
    diff = max((a[k] - b[k]).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    ref_steps = [json.loads(line)["step"] for line in (ref / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_refuse)
    deleted = (out / ".recipe-deleted").is_file()
    (out / ".recipe-deleted").unlink(missing_ok=True)
    return {"max_weight_diff": diff, "duplicate_steps": len(steps) - len(set(steps)),
            "steps_as_reference": steps == ref_steps, "leftovers": [p.name for p in find_leftovers(out)],
            "recipe_recovered": deleted and (out / "recipe.yaml").is_file(),
            "summary_train_loss": summary["train_loss"]}


def _tokens_at(out: Path, tag: str | None) -> int:
    if tag is None:
        return 0
    return json.loads((out / "checkpoints" / tag / "run_state.json").read_text())["tokens"]


def _refuse(name: str):
    raise ValueError(f"summary.json holds {name}: not valid JSON")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--seed", type=int, default=None, help="seed of the kill times (default: random, printed)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--ds_config", default=None)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "fault_soak.json"))
    a = p.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    print(f"fault soak: {a.kills} kills, seed {seed}, {a.nproc} rank(s)")
    with tempfile.TemporaryDirectory(prefix="dsgrow-soak-") as tmp:
        r = soak(Path(tmp), a.kills, seed, a.nproc, a.ds_config)
    print("\n| kill | after (s) | resumed | latest checkpoint at kill | last output line |")
    print("|---:|---:|:---:|---|---|")
    for row in r["kills"]:
        print(f"| {row['kill']} | {row['after_s']} | {'yes' if row['resumed'] else 'no'} | {row['latest']} | "
              f"{row['last_line'].replace('|', '/')} |")
    print(f"\n{len(r['cycles'])} run(s) killed and resumed to the end; final weights vs uninterrupted run: max |diff| = "
          f"{r['max_weight_diff']:g}; duplicate step records: {r['duplicate_steps']}; metric steps as the "
          f"reference: {all(c['steps_as_reference'] for c in r['cycles'])}; leftovers: {r['leftovers'] or 'none'}; "
          f"recipe.yaml deleted and recovered: {r['recipe_recovered']}")
    r["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(r, indent=1))
    ok = (r["reference_weights_equal"] and not r["duplicate_steps"] and not r["leftovers"]
          and all(c["steps_as_reference"] for c in r["cycles"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
