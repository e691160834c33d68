"""Driver for tests/test_plugin.py: grow_engine on engines a user builds, checked from inside.

    python tests/drivers/grow_engine_checks.py OUT.json ZERO_STAGE     (or under torchrun, N ranks)

Bad requests must fail with one GrowthError line before the engine is touched (its weights
unchanged, and it still trains); a good one must build the new engine like the user's (optimizer
class, every group's settings, the no-decay split, the LR scheduler's position). Rank 0 writes
what it saw to OUT.json; the test asserts on it.
"""
import json
import sys

import deepspeed
import torch
import transformers

import dsgrow
from dsgrow.engine.optim_state import base_optimizer
from dsgrow.engine.rebuild import _original_groups
from dsgrow.engine.runtime import end_distributed, gather_fp32_state_dict, init_distributed
from dsgrow.growth import GrowthError

out_path, stage = sys.argv[1], int(sys.argv[2])
rank, world, _ = init_distributed()
torch.manual_seed(0)
VOCAB, SEQ = 97, 16


def config(**extra):
    return {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, **extra}


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))


def split(model):
    return [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]


def user_engine(model=None, opt_cls=torch.optim.AdamW, **opt_kw):
    model = model or gpt2()
    opt = opt_cls(split(model), lr=1e-3, **opt_kw)
    return deepspeed.initialize(model=model, optimizer=opt, config=config(zero_allow_untested_optimizer=True))[0]


ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(rank))
batch = {"input_ids": ids, "labels": ids}


def train(engine, steps):
    losses = []
    for _ in range(steps):
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


engine = user_engine(betas=(0.9, 0.95), eps=1e-7)
train(engine, 3)
before = gather_fp32_state_dict(engine, all_ranks=True)


class NotHF(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)


def pipeline_engine():
    from deepspeed.pipe import PipelineModule

    pm = PipelineModule(layers=[torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], num_stages=1,
                        loss_fn=torch.nn.MSELoss())
    cfg = config(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}})
    cfg["zero_optimization"] = {"stage": min(stage, 1)}  # DeepSpeed: pipelines take ZeRO-0/1 only
    return deepspeed.initialize(model=pm, model_parameters=pm.parameters(), config=cfg)[0]


def bert_engine():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=SEQ)
    return user_engine(transformers.BertForMaskedLM(cfg))


def opt_engine():
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 ffn_dim=64, max_position_embeddings=SEQ, word_embed_proj_dim=32)
    return user_engine(transformers.OPTForCausalLM(cfg))


grow = dsgrow.grow_engine
BAD = {
    "unknown_family": lambda: grow(opt_engine(), {"layers": 4}, "fpi"),
    "not_hf": lambda: grow(user_engine(NotHF()), {"layers": 4}, "fpi"),
    "other_head": lambda: grow(user_engine(transformers.GPT2Model(gpt2().config)), {"layers": 4}, "fpi"),
    "shrink": lambda: grow(engine, {"layers": 1}, "fpi"),
    "method_cannot": lambda: grow(engine, {"hidden": 48, "heads": 6}, "hyperclone"),
    "unknown_method": lambda: grow(engine, {"layers": 4}, "magic"),
    "unknown_option": lambda: grow(engine, {"layers": 4}, "fpi", noise_level=0.1),
    "fit_without_data": lambda: grow(engine, {"layers": 4}, "ligo", fit_steps=3),
    "fit_data_not_inputs": lambda: grow(engine, {"layers": 4}, "ligo", fit_steps=3, fit_data=[{"text": "x"}]),
    "bert_fit_without_labels": lambda: grow(bert_engine(), {"layers": 4}, "ligo", fit_steps=3,
                                            fit_data=[{"input_ids": ids}]),
    "transfer_not_preserving": lambda: grow(engine, {"layers": 4}, "stack", optimizer="transfer"),
    "transfer_bert": lambda: grow(bert_engine(), {"layers": 4}, "fpi", optimizer="transfer"),
    "transfer_sgd": lambda: grow(user_engine(opt_cls=torch.optim.SGD), {"layers": 4}, "fpi", optimizer="transfer"),
    "bad_optimizer_mode": lambda: grow(engine, {"layers": 4}, "fpi", optimizer="keep"),
    "pipeline": lambda: grow(pipeline_engine(), {"layers": 4}, "fpi"),
}
errors = {}
for name, call in BAD.items():
    try:
        call()
        errors[name] = None
    except GrowthError as e:
        errors[name] = str(e)

