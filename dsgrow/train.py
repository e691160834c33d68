"""The training loop: recipe -> data -> DeepSpeed engine -> steps, evaluation, checkpoints, export.

Everything the loop decides is a function of tokens seen (LR, when to evaluate, when to
checkpoint), and the only state a resumed run needs is that counter, the data position, the
engine's checkpoint and the RNG states.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import __version__
from .config import ConfigError, Recipe, load_recipe
from .families.spec import ModelSpec
from .schedules.flops import flops_per_token
from .engine.grad_stats import MicroBatchGradNorm
from .schedules.lr import warmup_cosine
from .schedules.noise_scale import NoiseScaleEstimator

# Fields that may change when a run is resumed; anything else would silently train another run.
RESUMABLE_CHANGES = {"name", "out", "export_hf", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.log_every"}


def cache_dir() -> Path:
    return Path(os.environ.get("DSGROW_CACHE_DIR", Path.home() / ".cache" / "dsgrow"))


@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor
    val: torch.Tensor
    info: dict = field(default_factory=dict)


def prepare_data(recipe: Recipe, rank: int) -> Data:
    """Rank 0 trains the tokenizer and packs the blocks into the cache; the other ranks then read
    the cache. An error on rank 0 is sent to every rank so that all stop with the same line."""
    from .data import build_blocks, load_documents, train_or_load_tokenizer
    from .engine.runtime import barrier, broadcast_object

    d, t = recipe.data, recipe.train

    def build() -> Data:
        docs = load_documents(d.source, d.paths)
        tok = train_or_load_tokenizer(docs, d.vocab_size, cache_dir() / "tokenizers", model_type=d.tokenizer_type,
                                      seed=t.seed)
        train, val, info = build_blocks(docs, tok, t.seq_len, d.val_fraction, t.seed, cache_dir() / "blocks")
        return Data(tok, train, val, info)

    err, data = None, None
    if rank == 0:
        try:
            data = build()
        except (ValueError, FileNotFoundError) as e:
            err = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
    err = broadcast_object(err)
    if err:
        raise ConfigError(err)
    barrier()
    if data is None:
        data = build()  # a cache hit on every rank but 0
    need = t.eval_samples
    if len(data.val) < need:
        raise ConfigError(f"train.eval_samples ({need}) exceeds the validation split's {len(data.val)} blocks "
                          f"of {t.seq_len} tokens (lower it, or raise data.val_fraction)")
    return data


class MetricsLog:
    """Tensorboard scalars and a JSONL line per record, rank 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
            self.jsonl = open(out / "metrics.jsonl", "a")

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_recipe(saved: dict, current: dict) -> None:
    a, b = _flat(saved), _flat(current)
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or key.startswith("model.vocab_size"):
            continue
        if a.get(key) != b.get(key):
            raise ConfigError(f"--resume: recipe field {key} is {b.get(key)!r} but the checkpoint was trained with "
                              f"{a.get(key)!r}")


def check_init_from(path: str, spec: ModelSpec) -> None:
    """train.init_from must hold exactly the recipe's model (vocabulary included)."""
    import transformers as tf

    theirs = ModelSpec.from_hf_config(tf.AutoConfig.from_pretrained(path, local_files_only=True))
    ours = ModelSpec.from_hf_config(spec.to_hf_config())  # defaults (ffn, eps, tying) made explicit
    if theirs != ours:
        diff = {k: (v, ours.to_dict()[k]) for k, v in theirs.to_dict().items() if ours.to_dict().get(k) != v}
        raise ConfigError(f"train.init_from: {path} holds another model than the recipe's "
                          f"(field: theirs, recipe's) {diff}")


