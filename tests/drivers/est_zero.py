"""Driver for tests/test_est.py: EST in a user's own DeepSpeed loop, ZeRO-0..3, N real ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/drivers/est_zero.py OUT.json

For each ZeRO stage the same model (same seed) trains the same steps through dsgrow.Subnetwork,
each rank on its own data, two micro-batches per step. Rank 0 writes, per stage and family: the
losses, the final full model's weights (gathered), whether every rank drew the same subnetworks,
and under ZeRO-3 (partitioning on: persistence threshold 0) the parameter elements all-gathered in
an EST step's forward + backward against a full step's.
"""
import hashlib
import json
import sys

import deepspeed
import torch
import torch.distributed as tdist

import dsgrow
from dsgrow.engine.runtime import end_distributed, gather_fp32_state_dict, init_distributed, param_groups
from dsgrow.families.hf_io import build_hf_model
from dsgrow.families.spec import ModelSpec

out_path = sys.argv[1]
rank, world, _ = init_distributed()
VOCAB, SEQ, MICRO, STEPS = 97, 16, 2, 8
SPECS = {"gpt2": ModelSpec(family="gpt2", layers=4, hidden=32, heads=4, vocab_size=VOCAB, max_seq_len=SEQ),
         "llama": ModelSpec(family="llama", layers=4, hidden=32, heads=4, kv_heads=2, vocab_size=VOCAB,
                            max_seq_len=SEQ)}
EST = {"method": "est", "phases": [{"until": 0.5, "layers": 0.5, "heads": 0.5, "ffn": 0.5},
                                   {"until": 0.75, "heads": 0.5, "ffn": 0.5}]}

# ZeRO-3 gathers parameters through these; count the elements they bring in.
import deepspeed.comm as dscomm  # noqa: E402
import deepspeed.runtime.zero.partition_parameters as pp  # noqa: E402

gathered = [0]


def counting(fn, out_arg):
    def wrapped(*args, **kwargs):
        out = kwargs[out_arg] if out_arg in kwargs else args[0]
        gathered[0] += sum(t.numel() for t in out) if isinstance(out, (list, tuple)) else out.numel()
        return fn(*args, **kwargs)
    return wrapped


_allgather_fn = pp._dist_allgather_fn


def counting_allgather_fn(input_tensor, output_tensor, group=None):  # ZeRO-3's coalesced fetch
    gathered[0] += output_tensor.numel()
    return _allgather_fn(input_tensor, output_tensor, group=group)


pp._dist_allgather_fn = counting_allgather_fn
dscomm.all_gather_into_tensor = counting(dscomm.all_gather_into_tensor, "output_tensor")
dscomm.all_gather = counting(dscomm.all_gather, "tensor_list")


def config(stage):
    return {"train_batch_size": MICRO * 2 * world, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True}


def data(step, k):
    g = torch.Generator().manual_seed(1000 * step + 10 * k + rank)
    ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
    ids[:, 1::2] = ids[:, 0::2]  # something learnable: every odd token repeats the one before
    return {"input_ids": ids, "labels": ids}


def run(family, stage):
    spec = SPECS[family]
    model = build_hf_model(spec, seed=3)
    if stage == 3:
        # Partition the built model's weights the way a user's zero.Init would.
        with deepspeed.zero.Init(config_dict_or_path=config(stage)):
            shell = build_hf_model(spec, seed=3)
        sd = model.state_dict()
        for name, p in shell.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(sd[name])
        model = shell
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    engine = deepspeed.initialize(model=model, optimizer=opt, config=config(stage))[0]
    est = dsgrow.Subnetwork(engine, EST, seed=11, spec=spec)
    losses, draws, elements = [], [], {}
    for step in range(STEPS):
        fraction = step / STEPS
        with est.active(step, fraction) as s:
            draws.append(None if s is None else s.to_dict())
            gathered[0] = 0
            total = 0.0
            for k in range(2):
                engine.set_gradient_accumulation_boundary(k == 1)
                loss = engine(**{n: v.to(engine.device) for n, v in data(step, k).items()}).loss
                engine.backward(loss)
                engine.step()
                total += float(loss) / 2
            if stage == 3 and step > 0:  # step 0 also records ZeRO-3's fetch trace
                kind = "full" if s is None else ("skip" if len(s.layers) < spec.layers else "sliced")
                elements.setdefault(kind, []).append(gathered[0])
        losses.append(total)
    digest = hashlib.sha256(json.dumps(draws, sort_keys=True).encode()).hexdigest()
    every = [None] * world
    tdist.all_gather_object(every, digest)
    state = gather_fp32_state_dict(engine)
    return {"losses": losses, "same_draws": len(set(every)) == 1, "gathered": elements,
            "draws": draws}, state


results, states = {}, {}
for family, stages in (("gpt2", (0, 1, 2, 3)), ("llama", (0, 3))):
    for stage in stages:
        r, st = run(family, stage)
        results[f"{family}-zero{stage}"] = r
        if rank == 0:
            states[f"{family}-zero{stage}"] = st
if rank == 0:
    for key, st in states.items():
        ref = states[key.split("-")[0] + "-zero0"]
        results[key]["max_weight_diff_vs_zero0"] = max((st[n].float() - ref[n].float()).abs().max().item()
                                                       for n in ref)
        results[key]["worst"] = max(ref, key=lambda n: (st[n].float() - ref[n].float()).abs().max().item())
    with open(out_path, "w") as f:
        json.dump(results, f)
end_distributed()  # not left to interpreter teardown, which sometimes aborts a finished rank