after_bad = gather_fp32_state_dict(engine, all_ranks=True)
untouched = all(torch.equal(before[k], after_bad[k]) for k in before)
still_trains = train(engine, 5)


def groups_of(engine):
    """Per param group: its settings and how many elements of 1-D / >= 2-D parameters it holds."""
    out = []
    base = base_optimizer(engine)
    sizes = {}
    for gi, params in _original_groups(engine.optimizer):
        for p in params:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            key = (gi, "matrix" if len(shape) >= 2 else "vector")
            sizes[key] = sizes.get(key, 0) + int(torch.Size(shape).numel())
    for gi, g in enumerate(base.param_groups):
        out.append({"weight_decay": g["weight_decay"], "betas": list(g["betas"]), "eps": g["eps"], "lr": g["lr"],
                    "matrix": sizes.get((gi, "matrix"), 0), "vector": sizes.get((gi, "vector"), 0)})
    return {"class": type(base).__name__, "groups": out}


new, report = grow(engine, {"layers": 4, "hidden": 64}, "fpi", eval_batch=batch)
user_grown = {"optimizer": groups_of(new), "loss_before": report.loss_before, "loss_after": report.loss_after,
              "carried": report.carried, "trains": train(new, 5),
              "large_matrix": sum(p.numel() for p in transformers.GPT2LMHeadModel(new.module.config).parameters()
                                  if p.dim() >= 2),
              "large_vector": sum(p.numel() for p in transformers.GPT2LMHeadModel(new.module.config).parameters()
                                  if p.dim() < 2)}

# The ds_config's own optimizer and scheduler (no client optimizer): built again from the config,
# the scheduler at the position it had reached.
cfg = config(optimizer={"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.05, "torch_adam": True}},
             scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-3,
                                                        "warmup_num_steps": 10}})
model = gpt2()
eng2 = deepspeed.initialize(model=model, model_parameters=split(model), config=cfg)[0]
train(eng2, 4)
sched_before = (eng2.lr_scheduler.last_batch_iteration, eng2.get_lr())
new2, report2 = grow(eng2, {"layers": 3}, "fpi", eval_batch=batch)
config_grown = {"optimizer": groups_of(new2), "sched_before": sched_before,
                "sched_after": (new2.lr_scheduler.last_batch_iteration, new2.get_lr()),
                "global_steps": (4, new2.global_steps), "loss_before": report2.loss_before,
                "loss_after": report2.loss_after, "trains": train(new2, 3)}

# The other families, as a user builds them with transformers: LLaMA with GQA (kv groups kept) and
# BERT (post-LN: FPI's new identity layers are exact up to LayerNorm eps), each trained, grown, trained.
def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, bos_token_id=None, eos_token_id=None,
        pad_token_id=None))


families = {}
for name, make, target in (("llama", lambda: user_engine(llama()), {"layers": 4, "hidden": 64}),
                           ("bert", bert_engine, {"layers": 3, "hidden": 64})):
    eng = make()
    train(eng, 2)
    eng, rep = grow(eng, target, "fpi", eval_batch=batch)
    families[name] = {"loss_before": rep.loss_before, "loss_after": rep.loss_after, "trains": train(eng, 4),
                      "kv_heads": getattr(eng.module.config, "num_key_value_heads", None),
                      "layers": eng.module.config.num_hidden_layers}

# DeepSpeed's own CPU Adam (ZeRO-3 with the optimizer offloaded), built again from the ds_config.
offload = None
if stage == 3:
    cfg = config(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}})
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    model = gpt2()
    eng3 = deepspeed.initialize(model=model, model_parameters=split(model), config=cfg)[0]
    train(eng3, 2)
    new3, rep3 = grow(eng3, {"layers": 4}, "fpi", eval_batch=batch)
    offload = {"optimizer": groups_of(new3), "loss_before": rep3.loss_before, "loss_after": rep3.loss_after,
               "trains": train(new3, 4)}

if rank == 0:
    with open(out_path, "w") as f:
        json.dump({"errors": errors, "untouched": untouched, "still_trains": still_trains,
                   "user_grown": user_grown, "config_grown": config_grown, "families": families,
                   "offload": offload}, f, indent=1)
end_distributed()  # not left to interpreter teardown, which sometimes aborts a finished rank
