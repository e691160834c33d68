"""Growth stages of a recipe: which model trains for how many tokens, and how it grows.

    stages:
      - model: {family: gpt2, layers: 4, hidden: 128, heads: 4}
        tokens: 2_000_000
      - grow: {method: ligo, fit_steps: 100}   # GrowConfig; other keys: the method's options
        model: {layers: 8, hidden: 256, heads: 8}
        tokens: 4_000_000
        train: {lr: 1e-3}          # optional: this stage's train.* overrides
        data: {prune: {score: loss, fraction: 0.7, keep: hard}}   # optional (dsgrow/data/prune.py)

A stage's `model` is merged over the previous stage's (the first over the recipe's `model`);
`train` over the recipe's `train`. `tokens` is the stage's share of the run, the growth fit's
tokens included (an integer, "2M", or a fraction of `budget.tokens`). Everything here is checked
when the recipe loads, growth requests included, before any stage trains.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .config import ConfigError, TrainConfig, build_typed, parse_count
from .families.spec import ModelSpec, SpecError

STAGE_KEYS = ("model", "tokens", "grow", "train", "data")
# train.* fields a stage may not change: the data stream is in samples of seq_len, and the seed
# and token count belong to the run.
FIXED_TRAIN = ("seq_len", "seed", "tokens", "init_from")
# Adam's state at a growth: a fresh optimizer, or the small model's moments mapped onto the large
# one (function-preserving copy operators only; growth/moments.py).
OPTIMIZER_CHOICES = ("reset", "transfer")


@dataclass
class GrowConfig:
    """A stage's `grow:` mapping, typed. Keys other than these are the method's own options
    (checked against the method's registry entry when the recipe loads)."""

    method: str = "ligo"
    """A registered growth method (dsgrow.growth.REGISTRY)."""
    fit_steps: int = 0
    """Steps of the operator's fit (methods that learn: ligo)."""
    optimizer: str = "reset"
    """reset | transfer (Adam's moments mapped through a function-preserving operator)."""
    fit_batch: Optional[int] = None
    """Blocks per fit step, all ranks together (default: the stage's global batch)."""
    export_grown: bool = False
    """Write the small, grown (and operator / moment) tensors under out/stages/, for checks."""
    options: dict = dataclasses.field(default_factory=dict)
    """The method's options (e.g. init, depth_init, lr for ligo; noise for hyperclone)."""

    @classmethod
    def from_mapping(cls, d: dict, where: str) -> "GrowConfig":
        own = {f.name for f in dataclasses.fields(cls)} - {"options"}
        g = cls(**{k: v for k, v in d.items() if k in own}, options={k: v for k, v in d.items() if k not in own})
        if g.optimizer not in OPTIMIZER_CHOICES:
            raise ConfigError(f"{where}.optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {g.optimizer!r}")
        if isinstance(g.fit_steps, bool) or not isinstance(g.fit_steps, int) or g.fit_steps < 0:
            raise ConfigError(f"{where}.fit_steps must be an integer >= 0, got {g.fit_steps!r}")
        if g.fit_batch is not None and (isinstance(g.fit_batch, bool) or not isinstance(g.fit_batch, int)
                                        or g.fit_batch <= 0):
            raise ConfigError(f"{where}.fit_batch must be a positive integer, got {g.fit_batch!r}")
        if not isinstance(g.export_grown, bool):
            raise ConfigError(f"{where}.export_grown must be true or false, got {g.export_grown!r}")
        return g


@dataclass
class Stage:
    index: int
    model: ModelSpec
    tokens: int
    """Tokens of this stage (the growth fit's included)."""
    start: int
    """Tokens consumed before the stage starts."""
    train: Any
    """The stage's TrainConfig (train.tokens = this stage's training tokens)."""
    grow: Optional[GrowConfig] = None
    """How this stage grows from the previous one; None for stage 0."""
    prune: Optional[Any] = None
    """A PruneConfig: at the boundary the previous stage's model scores the training samples and
    this stage (its growth fit included) draws only the kept ones."""

    @property
    def end(self) -> int:
        return self.start + self.tokens


def parse_stages(recipe, budget_tokens: Optional[int]) -> list[Stage]:
    """Resolve `recipe.stages` (a list of mappings) into Stage objects; ConfigError on bad input."""
    raw = recipe.stages
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages: expected a non-empty list of stages")
    stages: list[Stage] = []
    model = recipe.model.to_dict()
    train_base = dataclasses.asdict(recipe.train)
    train_base["tokens"] = None
    start = 0
    for i, s in enumerate(raw):
        where = f"stages[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(s).__name__}")
        unknown = sorted(set(s) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError(f"unknown recipe key {where}.{unknown[0]} (known: {', '.join(STAGE_KEYS)})")
        if "tokens" not in s or s["tokens"] in (None, 0):
            raise ConfigError(f"{where}.tokens: every stage needs a positive token count")
        tok = s["tokens"]
        if isinstance(tok, float) and 0.0 < tok <= 1.0:
            if budget_tokens is None:
                raise ConfigError(f"{where}.tokens ({tok}) is a fraction but the recipe has no budget.tokens")
            tok = int(tok * budget_tokens)
        else:
            tok = parse_count(tok, f"{where}.tokens")
        if tok <= 0:
            raise ConfigError(f"{where}.tokens must be positive, got {tok}")
        m = s.get("model") or {}
        if not isinstance(m, dict):
            raise ConfigError(f"{where}.model: expected a mapping of sizes")
        if "family" in m and m["family"] != model["family"] and i > 0:
            raise ConfigError(f"{where}.model.family: {m['family']!r} differs from the previous stage's "
                              f"{model['family']!r} (growth keeps the family)")
        if i > 0:
            # Sizes a stage leaves out follow its own width (head dim kept, FFN ratio kept).
            for key in ("ffn",):
                if key not in m and "hidden" in m:
                    model[key] = None
            if "heads" not in m and "hidden" in m and model.get("hidden"):
                head_dim = model["hidden"] // model["heads"]
                if m["hidden"] % head_dim:
                    raise ConfigError(f"{where}.model: hidden {m['hidden']} is not a multiple of the head dim {head_dim}")
                m = dict(m, heads=m["hidden"] // head_dim)
        model = {**model, **m}
        try:
            spec = build_typed(ModelSpec, model, f"{where}.model")
        except SpecError as e:
            raise ConfigError(f"{where}.model: {e}") from None
        tr = s.get("train") or {}
        if not isinstance(tr, dict):
            raise ConfigError(f"{where}.train: expected a mapping of train.* overrides")
        fixed = sorted(set(tr) & set(FIXED_TRAIN))
        if fixed:
            raise ConfigError(f"{where}.train.{fixed[0]} cannot change between stages")
        grow = s.get("grow")
        if i == 0 and grow is not None:
            raise ConfigError(f"{where}.grow: the first stage has nothing to grow from")
        if i > 0:
            if not isinstance(grow, dict):
                raise ConfigError(f"{where}.grow: every stage after the first needs grow: {{method: ...}}")
            grow = GrowConfig.from_mapping(grow, f"{where}.grow")
        train = build_typed(TrainConfig, {**train_base, **tr}, f"{where}.train")
        prune = _parse_prune(s.get("data"), i, spec, recipe, f"{where}.data")
        stages.append(Stage(i, spec, tok, start, train, grow, prune))
        start += tok
    _check_growth(stages, recipe)
    return stages


def _parse_prune(data, i: int, spec: ModelSpec, recipe, where: str):
    """A stage's `data: {prune: {...}}` as a PruneConfig (its seed defaults to the run's)."""
    if data is None:
        return None
    from .data.corpus import DataError
    from .data.prune import PruneConfig, check_family

    if not isinstance(data, dict) or set(data) - {"prune"}:
        raise ConfigError(f"{where}: expected {{prune: {{score, fraction, keep}}}}, got {data!r}")
    if i == 0:
        raise ConfigError(f"{where}.prune: the first stage has no earlier model to score its data with")
    if "flops" in (recipe.budget or {}):
        raise ConfigError(f"{where}.prune: pruning with a budget.flops is not supported (the scoring's FLOPs depend "
                          "on the corpus); give budget.tokens")
    p = data.get("prune")
    if not isinstance(p, dict):
        raise ConfigError(f"{where}.prune: expected a mapping {{score, fraction, keep}}, got {p!r}")
    try:
        cfg = build_typed(PruneConfig, {"seed": recipe.train.seed, **p}, f"{where}.prune")
        check_family(spec.family, f"{where}.prune")
    except DataError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _check_growth(stages: list[Stage], recipe) -> None:
    """Each growth request through dsgrow.growth's own checks (shrinking, head dims, options)."""
    from .growth import GrowthError, check_request
    from .growth.moments import check_transfer

    vocab = recipe.data.vocab_size
    for prev, cur in zip(stages, stages[1:]):
        where = f"stages[{cur.index}].grow"
        g = cur.grow
        small, large = prev.model.with_vocab(vocab), cur.model.with_vocab(vocab)
        try:
            check_request(small, large, g.method, g.fit_steps, **g.options)
            if g.optimizer == "transfer":
                check_transfer(small, large, g.method, g.options)
        except GrowthError as e:
            raise ConfigError(f"{where}: {e}") from None
        fit_tokens = fit_tokens_of(cur)
        if fit_tokens >= cur.tokens:
            raise ConfigError(f"{where}: the fit takes {fit_tokens} tokens, all of the stage's {cur.tokens}")
        if cur.tokens - fit_tokens < cur.train.first_step_tokens():
            raise ConfigError(f"stages[{cur.index}].tokens ({cur.tokens}) leaves less than one optimizer step "
                              "after the growth fit")
        cur.train.resolve_tokens(cur.tokens - fit_tokens)
    stages[0].train.resolve_tokens(stages[0].tokens)


def fit_batch(stage: Stage) -> int:
    """Global blocks per LiGO fit step (all ranks together)."""
    return int(stage.grow.fit_batch or stage.train.global_batch)


def fit_tokens_of(stage: Stage) -> int:
    """Tokens the stage's growth fit consumes (0 for a method that does not learn)."""
    from .growth import get_method

    if not stage.grow:
        return 0
    return get_method(stage.grow.method).fit_tokens(stage.grow.fit_steps, fit_batch(stage), stage.train.seq_len)