class Trainer:
    def __init__(self, recipe: Recipe, ds_config_path: str, resume: bool = False):
        from .engine import checkpoint as ckpt
        from .engine.ds_config import fill_ds_config, read_ds_config, resolve_precision, zero_stage
        from .engine.runtime import ModelHandle, build_engine, has_gpu, init_distributed

        self.recipe = recipe
        t = recipe.train
        ds_raw = read_ds_config(ds_config_path)
        zero_stage(ds_raw)
        self.rank, self.world, _ = init_distributed()
        self.precision = resolve_precision(t.precision, has_gpu())
        self.ds_cfg = fill_ds_config(ds_raw, t, self.world, self.precision)
        self.zero_stage = zero_stage(self.ds_cfg)
        self.out = Path(recipe.out)
        self.ckroot = self.out / "checkpoints"
        tag = ckpt.resolve_resume(self.ckroot, resume)
        self.resume_state = None
        if tag is not None:
            self.resume_state = ckpt.verify(self.ckroot, tag, self.world)
            check_resume_recipe(self.resume_state["recipe"], recipe.to_dict())
            self.resume_tag = tag

        self.data = prepare_data(recipe, self.rank)
        self.spec: ModelSpec = recipe.model.with_vocab(self.data.tokenizer.vocab_size)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if t.init_from is not None:
            check_init_from(t.init_from, self.spec)
        self.handle = ModelHandle(self.spec, self.ds_cfg, t.seed, t.init_from)
        self.engine = build_engine(self.handle.model, self.ds_cfg, t.lr, t.betas, t.eps, t.weight_decay)
        self.device = self.engine.device

        from .data import SampleStream

        self.stream = SampleStream(len(self.data.train), t.seed)
        self.tokens = 0
        self.step = 0
        self.wall_before = 0.0  # wall time of earlier (pre-resume) segments
        self.last_val: Optional[float] = None
        self.schedule = t.batch_plan()
        self.adaptive = t.adaptive_plan() if t.adaptive_batch is not None else None
        self.batch = self.adaptive.min_batch if self.adaptive else self.schedule.batch_at(0)
        self.noise = NoiseScaleEstimator(t.noise_scale_beta) if t.noise_scale else None
        self.grad_probe = MicroBatchGradNorm(self.engine.module) if t.noise_scale else None
        self.last_noise: dict = {}
        if self.resume_state is not None:
            ckpt.load(self.engine, self.ckroot, self.resume_tag)
            st = self.resume_state
            self.stream.load_state_dict(st["stream"])
            self.tokens, self.step, self.wall_before = st["tokens"], st["step"], st["wall_time"]
            self.last_val = st.get("val_loss")
            self.batch = st.get("batch", self.batch)
            if self.noise is not None and st.get("noise_scale"):
                self.noise.load_state_dict(st["noise_scale"])
        self.flops_per_token = flops_per_token(self.spec, t.seq_len)

    # -- schedules: pure functions of tokens seen (plus the adaptive batch, which is state) ------
    def batch_for_next_step(self) -> int:
        return self.batch if self.adaptive else self.schedule.batch_at(self.tokens)

    def lr_for_step(self, batch: int) -> float:
        """LR of the step that starts at self.tokens, evaluated at its end (no zero-LR first step)."""
        from .schedules.batch import lr_factor_at, scale_lr

        t = self.recipe.train
        end = self.tokens + batch * t.seq_len
        if t.lr_schedule == "cosine":
            base = warmup_cosine(end, t.tokens, t.lr, t.warmup_tokens, t.min_lr_ratio)
        else:
            base = t.lr * min(1.0, end / t.warmup_tokens) if t.warmup_tokens else t.lr
        if self.adaptive:
            return base * scale_lr(1.0, t.global_batch, batch, t.lr_scaling)
        return base * lr_factor_at(self.schedule, self.tokens, t.global_batch, t.lr_scaling)

    # -- one optimizer step ----------------------------------------------------------------------
    def _batch(self, idx: torch.Tensor, position: int):
        from .data import mlm_mask

        x = self.data.train[idx]
        if self.spec.family == "bert":
            inputs, labels = mlm_mask(x, self.data.tokenizer, self.recipe.data.mlm_probability,
                                      seed=self.recipe.train.seed, position=position)
            return {"input_ids": inputs.to(self.device), "labels": labels.to(self.device)}
        x = x.to(self.device)
        return {"input_ids": x, "labels": x}

    def train_step(self, batch: int, measure_noise: bool = False) -> torch.Tensor:
        """One optimizer step over exactly `batch` samples (all ranks, all micro-batches).

        The accumulation boundary is set explicitly on every micro-step: DeepSpeed otherwise
        derives it from a global micro-step counter, and a batch change whose new accumulation
        count does not divide that counter would make a short first step with the wrong loss
        scale (deepspeed-facts.md). `set_train_batch_size` updates the count that backward
        divides the loss by.
        """
        from .data import shard
        from .engine.runtime import set_train_batch_size

        t = self.recipe.train
        set_train_batch_size(self.engine, batch)
        position = self.stream.position
        mine = shard(self.stream.next_indices(batch), self.rank, self.world)
        gas = len(mine) // t.micro_batch
        total = torch.zeros((), device=self.device)
        small_sq = 0.0
        if measure_noise:
            self.grad_probe.start()
        for k in range(gas):
            # The global sample position of this micro-batch's first sample seeds its MLM mask.
            first = position + self.rank * len(mine) + k * t.micro_batch
            micro = self._batch(mine[k * t.micro_batch:(k + 1) * t.micro_batch], first)
            self.engine.set_gradient_accumulation_boundary(k == gas - 1)
            loss = self.engine(**micro).loss
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            if measure_noise:
                small_sq += self.grad_probe.take()
            self.engine.step()          # applies the optimizer on the boundary only
            total += loss.detach().float()
        if measure_noise:
            self.grad_probe.stop()
            self._update_noise(small_sq / gas, gas, batch)
        return total / gas

    def _update_noise(self, small_sq_scaled: float, gas: int, batch: int) -> None:
        from .engine.grad_stats import global_grad_norm, loss_scale
        from .engine.runtime import all_mean

        t = self.recipe.train
        # The hook saw gradients of loss * scale / gas; undo both to get the micro-batch gradient.
        small_sq = all_mean(small_sq_scaled) * (gas / loss_scale(self.engine)) ** 2
        big = global_grad_norm(self.engine)
        if big is None or batch <= t.micro_batch:
            return  # one micro-batch per step on one rank: the two batch sizes coincide
        b_simple = self.noise.update(small_sq, big ** 2, t.micro_batch, batch)
        self.last_noise = {"grad_sq_small": small_sq, "grad_sq_big": big ** 2,
                           "noise_scale_b_simple": b_simple if b_simple is not None else float("nan")}

    @torch.no_grad()
    def evaluate(self) -> float:
        from .data import mlm_mask, shard

        t = self.recipe.train
        self.engine.eval()
        idx = shard(torch.arange(t.eval_samples), self.rank, self.world)
        losses = []
        for k in range(0, len(idx), t.micro_batch):
            x = self.data.val[idx[k:k + t.micro_batch]]
            if self.spec.family == "bert":
                # A fixed mask per sample keeps evaluations comparable across time and runs.
                inputs, labels = mlm_mask(x, self.data.tokenizer, self.recipe.data.mlm_probability,
                                          seed=t.seed + 1, position=int(idx[k]))
                out = self.engine(input_ids=inputs.to(self.device), labels=labels.to(self.device))
            else:
                x = x.to(self.device)
                out = self.engine(input_ids=x, labels=x)
            losses.append(float(out.loss.float()) * len(x))  # weighted: the last chunk may be short
        self.engine.train()
        from .engine.runtime import all_mean

        return all_mean(sum(losses) / len(idx))

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        from .engine.runtime import all_mean, local_param_fraction, set_lr

        t = self.recipe.train
        log = MetricsLog(self.out, self.rank == 0)
        bar = None
        if self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=t.tokens, initial=self.tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                       disable=None)
        say = bar.write if bar is not None else print
        if self.rank == 0:
            say(f"dsgrow {__version__}: {self.spec.family} {self.spec.layers}x{self.spec.hidden} "
                f"({self.spec.n_params(True) / 1e6:.2f}M params), vocab {self.spec.vocab_size}, ZeRO-{self.zero_stage}, "
                f"{self.world} rank(s), {self.precision}, {t.tokens:,} tokens, batch {self.schedule!r}"
                + (f", resumed at step {self.step}" if self.step else ""))
        if self.step == 0:
            self.last_val = self.evaluate()
            if self.rank == 0:
                log.log({"step": 0, "tokens": 0, "val_loss": self.last_val}, 0)
        start = time.perf_counter()
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_t0, window_tok0 = 0, time.perf_counter(), self.tokens
        train_loss = float("nan")
        tokens_at_start = self.tokens
        while True:
            batch = self.batch_for_next_step()
            step_tokens = batch * t.seq_len
            if self.tokens + step_tokens > t.tokens:
                break  # the budget is never overrun: the run ends at the last step that fits
            lr = self.lr_for_step(batch)
            set_lr(self.engine, lr)
            measure = self.noise is not None and (self.step + 1) % t.noise_scale_every == 0
            loss = self.train_step(batch, measure_noise=measure)
            prev = self.tokens
            self.tokens += step_tokens
            self.step += 1
            window_loss += loss  # stays on the device: no host sync until the next log line
            window_steps += 1
            if bar is not None:
                bar.update(step_tokens)
            if self.adaptive and self.step % int(t.adaptive_batch.get("every", 10)) == 0:
                self.batch = self.adaptive.propose(self.noise.b_simple, self.batch)
            last = self.tokens + self.batch_for_next_step() * t.seq_len > t.tokens
            if self.step % t.log_every == 0 or last:
                # Only the logged step's loss is synchronised: a per-step all-reduce costs speed.
                train_loss = all_mean(float(window_loss) / window_steps)
                now = time.perf_counter()
                rec = {"step": self.step, "tokens": self.tokens, "loss": train_loss, "lr": lr,
                       "flops": self.tokens * self.flops_per_token, "batch_size": batch,
                       "tokens_per_s": (self.tokens - window_tok0) / max(now - window_t0, 1e-9),
                       **self.last_noise}
                log.log(rec, self.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", bs=batch)
                window_loss = torch.zeros((), device=self.device)
                window_steps, window_t0, window_tok0 = 0, now, self.tokens
            if (t.eval_every and self.tokens // t.eval_every > prev // t.eval_every) or last:
                self.last_val = self.evaluate()
                log.log({"step": self.step, "tokens": self.tokens, "val_loss": self.last_val}, self.step)
                if self.rank == 0:
                    say(f"step {self.step}  tokens {self.tokens:,}/{t.tokens:,}  train loss {train_loss:.4f}  "
                        f"val loss {self.last_val:.4f}")
            if (t.checkpoint_every and self.tokens // t.checkpoint_every > prev // t.checkpoint_every) or last:
                self.save(time.perf_counter() - start)
            if last:
                break
        if bar is not None:
            bar.close()
        wall = self.wall_before + (time.perf_counter() - start)
        summary = {
            "name": self.recipe.name, "family": self.spec.family, "params": self.spec.n_params(True),
            "train_loss": train_loss, "val_loss": self.last_val, "tokens": self.tokens,
            "tokens_budget": t.tokens, "flops": self.tokens * self.flops_per_token, "steps": self.step,
            "tokens_per_s": (self.tokens - tokens_at_start) / max(time.perf_counter() - start, 1e-9),
            "wall_time_s": wall, "world_size": self.world, "zero_stage": self.zero_stage,
            "precision": self.precision, "local_param_fraction": local_param_fraction(self.engine.module),
        }
        if self.recipe.budget is not None:
            b = self.recipe.budget
            summary["budget"] = dict(b)
            summary["budget_used"] = (summary["flops"] / float(b["flops"]) if b.get("flops") is not None
                                      else self.tokens / t.tokens)
        if self.noise is not None and self.noise.b_simple is not None:
            summary["noise_scale_b_simple"] = self.noise.b_simple
        if self.recipe.export_hf:
            summary["exported_to"] = str(self.export())
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            say(format_summary(summary))
        log.close()
        return summary

    def save(self, elapsed: float) -> None:
        from .engine import checkpoint as ckpt

        state = {"tokens": self.tokens, "step": self.step, "stream": self.stream.state_dict(), "batch": self.batch,
                 "noise_scale": self.noise.state_dict() if self.noise is not None else None,
                 "wall_time": self.wall_before + elapsed, "val_loss": self.last_val,
                 "world_size": self.world, "zero_stage": self.zero_stage, "recipe": self.recipe.to_dict(),
                 "spec": self.spec.to_dict(), "dsgrow_version": __version__}
        ckpt.save(self.engine, self.ckroot, f"step{self.step}", state, self.recipe.train.keep_checkpoints)

    def export(self) -> Path:
        """Final fp32 weights as a Hugging Face folder (safetensors + tokenizer), written atomically."""
        from .engine.runtime import barrier, gather_fp32_state_dict, hf_model_class

        sd = gather_fp32_state_dict(self.engine)
        dest = self.out / "final_model"
        if self.rank == 0:
            import shutil

            model = hf_model_class(self.spec).from_config(self.spec.to_hf_config())
            missing, unexpected = model.load_state_dict(sd, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            if unexpected or any(k not in tied and not k.endswith("lm_head.weight") and "decoder.weight" not in k
                                 for k in missing):
                raise RuntimeError(f"export: state dict mismatch, missing {missing}, unexpected {unexpected}")
            tmp = self.out / f".final_model.tmp{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(str(tmp))  # transformers 5 always writes safetensors
            self.data.tokenizer.save_hf(str(tmp))
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        barrier()
        return dest

    def close(self) -> None:
        from .engine.runtime import destroy_engine

        destroy_engine(self.engine)
        self.engine = None


def format_summary(s: dict) -> str:
    lines = ["", "== dsgrow run summary ==",
             f"model         {s['family']}, {s['params'] / 1e6:.2f}M params, ZeRO-{s['zero_stage']}, "
             f"{s['world_size']} rank(s), {s['precision']}",
             f"train loss    {s['train_loss']:.4f}",
             f"val loss      {s['val_loss']:.4f}  (ppl {math.exp(min(s['val_loss'], 50)):.1f})",
             f"tokens        {s['tokens']:,} in {s['steps']} steps"
             + (f"  ({100 * s['budget_used']:.1f}% of the budget)" if "budget_used" in s else ""),
             f"FLOPs         {s['flops']:.3e}",
             f"tokens/s      {s['tokens_per_s']:,.0f}",
             f"wall time     {s['wall_time_s']:.1f} s"]
    if "exported_to" in s:
        lines.append(f"HF model      {s['exported_to']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`launchers/pretrain.py` and `dsgrow train` both land here."""
    import argparse

    p = argparse.ArgumentParser(prog="pretrain", description="dsgrow pretraining on DeepSpeed")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default=str(default_ds_config()),
                   help="DeepSpeed engine config (ds_configs/*.json); 'auto' fields come from the recipe")
    p.add_argument("--recipe", default=None, help="YAML recipe (default: the embedded tiny CPU demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (overrides the recipe's 'out')")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe_path = args.recipe
    if args.resume and recipe_path is None and args.out and (Path(args.out) / "recipe.yaml").is_file():
        recipe_path = str(Path(args.out) / "recipe.yaml")  # resume what that folder trained
    try:
        recipe = load_recipe(recipe_path, args.overrides, args.out)
        trainer = Trainer(recipe, args.ds_config, resume=args.resume)
        trainer.run()
        trainer.close()
    except ValueError as e:  # ConfigError, SpecError, DataError, CheckpointError: one line, no traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"dsgrow: error: {e}", file=sys.stderr)
        return 2
    return 0


def default_ds_config() -> Path:
    """ds_configs/zero2.json of a source checkout; the packaged copy otherwise."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "ds_configs" / "zero2.json", here / "ds_configs" / "zero2.json"):
        if cand.is_file():
            return cand
    return here.parent / "ds_configs" / "zero2.json"
