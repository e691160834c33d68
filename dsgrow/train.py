"""The training loop: recipe -> data -> DeepSpeed engine -> steps, evaluation, checkpoints, export.

A thin loop over components: the run's setup and data (run/setup.py), the family's objective
(run/objective.py), each stage's batch and LR schedule (run/schedule.py), metrics
(run/metrics.py), checkpoints (engine/checkpoint.py) and growth through the public
`dsgrow.grow_engine` (engine/grow.py), the same call a user's own loop makes.

Everything the loop decides is a function of tokens seen (LR, when to evaluate, when to
checkpoint), and the only state a resumed run needs is that counter, the data position, the
engine's checkpoint and the RNG states.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from . import __version__
from .config import ConfigError
from .engine.checkpoint import fault_point
from .engine.grad_stats import MicroBatchGradNorm
from .families.spec import ModelSpec
from .recipe import Recipe
from .run.metrics import MetricsLog, format_summary, json_safe
from .run.objective import Objective
from .run.schedule import StageSchedule
from .run.setup import check_init_from, check_resume_data, check_resume_recipe, data_fingerprint, prepare_data
from .schedules.flops import flops_per_token, forward_flops_per_token



class Trainer:
    def __init__(self, recipe: Recipe, ds_config_path: Optional[str] = None, resume: bool = False):
        from .engine import checkpoint as ckpt
        from .engine.runtime import build_engine, build_model, has_gpu, init_distributed
        from .launch import preflight
        from .run.guard import check_out_path

        self.recipe = recipe
        t = recipe.train
        self.out = Path(recipe.out)
        check_out_path(self.out)
        self.rank, self.world, _ = init_distributed(timeout_s=t.collective_timeout_s)
        pre = preflight(recipe, ds_config_path, self.world, has_gpu())  # the multi-node check's own checks
        self.precision, self.ds_raw, self.stages = pre.precision, pre.ds_raw, pre.stages
        self.lock = self._claim_out()
        self.heartbeat = None
        self.ckroot = self.out / "checkpoints"
        tag = ckpt.resolve_resume(self.ckroot, resume)
        self.resume_state = None
        if tag is not None:
            self.resume_state = ckpt.verify(self.ckroot, tag)
            check_resume_recipe(self.resume_state["recipe"], recipe.to_dict())
            self.resume_tag = tag

        self.data = prepare_data(recipe, self.rank)
        from .engine.runtime import broadcast_object

        # One rank hashes the blocks (every rank holds the same ones); the others get its answer.
        self.data_fingerprint = broadcast_object(data_fingerprint(self.data) if self.rank == 0 else None)
        rs = self.resume_state or {}
        if self.resume_state is not None:
            check_resume_data(rs, tag, self.data_fingerprint)
        self._enter_stage(self.stages[rs.get("stage", 0)])
        load_dir = None
        if self.resume_state is not None and ckpt.resume_route(rs, self.ckroot, tag, self.world,
                                                               self.zero_stage) == "universal":
            # Another world size or ZeRO stage: DeepSpeed's universal checkpoint re-shards weights
            # and Adam moments (deepspeed-facts.md); rank 0 converts once, every rank loads.
            load_dir = ckpt.make_universal(self.ckroot, tag)
            self.ds_cfg = {**self.ds_cfg, "checkpoint": {**self.ds_cfg.get("checkpoint", {}), "load_universal": True}}
        if self.rank == 0:
            import yaml

            from .fileio import atomic_write_text

            atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if t.init_from is not None and self.resume_state is None:
            check_init_from(t.init_from, self.spec)
        from .run.guard import Heartbeat

        # Started once the data is ready: building a tokenizer can hold the GIL for long stretches.
        self.heartbeat = Heartbeat(self.out, self.rank, self.world, t.stall_timeout_s).start()
        model = build_model(self.spec, self.ds_cfg, t.seed,
                            t.init_from if self.resume_state is None and self.stage.index == 0 else None)
        self.engine = build_engine(model, self.ds_cfg, self.t.lr, self.t.betas, self.t.eps,
                                   self.t.weight_decay)
        self.device = self.engine.device
        self.objective = Objective(self.spec, self.data.tokenizer, recipe.data.mlm_probability, t.seed, self.device)

        # A run resumed inside a pruned stage draws from that stage's kept list, read back.
        kept = self._load_kept(self.stage) if self.resume_state is not None and self.stage.prune is not None else None
        self.stream = self._stream_for(self.stage, kept)
        self.tokens = 0
        self.flops = 0.0
        self.step = 0
        self.stage_t0 = 0  # global tokens at which this stage's training (after any fit) began
        self.wall_before = 0.0  # wall time of earlier (pre-resume) segments
        self.last_val: Optional[float] = None
        self.last_train_loss: Optional[float] = None
        self.tokens_per_s: Optional[float] = None  # the last logged throughput (kept across a resume)
        self.growth_events: list[dict] = []
        self.growth_done = False  # a growth ran in this process
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)  # steps with a NaN/inf loss
        self.metrics_bytes = 0
        self._reset_stage_state()
        if self.resume_state is not None:
            ckpt.load(self.engine, self.ckroot, self.resume_tag, load_dir)
            st = self.resume_state
            self.stream.load_state_dict(st["stream"])
            self.tokens, self.step, self.wall_before = st["tokens"], st["step"], st["wall_time"]
            self.flops = st.get("flops", self.tokens * self.flops_per_token)
            self.stage_t0 = st.get("stage_t0", 0)
            self.growth_events = st.get("growth_events", [])
            self.last_val = st.get("val_loss")
            self.last_train_loss = st.get("train_loss")
            self.tokens_per_s = st.get("tokens_per_s")
            self.metrics_bytes = st.get("metrics_bytes")
            self.sched.load_state_dict(st)

    def _stream_for(self, stage, kept: Optional[torch.Tensor] = None):
        """The sample stream a stage draws from. Until a stage prunes, one stream runs through the
        whole run (its order continues across growths); a pruned stage draws from its kept set, and
        each stage after the first pruned one starts its own order (seed + stage index)."""
        from .data import SampleStream, SubsetStream

        if not any(s.prune is not None for s in self.stages[:stage.index + 1]):
            return SampleStream(len(self.data.train), self.recipe.train.seed)
        seed = self.recipe.train.seed + stage.index
        if stage.prune is not None:
            return SubsetStream(kept, seed)
        return SampleStream(len(self.data.train), seed)

    def _prune_file(self, stage) -> Path:
        return self.out / "stages" / f"stage{stage.index}-prune.safetensors"

    def _load_kept(self, stage) -> torch.Tensor:
        """A pruned stage's kept list, read back on resume (rank 0 reads, every rank gets it)."""
        from .data.corpus import DataError
        from .data.prune import load_result
        from .engine.runtime import broadcast_object

        err, kept = None, None
        if self.rank == 0:
            path = self._prune_file(stage)
            if not path.is_file():
                err = (f"--resume: stage {stage.index} trains on a pruned data set whose kept list {path} is missing "
                       "(restore it, or resume from the checkpoint before that stage)")
            else:
                try:
                    _, kept, _ = load_result(path)
                except DataError as e:
                    err = f"--resume: {e}"
        err, kept = broadcast_object((err, kept))
        if err:
            raise ConfigError(err)
        return kept

    def _prune(self) -> dict:
        """At a stage boundary: the current (previous stage's) model scores every training sample,
        data-parallel, and the next stage, its growth fit included, draws only the kept share. The
        scoring forwards are counted in the run's FLOPs."""
        from .data.prune import lm_forward, prune, save_result
        from .engine.runtime import all_gather_object, barrier, broadcast_object

        nxt = self.stages[self.stage.index + 1]
        cfg = nxt.prune
        start = time.perf_counter()
        self.engine.eval()
        with torch.no_grad():
            res = prune(lm_forward(self.engine, cfg.score, self.device), self.data.train, cfg, self.rank, self.world,
                        all_gather_object)
        self.engine.train()
        ran = sum(all_gather_object(res["ran"]))
        flops = ran * self.t.seq_len * forward_flops_per_token(self.spec, self.t.seq_len)
        self.flops += flops
        # k-means (prototype) runs on every rank; rank 0's selection is the run's.
        scores, kept = broadcast_object((res["scores"], res["kept"]) if self.rank == 0 else None)
        ev = {**cfg.to_dict(), "samples": len(scores), "kept_samples": len(kept), "flops": flops,
              "scored_by": f"{self.spec.layers}x{self.spec.hidden}", "prune_s": time.perf_counter() - start,
              "kept_score_mean": float(scores[kept].mean()), "score_mean": float(scores.mean())}
        if self.rank == 0:
            (self.out / "stages").mkdir(parents=True, exist_ok=True)
            save_result(self._prune_file(nxt), scores, kept, {**ev, "stage": nxt.index, "step": self.step})
        barrier()
        self.stream = self._stream_for(nxt, kept)
        return ev

    def _claim_out(self):
        """Rank 0 locks `--out` (one run at a time) and collects a killed run's leftovers; every
        rank gets the same one-line error if the folder is taken."""
        from .engine.runtime import barrier, broadcast_object
        from .run.guard import OutLock, collect_leftovers

        lock, err = None, None
        if self.rank == 0:
            try:
                lock = OutLock(self.out)
                collect_leftovers(self.out)
            except (ValueError, OSError) as e:
                err = str(e)
        err = broadcast_object(err)
        if err:
            raise ConfigError(err)
        barrier()
        return lock

    def _enter_stage(self, stage) -> None:
        """Make `stage` current: its model spec, train config and filled ds_config."""
        from .engine.ds_config import fill_ds_config, zero_stage

        self.stage = stage
        self.t = stage.train
        self.spec: ModelSpec = stage.model.with_vocab(self.data.tokenizer.vocab_size)
        self.ds_cfg = fill_ds_config(self.ds_raw, self.t, self.world, self.precision)
        self.zero_stage = zero_stage(self.ds_cfg)
        self.flops_per_token = flops_per_token(self.spec, self.t.seq_len)

    def _reset_stage_state(self) -> None:
        """The schedule and meters that belong to one stage's engine."""
        self.sched = StageSchedule(self.t, run_total=self.stages[-1].end, run_warmup=self.stages[0].train.warmup_tokens,
                                   grown=self.stage.index > 0)
        self.grad_probe = MicroBatchGradNorm(self.engine.module) if self.t.noise_scale else None
        # EST: each step of this stage trains a sampled subnetwork (the stage's own model, so a
        # grown stage's subnetworks are the grown model's).
        self.subnet = None
        if self.t.est() is not None:
            from .subnet import Subnetwork

            self.subnet = Subnetwork(self.engine, self.t.est(), seed=self.t.seed + self.stage.index,
                                     spec=self.spec)
        self.last_noise: dict = {}

    @property
    def stage_tokens(self) -> int:
        """Tokens trained in the current stage (the schedules' clock)."""
        return self.tokens - self.stage_t0

    def _batch(self, idx: torch.Tensor, position: int) -> dict:
        return self.objective.train_inputs(self.data.train[idx], position)

    # -- one optimizer step ----------------------------------------------------------------------
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

        t = self.t
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

        t = self.t
        # The hook saw gradients of loss * scale / gas; undo both to get the micro-batch gradient.
        small_sq = all_mean(small_sq_scaled) * (gas / loss_scale(self.engine)) ** 2
        big = global_grad_norm(self.engine)
        if big is None or batch <= t.micro_batch:
            return  # one micro-batch per step on one rank: the two batch sizes coincide
        b_simple = self.sched.noise.update(small_sq, big ** 2, t.micro_batch, batch)
        self.last_noise = {"grad_sq_small": small_sq, "grad_sq_big": big ** 2,
                           "noise_scale_b_simple": b_simple if b_simple is not None else float("nan")}

    @torch.no_grad()
    def evaluate(self) -> float:
        from .data import shard

        t = self.t
        self.engine.eval()
        idx = shard(torch.arange(t.eval_samples), self.rank, self.world)
        losses = []
        for k in range(0, len(idx), t.micro_batch):
            x = self.data.val[idx[k:k + t.micro_batch]]
            out = self.engine(**self.objective.eval_inputs(x, int(idx[k])))
            losses.append(float(out.loss.float()) * len(x))  # weighted: the last chunk may be short
        self.engine.train()
        from .engine.runtime import all_mean

        return all_mean(sum(losses) / len(idx))

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        from .engine.runtime import local_param_fraction

        # A resumed run drops the records the killed run logged after its checkpoint (they are
        # logged again), so metrics.jsonl and tensorboard hold each step once.
        # A fresh start (no checkpoint) owns the folder: a killed attempt's records go entirely.
        resumed = self.resume_state is not None
        log = MetricsLog(self.out, self.rank == 0, truncate_to=self.metrics_bytes if resumed else 0,
                         purge_step=self.step + 1 if resumed else 0)
        self.log = log
        bar = None
        total = self.recipe.train.tokens
        if self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.tokens, unit="tok", unit_scale=True, dynamic_ncols=True,
                       disable=None)
        self.say = bar.write if bar is not None else print
        self.bar = bar
        start = time.perf_counter()
        tokens_at_start = self.tokens
        self._segment = (start, tokens_at_start)  # this process's share of the run, for tokens/s
        while True:
            self._train_stage(log, start)
            if self.stage.index == len(self.stages) - 1:
                break
            self._grow(log, start)
        if bar is not None:
            bar.close()
        wall = self.wall_before + (time.perf_counter() - start)
        self._update_throughput()
        summary = {
            "name": self.recipe.name, "family": self.spec.family, "params": self.spec.n_params(True),
            # Resumed from the final checkpoint, this process trained nothing: the run's figures
            # come from the checkpoint, not from an empty segment.
            "train_loss": self.last_train_loss, "val_loss": self.last_val, "tokens": self.tokens,
            "tokens_budget": total, "flops": self.flops, "steps": self.step,
            "tokens_per_s": self.tokens_per_s,
            "wall_time_s": wall, "world_size": self.world, "zero_stage": self.zero_stage,
            "precision": self.precision, "local_param_fraction": local_param_fraction(self.engine.module),
            "stages": len(self.stages), "growth_events": self.growth_events,
        }
        if self.recipe.budget is not None:
            b = self.recipe.budget
            summary["budget"] = dict(b)
            summary["budget_used"] = (summary["flops"] / float(b["flops"]) if b.get("flops") is not None
                                      else self.tokens / total)
        if self.sched.noise is not None and self.sched.noise.b_simple is not None:
            summary["noise_scale_b_simple"] = self.sched.noise.b_simple
        if self.recipe.export_hf:
            summary["exported_to"] = str(self.export(self.out / "final_model"))
        if self.rank == 0:
            from .fileio import atomic_write_text

            atomic_write_text(self.out / "summary.json", json.dumps(json_safe(summary), indent=1, allow_nan=False))
            self.say(format_summary(summary))
        log.close()
        return summary

    def _train_stage(self, log: "MetricsLog", start: float) -> float:
        """Train the current stage to its last step that fits; returns the last logged train loss."""
        from .engine.runtime import all_mean, set_lr

        t, say, bar = self.t, self.say, self.bar
        if self.rank == 0:
            say(f"dsgrow {__version__}: stage {self.stage.index + 1}/{len(self.stages)}: {self.spec.family} "
                f"{self.spec.layers}x{self.spec.hidden} ({self.spec.n_params(True) / 1e6:.2f}M params), "
                f"vocab {self.spec.vocab_size}, ZeRO-{self.zero_stage}, {self.world} rank(s), {self.precision}, "
                f"{t.tokens:,} tokens, batch {self.sched!r}"
                + (f", resumed at step {self.step}" if self.resume_state is not None and not self.growth_done else ""))
        if self.step == 0:
            self.last_val = self.evaluate()
            log.log({"step": self.step, "tokens": self.tokens, "flops": self.flops, "val_loss": self.last_val}, self.step)
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_t0, window_tok0 = 0, time.perf_counter(), self.tokens
        train_loss = float("nan")
        while True:
            batch = self.sched.batch_for_next_step(self.stage_tokens)
            step_tokens = batch * t.seq_len
            if self.stage_tokens + step_tokens > t.tokens:
                break  # the budget is never overrun: the stage ends at the last step that fits
            lr = self.sched.lr_for_step(self.stage_tokens, batch, self.tokens)
            set_lr(self.engine, lr)
            measure = self.sched.noise is not None and (self.step + 1) % t.noise_scale_every == 0
            step_fpt = self.flops_per_token
            if self.subnet is not None:
                # The subnetwork is a pure function of (seed, step, tokens seen): the same on every
                # rank and after a resume. Outside the step (eval, checkpoints) the model is whole.
                fraction = self.stage_tokens / t.tokens
                self.subnet.begin(self.step, fraction)
                step_fpt = self.subnet.flops_per_token(fraction, t.seq_len)
            try:
                loss = self.train_step(batch, measure_noise=measure)
            finally:
                if self.subnet is not None:
                    self.subnet.end()
            prev = self.stage_tokens
            self.tokens += step_tokens
            self.flops += step_tokens * step_fpt  # what ran: the subnetwork's FLOPs under EST
            self.step += 1
            self.heartbeat.step = self.step
            fault_point("step", f"step{self.step}")  # crash/hang tests: a rank killed or stopped here
            window_loss += loss  # stays on the device: no host sync until the next log line
            self.nonfinite += ~torch.isfinite(loss)
            window_steps += 1
            if bar is not None:
                bar.update(step_tokens)
            self.sched.after_step(self.step)
            last = self.stage_tokens + self.sched.batch_for_next_step(self.stage_tokens) * t.seq_len > t.tokens
            if self.step % t.log_every == 0 or last:
                # Only the logged step's loss is synchronised: a per-step all-reduce costs speed.
                self._check_finite(lr)
                train_loss = all_mean(float(window_loss) / window_steps)
                self.last_train_loss = train_loss
                now = time.perf_counter()
                rec = {"step": self.step, "tokens": self.tokens, "loss": train_loss, "lr": lr,
                       "flops": self.flops, "batch_size": batch, "stage": self.stage.index,
                       **({"subnet_flops_frac": step_fpt / self.flops_per_token} if self.subnet else {}),
                       "tokens_per_s": (self.tokens - window_tok0) / max(now - window_t0, 1e-9),
                       **self.last_noise}
                log.log(rec, self.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", bs=batch)
                window_loss = torch.zeros((), device=self.device)
                window_steps, window_t0, window_tok0 = 0, now, self.tokens
            if (t.eval_every and self.stage_tokens // t.eval_every > prev // t.eval_every) or last:
                self._check_finite(lr)
                self.last_val = self.evaluate()
                log.log({"step": self.step, "tokens": self.tokens, "flops": self.flops, "val_loss": self.last_val}, self.step)
                if self.rank == 0:
                    say(f"step {self.step}  tokens {self.tokens:,}/{self.recipe.train.tokens:,}  "
                        f"train loss {self.last_train_loss or float('nan'):.4f}  val loss {self.last_val:.4f}")
            if (t.checkpoint_every and self.stage_tokens // t.checkpoint_every > prev // t.checkpoint_every) or last:
                self._check_finite(lr, weights=True)  # a checkpoint (and so an export) never holds a diverged model
                final_of_stage = last and self.stage.index < len(self.stages) - 1
                # A stage's final checkpoint is kept for good (tag stageN-end): growth starts from it.
                self.save(time.perf_counter() - start, tag=f"stage{self.stage.index}-end" if final_of_stage else None)
            if last:
                break
        return train_loss

    def _grow(self, log: "MetricsLog", start: float) -> None:
        """Grow the current model into the next stage's through the public `grow_engine` (the same
        path a user's own loop takes), fitting on this run's own sample stream."""
        from .engine import checkpoint as ckpt
        from .engine.ds_config import fill_ds_config
        from .engine.grow import grow_engine
        from .engine.optim_state import gather_moments
        from .engine.runtime import build_engine
        from .stages import fit_batch

        nxt = self.stages[self.stage.index + 1]
        g = nxt.grow
        small_spec, large_spec = self.spec, nxt.model.with_vocab(self.data.tokenizer.vocab_size)
        ev: dict = {"event": "growth", "stage": nxt.index, "method": g.method, "step": self.step,
                    "tokens": self.tokens, "loss_before": self.last_val}
        if nxt.prune is not None:
            ev["prune"] = self._prune()
        elif any(s.prune is not None for s in self.stages[:nxt.index]):
            self.stream = self._stream_for(nxt)  # back to every sample, in the stage's own order
        if g.export_grown:  # the small model, for checking the growth against a one-process build
            self.export(self.out / "stages" / f"stage{self.stage.index}-final")
        per_step = fit_batch(nxt)

        def fit_data(step: int) -> dict:  # data-parallel: each rank its share of the run's stream
            from .data import shard

            position = self.stream.position
            mine = shard(self.stream.next_indices(per_step), self.rank, self.world)
            return self._batch(mine, position + self.rank * len(mine))

        def on_event(name: str, value) -> None:
            if name == "fitted":
                ckpt.fault_point("growth_fitted", f"stage{nxt.index}")  # crash tests: killed mid-growth
            elif g.export_grown and self.rank == 0 and name == "moments":
                self._export_moments(value, f"stage{self.stage.index}-final")
            elif g.export_grown and self.rank == 0 and name == "operator":
                from safetensors.torch import save_file

                (self.out / "stages").mkdir(exist_ok=True)
                save_file({k: v.detach().cpu().contiguous() for k, v in value.state_dict().items()},
                          str(self.out / "stages" / f"stage{nxt.index}-{g.method}.safetensors"))

        new_ds_cfg = fill_ds_config(self.ds_raw, nxt.train, self.world, self.precision)
        t = nxt.train
        self.engine, report = grow_engine(
            self.engine, large_spec, g.method, fit_steps=g.fit_steps, fit_data=fit_data, optimizer=g.optimizer,
            build_engine=lambda model: build_engine(model, new_ds_cfg, t.lr, t.betas, t.eps, t.weight_decay),
            ds_config=new_ds_cfg, seed=t.seed, on_event=on_event, **g.options)
        self.tokens += report.fit_tokens
        self.flops += report.fit_flops
        if self.bar is not None:
            self.bar.update(report.fit_tokens)
        self._enter_stage(nxt)
        if g.export_grown and g.optimizer == "transfer":
            grown_moments = gather_moments(self.engine)
            if self.rank == 0:
                self._export_moments(grown_moments, f"stage{nxt.index}-grown")
            del grown_moments
        self.stage_t0 = self.tokens
        self.growth_done = True
        self._reset_stage_state()
        ev.update(report.to_event())
        if g.export_grown:
            self.export(self.out / "stages" / f"stage{nxt.index}-grown")
        self.last_val = self.evaluate()
        ev["loss_after"] = self.last_val
        self.growth_events.append(ev)
        log.log(ev, self.step)
        if self.rank == 0:
            self.say(f"grew {small_spec.layers}x{small_spec.hidden} -> {large_spec.layers}x{large_spec.hidden} "
                     f"({g.method}): val loss {ev['loss_before']:.4f} -> {ev['loss_after']:.4f}, "
                     f"{ev['growth_s']:.1f} s")
            if "prune" in ev:
                pr = ev["prune"]
                self.say(f"pruned the data by {pr['score']} ({pr['keep']}): {pr['kept_samples']:,} of "
                         f"{pr['samples']:,} samples kept, scored in {pr['prune_s']:.1f} s ({pr['flops']:.3g} FLOPs)")

    def _export_moments(self, moments: dict, name: str) -> None:
        """stages/<name>-adam.safetensors: exp_avg.<param>, exp_avg_sq.<param> (HF names) and the
        Adam step in the metadata; written with export_grown, for checking a transfer."""
        from safetensors.torch import save_file

        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        flat = {f"{k}.{n}": t.contiguous() for k in ("exp_avg", "exp_avg_sq") for n, t in moments[k].items()}
        save_file(flat, str(self.out / "stages" / f"{name}-adam.safetensors"), metadata={"step": str(moments["step"])})

    def _update_throughput(self) -> None:
        """tokens/s of this process's training (kept from the checkpoint when it trained none)."""
        start, tokens0 = self._segment
        if self.tokens > tokens0:
            self.tokens_per_s = (self.tokens - tokens0) / max(time.perf_counter() - start, 1e-9)

    def _check_finite(self, lr: float, weights: bool = False) -> None:
        """Stop on a NaN/inf loss or LR before anything is evaluated, checkpointed or exported
        (and, with `weights`, on a non-finite weight: the step that diverges can still report a
        finite loss). The per-step flag stays on the device; this reads it only where the loop
        syncs anyway."""
        import math

        from .engine.runtime import all_mean, params_finite

        bad = int(self.nonfinite) + (0 if math.isfinite(lr) else 1)
        if weights and not params_finite(self.engine.module):
            bad += 1
        if all_mean(float(bad)) > 0:
            from .engine.checkpoint import latest_tag

            last = latest_tag(self.ckroot)
            raise NonFiniteError(
                f"the loss or learning rate became non-finite (NaN/inf) by step {self.step} (lr {lr:.3g}): "
                f"training diverged; stopped without checkpointing or exporting it "
                + (f"(the last good checkpoint is {last}; resume from it with a lower train.lr)" if last
                   else "(no checkpoint was written; lower train.lr)"))

    def save(self, elapsed: float, tag: Optional[str] = None) -> None:
        from .engine import checkpoint as ckpt

        self._update_throughput()
        state = {"train_loss": self.last_train_loss, "tokens_per_s": self.tokens_per_s,
                 "metrics_bytes": self.log.size() if self.rank == 0 else None,
                 "data_fingerprint": self.data_fingerprint, "tokens": self.tokens, "step": self.step, "stream": self.stream.state_dict(), **self.sched.state_dict(),
                 "wall_time": self.wall_before + elapsed, "val_loss": self.last_val,
                 "world_size": self.world, "zero_stage": self.zero_stage, "recipe": self.recipe.to_dict(),
                 "spec": self.spec.to_dict(), "dsgrow_version": __version__, "stage": self.stage.index,
                 "stage_t0": self.stage_t0, "flops": self.flops, "growth_events": self.growth_events}
        ckpt.save(self.engine, self.ckroot, tag or f"step{self.step}", state, self.recipe.train.keep_checkpoints)

    def export(self, dest: Path) -> Path:
        """The current fp32 weights as a Hugging Face folder (safetensors + tokenizer), written atomically."""
        from .engine.export import export_hf

        return export_hf(self.engine, dest, self.data.tokenizer)

    def close(self) -> None:
        from .engine.runtime import destroy_engine

        if self.heartbeat is not None:
            self.heartbeat.stop()
        destroy_engine(self.engine)
        self.engine = None
        if self.lock is not None:
            self.lock.release()


class NonFiniteError(ConfigError):
    """Training diverged (NaN/inf loss or LR): one line, exit 2, nothing exported."""

