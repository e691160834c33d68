"""`grow_engine`: grow a live DeepSpeed engine into a larger model, from any training loop.

    engine, report = dsgrow.grow_engine(engine, target={"layers": 8, "hidden": 256},
                                        method="ligo", fit_steps=100, fit_data=batches)

One path for everyone: dsgrow's own trainer calls this too. The phases, each timed with its
per-rank peak memory (GrowthReport.phases):

1. preflight: the model family, the target, the method and its options, the optimizer mode and
   how the engine was built (engine/rebuild.py) are all checked first; a bad request is one
   GrowthError line and the old engine is untouched and still trains;
2. gather: the small model's fp32 master weights (and Adam's moments for `transfer`) on every
   rank, one parameter at a time; then the old engine is freed;
3. fit: a learned operator (LiGO) trains data-parallel on `fit_data`, its gradients averaged
   over the ranks;
4. write: the large model is built (under zero.Init for ZeRO-3) and each rank writes its slice,
   one large layer at a time, BEFORE deepspeed.initialize, so the fp32 masters are the grown
   weights (deepspeed-facts.md);
5. engine: the new engine, built like the user's (rebuild.EngineRecipe) or by `build_engine`;
6. optimizer (`transfer`): the small moments mapped onto the large model, step count carried.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Optional

import torch

from ..families import ModelSpec, SpecError, hf_model_class, to_canonical
from ..growth.moments import check_transfer
from ..growth.api import resolve_any_target
from ..growth.ops import GrowthError
from ..growth.registry import FitRequest, check_request
from ..growth.report import GrowthReport, merge_phases
from ..memory import file_mib, phase, rss_mib, trim

OPTIMIZER_MODES = ("reset", "transfer")


def _is_pipeline(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def small_spec_of(module: torch.nn.Module) -> ModelSpec:
    """The ModelSpec of a user's HF model; GrowthError unless dsgrow can grow it."""
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "model_type"):
        raise GrowthError(f"engine.module is a {type(module).__name__}, not a Hugging Face transformers model "
                          "(GPT-2, LLaMA or BERT)")
    try:
        spec = ModelSpec.from_hf_config(cfg)
    except SpecError as e:
        raise GrowthError(f"engine.module: {e}") from None
    # The canonical layout reads the family's LM model (GPT2LMHeadModel, LlamaForCausalLM,
    # BertForMaskedLM); another head (classification, a bare base model) has other tensor names.
    with torch.device("meta"):
        ref = hf_model_class(spec).from_config(spec.to_hf_config())
    ours = {n for n, _ in module.named_parameters()}
    theirs = {n for n, _ in ref.named_parameters()}
    if ours != theirs:
        raise GrowthError(f"engine.module is a {type(module).__name__}; dsgrow grows {type(ref).__name__} "
                          f"(parameter names differ, e.g. {sorted(ours ^ theirs)[0]})")
    return spec


def large_hf_config(user_cfg, small: ModelSpec, large: ModelSpec):
    """The user's own HF config with the grown sizes: every field the user set (dropout, token
    ids, attention implementation, ...) is kept; the size fields are those a spec change moves."""
    a, b = small.to_hf_config().to_dict(), large.to_hf_config().to_dict()
    cfg = copy.deepcopy(user_cfg)
    for k, v in b.items():
        if a.get(k) != v:
            setattr(cfg, k, v)
    return cfg


def check_fit_data(small: ModelSpec, data, mlm_fn, mask_token_id, method: str) -> None:
    """What can be checked of the fit's data without consuming it: there is some, and a first batch
    of a list (or a tensor of blocks) is model input the fit can use (BERT: labels or a masker)."""
    from ..growth.fit import _with_labels, make_masker

    if data is None:
        raise GrowthError(f"{method}: fit_steps > 0 needs fit_data")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long:
            raise GrowthError(f"fit_data: expected a LongTensor [N, T] of token blocks, got {data.dtype} {list(data.shape)}")
        return
    if isinstance(data, (list, tuple)):
        if not data:
            raise GrowthError("fit_data: the list is empty")
        _with_labels(data[0], small, make_masker(small, mlm_fn, mask_token_id), 0, "fit_data")


