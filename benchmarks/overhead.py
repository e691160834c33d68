#!/usr/bin/env python
"""dsgrow's training loop against a minimal plain DeepSpeed loop: same model, data, config.

    python benchmarks/overhead.py [--steps 200] [--recipe R] [--ds_config C] [--set k=v ...]
    deepspeed --num_gpus N benchmarks/overhead.py ...          # any number of ranks

Both loops run in this one process, alternating (plain, dsgrow, plain, dsgrow, ...), so machine
noise hits both alike. Throughput is measured over the same windows of `log_every` optimizer
steps; the first window of each run (warm-up) is dropped and the median of the rest is taken.
dsgrow's evaluation and checkpointing are switched off inside the windows (the final ones run
after the timed steps), because the plain loop has neither. Prints a table and writes
benchmarks/results/overhead.json. Goal: ratio >= 0.98.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def plain_loop(recipe, data, ds_cfg, steps: int, window: int) -> list[float]:
    """The loop a DeepSpeed tutorial writes: model, AdamW, initialize, forward/backward/step."""
    import deepspeed
    import torch.distributed as dist
    import transformers as tf

    t = recipe.train
    spec = recipe.model.with_vocab(data.tokenizer.vocab_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    keep = None
    if ds_cfg.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_cfg)  # noqa: F841 (must stay alive while the model is built)
    torch.manual_seed(t.seed)
    model = tf.AutoModelForCausalLM.from_config(spec.to_hf_config())
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    g = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(data.train), generator=g)
    per_rank = t.global_batch // world
    gas = per_rank // t.micro_batch
    rates, pos, t0 = [], 0, time.perf_counter()
    for step in range(1, steps + 1):
        idx = order[(pos + rank * per_rank + torch.arange(per_rank)) % len(order)]
        pos += t.global_batch
        for k in range(gas):
            x = data.train[idx[k * t.micro_batch:(k + 1) * t.micro_batch]].to(engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        if step % window == 0:
            float(loss)  # the same host sync dsgrow does at a log line
            now = time.perf_counter()
            rates.append(window * t.global_batch * t.seq_len / (now - t0))
            t0 = now
    engine.destroy()
    return rates


def dsgrow_loop(recipe_path, overrides, ds_config, steps: int, window: int) -> list[float]:
    from dsgrow.recipe import load_recipe
    from dsgrow.train import Trainer

    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(recipe_path, overrides, out=out)
        recipe.train.resolve_tokens(steps * recipe.train.global_batch * recipe.train.seq_len)
        recipe.train.eval_every = 0
        recipe.train.checkpoint_every = 0
        recipe.train.log_every = window
        recipe.export_hf = False
        trainer = Trainer(recipe, ds_config)
        trainer.run()
        trainer.close()
        lines = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--recipe", default=None)
    p.add_argument("--ds_config", default=str(REPO / "ds_configs" / "zero2.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.json"))
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.overrides = ["stages=null", *a.overrides]  # the loop itself: one model, no growth stages
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from dsgrow.recipe import load_recipe
    from dsgrow.engine.ds_config import fill_ds_config, read_ds_config, resolve_precision
    from dsgrow.engine.runtime import has_gpu, init_distributed
    from dsgrow.run.setup import prepare_data

    recipe = load_recipe(a.recipe, a.overrides)
    if recipe.model.family == "bert":
        raise SystemExit("overhead.py compares causal-LM loops; use a gpt2 or llama recipe")
    rank, world, _ = init_distributed()
    precision = resolve_precision(recipe.train.precision, has_gpu())
    ds_cfg = fill_ds_config(read_ds_config(a.ds_config), recipe.train, world, precision)
    data = prepare_data(recipe, rank)

    plain, ours = [], []
    for _ in range(a.repeats):
        plain += plain_loop(recipe, data, ds_cfg, a.steps, a.window)[1:]
        ours += dsgrow_loop(a.recipe, a.overrides, a.ds_config, a.steps, a.window)[1:]
    res = {
        "plain_tokens_per_s": statistics.median(plain), "dsgrow_tokens_per_s": statistics.median(ours),
        "windows": {"plain": plain, "dsgrow": ours}, "steps": a.steps, "window": a.window,
        "repeats": a.repeats, "world_size": world, "precision": precision, "ds_config": a.ds_config,
        "model": recipe.model.to_dict(), "global_batch": recipe.train.global_batch,
        "seq_len": recipe.train.seq_len, "device": torch.cuda.get_device_name() if has_gpu() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    res["ratio"] = res["dsgrow_tokens_per_s"] / res["plain_tokens_per_s"]
    if rank == 0:
        print(f"\n{'loop':<10}{'tokens/s (median)':>20}{'windows':>10}")
        print(f"{'plain':<10}{res['plain_tokens_per_s']:>20,.0f}{len(plain):>10}")
        print(f"{'dsgrow':<10}{res['dsgrow_tokens_per_s']:>20,.0f}{len(ours):>10}")
        print(f"ratio dsgrow/plain = {res['ratio']:.3f}  (goal >= 0.98; {world} rank(s), {precision}, {res['device']})")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