def _loss(engine, batch: Optional[dict]) -> Optional[float]:
    """The engine's loss on `batch` in eval mode (rank mean); a collective under ZeRO-3."""
    if batch is None:
        return None
    from .runtime import all_mean

    was_training = engine.training
    engine.eval()
    with torch.no_grad():
        out = engine(**{k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    engine.train(was_training)
    return all_mean(float(out.loss.float()))


def grow_engine(engine, target, method: str = "ligo", *, fit_steps: int = 0, fit_data: Any = None,
                optimizer: str = "reset", build_engine: Optional[Callable] = None,
                ds_config: Optional[dict] = None, lr_scheduler: Optional[Callable] = None,
                eval_batch: Optional[dict] = None, seed: int = 0, mask_token_id: Optional[int] = None,
                mlm_fn: Optional[Callable] = None, on_event: Optional[Callable[[str, Any], None]] = None,
                **options) -> tuple[Any, GrowthReport]:
    """Grow `engine` (a DeepSpeed engine around an HF GPT-2, LLaMA or BERT model, any ZeRO stage,
    any number of ranks; every rank calls this) into `target`; returns (new engine, GrowthReport).

    target: sizes ({"layers": 8, "hidden": 256}; missing sizes follow ops.resolve_target), a
      ModelSpec, an HF config, or a local config directory.
    method: a registered growth method (dsgrow.growth.REGISTRY); `options` are its options.
    fit_steps, fit_data: a method that learns (LiGO) fits for `fit_steps` steps on `fit_data`, each
      rank on its own: an iterable of model-input dicts (cycled if it can be), a callable
      step -> dict, or a LongTensor [N, T] of token blocks. BERT batches without labels are masked
      with `mlm_fn` or `mask_token_id`.
    optimizer: "reset" (a fresh optimizer state) or "transfer" (Adam's moments mapped through a
      function-preserving operator, step count carried; refused in one line where impossible).
    build_engine: model -> engine, to build the new engine yourself; by default it is built like
      the old one (same ds_config, optimizer class and hyperparameters at their current values,
      param-group split, frozen parameters, LR scheduler position, step counters).
    ds_config: the config the large model is built for (ZeRO-3: zero.Init) and, by default, the
      new engine's; default: the old engine's.
    lr_scheduler: a callable optimizer -> scheduler for the new engine (needed when the old one
      was given a scheduler object).
    eval_batch: a model-input dict; the report then has the loss on it before and after.
    on_event(name, value): "moments" (the small Adam moments, HF names), "operator" (a fitted
      operator), "fitted" (after the fit, before the write) - for exports and crash tests.
    """
    from .grow_io import all_reduce_mean_, write_weights
    from .optim_state import check_supported
    from .rebuild import capture
    from .runtime import all_gather_object, build_model, destroy_engine, gather_fp32_state_dict, rank_world

    t0 = time.perf_counter()
    # 1. Preflight: nothing below touches the engine until every check has passed.
    if _is_pipeline(engine):
        raise GrowthError("grow_engine: pipeline-parallel engines are not supported (the layers of a "
                          "PipelineModule live on different stages); grow a data-parallel engine")
    small = small_spec_of(engine.module)
    large = resolve_any_target(small, target)
    entry = check_request(small, large, method, fit_steps, **options)
    if fit_steps:
        check_fit_data(small, fit_data, mlm_fn, mask_token_id, method)
    if optimizer not in OPTIMIZER_MODES:
        raise GrowthError(f"optimizer must be one of {', '.join(OPTIMIZER_MODES)}, got {optimizer!r}")
    transfer = optimizer == "transfer"
    if transfer:
        check_transfer(small, large, method, options)
        try:
            check_supported(engine)  # Adam's state, in a ZeRO wrapper whose layout is known
        except ValueError as e:
            raise GrowthError(f"optimizer: {e}; use optimizer='reset'") from None
        if build_engine is keep_model:
            raise GrowthError("optimizer: transfer writes Adam's state into the new engine; build_engine=keep_model "
                              "builds none: use optimizer='reset'")
    recipe = capture(engine, lr_scheduler) if build_engine is None else None
    if recipe is not None and ds_config is not None:
        recipe.ds_config = copy.deepcopy(ds_config)
    if recipe is not None and large.mup:
        # muTransfer across the growth: the same base LR, the large width's multipliers.
        from ..families.mup import rescale_groups

        rescale_groups(recipe.group_hparams, large)
    ds_cfg = ds_config if ds_config is not None else copy.deepcopy(engine._config._param_dict)
    hf_cfg = large_hf_config(engine.module.config, small, large)
    # Both sides through from_hf_config: defaults (tying, eps) made explicit the same way.
    if ModelSpec.from_hf_config(hf_cfg) != ModelSpec.from_hf_config(large.to_hf_config()):
        raise GrowthError(f"cannot derive the grown HF config from {type(engine.module.config).__name__}")
    model_class = type(engine.module)
    report = GrowthReport(method, small.to_dict(), large.to_dict(), optimizer, rank_world()[1], fit_steps=fit_steps)
    report.loss_before = _loss(engine, eval_batch)
    dev = engine.device
    phases: dict = {}
    emit = on_event or (lambda name, value: None)

    # 2. The small model's fp32 masters (and moments) on every rank; then the old engine is freed.
    with phase(phases, "gather", dev):
        from .optim_state import KEYS as MOMENT_KEYS
        from .optim_state import gather_moments

        sd = gather_fp32_state_dict(engine, all_ranks=True)
        canonical = to_canonical(small, sd)
        report.bytes_gathered = sum(v.numel() * v.element_size() for v in sd.values())
        del sd
        if transfer:  # 2x the small model more, one parameter at a time
            moments = gather_moments(engine)
            report.bytes_gathered += sum(v.numel() * v.element_size() for k in MOMENT_KEYS for v in moments[k].values())
            emit("moments", moments)
            small_moments = {k: to_canonical(small, moments[k]) for k in MOMENT_KEYS}
            report.adam_step = moments["step"]
            del moments
        destroy_engine(engine)
        engine = None
        trim()
        base_mib, base_file = rss_mib(), file_mib()  # no engine alive, the small weights included

    # 3. The operator (fitted data-parallel where the method learns), then the large layers.
    with phase(phases, "fit", dev):
        fit = FitRequest(fit_steps, fit_data, dev, all_reduce_mean_, mlm_fn, mask_token_id,
                         on_fitted=lambda op: emit("operator", op))
        built = entry.stream(small, canonical, large, options, fit)
        del canonical
    emit("fitted", None)
    report.operator_bytes = built.operator_bytes
    if built.fit is not None:
        per_rank = all_gather_object((built.fit.tokens, built.fit.flops))
        report.fit_tokens = sum(t for t, _ in per_rank)
        report.fit_flops = sum(f for _, f in per_rank)
        report.fit_losses = list(built.fit.losses)

    # 4. The large model, each rank's slices written before any engine exists.
    with phase(phases, "write", dev):
        model = build_model(large, ds_cfg, seed, hf_config=hf_cfg, model_class=model_class)
        report.elements_written = write_weights(model, built.stream)
        report.largest_layer_bytes = built.stream.peak_layer_bytes
        del built
    with phase(phases, "engine", dev):
        new = build_engine(model) if build_engine is not None else recipe.build(model)
    if recipe is not None:
        report.carried = ["ds_config", "optimizer class and param-group settings", "param-group split"]
        report.carried += (["LR scheduler position"] if recipe.scheduler_state is not None else [])
        report.carried += [f"engine.{k}" for k in recipe.counters]

    # 5. Adam's state through the operator's gradient map, one large layer at a time.
    if transfer:
        from ..growth.moments import moment_streams
        from .optim_state import prime_adam_state, step_count, write_moments

        with phase(phases, "optimizer", dev):
            streams = moment_streams(small, large, method, options, small_moments["exp_avg"],
                                     small_moments["exp_avg_sq"])
            del small_moments
            prime_adam_state(new, report.adam_step)
            report.moments_written = sum(write_moments(new, k, streams[k]) for k in MOMENT_KEYS)
            del streams
            report.adam_step = step_count(new)  # read back from the new engine's optimizer state
        report.carried.append(f"Adam moments and step count ({report.adam_step})")

    ranks = all_gather_object({"phases": phases, "base": base_mib, "base_file": base_file})
    report.phases = merge_phases([r["phases"] for r in ranks])
    report.host_base_mib = [r["base"] for r in ranks]
    if all(r["base_file"] is not None for r in ranks):
        report.host_base_file_mib = [r["base_file"] for r in ranks]
    report.growth_s = max(all_gather_object(time.perf_counter() - t0))
    if hasattr(new, "backward"):  # an engine (build_engine may return the bare model)
        report.loss_after = _loss(new, eval_batch)
    return new, report


def keep_model(model: torch.nn.Module) -> torch.nn.Module:
    """`build_engine=keep_model`: return the grown model without an engine (for callers whose
    framework builds its own engine, e.g. the HF Trainer)."""
    return model


__all__ = ["grow_engine", "keep_model", "small_spec_of", "resolve_any_target", "large_hf_config", "OPTIMIZER_MODES"]
