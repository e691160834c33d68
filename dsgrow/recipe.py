"""Run recipes: typed dataclasses loaded from YAML, dotted `--set` overrides, validated up front.

Every check that can be made without building a model happens in `load_recipe` / `__post_init__`,
so bad input fails in well under a second with one line that names the field.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .config import ConfigError, DataConfig, TrainConfig, build_typed, parse_count
from .families.spec import ModelSpec
from .stages import Stage, fit_tokens_of, parse_stages


@dataclass
class Recipe:
    name: str = "demo"
    """Run name (tensorboard and summary)."""
    out: str = "runs/demo"
    """Output folder: checkpoints, logs, tensorboard, exported model."""
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export_hf: bool = True
    """Write the final model as a Hugging Face directory (safetensors) under out/final_model."""
    budget: Optional[dict] = None
    """{tokens: N} or {flops: F} for the whole run; the run stops at the last step that fits.
    train.tokens may then be omitted (the whole budget) or a fraction of it."""
    stages: Optional[list] = None
    """Growth stages (dsgrow/stages.py): [{model, tokens}, {grow: {method, fit_steps}, model, tokens}, ...].
    The run trains each in turn and grows the model in place at each boundary."""

    def __post_init__(self) -> None:
        if self.stages is not None:
            self._resolve_stages()
        else:
            self._resolve_budget()
        from .subnet.est import check_family

        for st in self.stage_plan():
            if st.train.est() is not None:
                check_family(st.model, f"stages[{st.index}].train.subnetwork" if self.stages else "train.subnetwork")
        if self.model.max_seq_len < self.train.seq_len:
            raise ConfigError(f"model.max_seq_len ({self.model.max_seq_len}) is shorter than train.seq_len ({self.train.seq_len})")
        if self.model.vocab_size and self.model.vocab_size != self.data.vocab_size:
            raise ConfigError(f"model.vocab_size ({self.model.vocab_size}) differs from data.vocab_size ({self.data.vocab_size}); "
                              "leave model.vocab_size unset")

    def _resolve_budget(self) -> None:
        from .schedules.batch import ScheduleError
        from .schedules.budget import Budget

        t = self.train
        if self.budget is None:
            if t.tokens is None:
                raise ConfigError("train.tokens: missing (give a token count, or a budget)")
            if isinstance(t.tokens, float):
                raise ConfigError(f"train.tokens ({t.tokens}) is a fraction but the recipe has no budget")
            return
        unknown = sorted(set(self.budget) - {"tokens", "flops"})
        if unknown:
            raise ConfigError(f"unknown recipe key budget.{unknown[0]} (known: flops, tokens)")
        try:
            b = Budget(tokens=self.budget.get("tokens"), flops=self.budget.get("flops"))
        except ScheduleError as e:
            raise ConfigError(str(e)) from None
        if b.tokens is not None:
            if t.tokens is None:
                tokens = b.tokens
            elif isinstance(t.tokens, float):
                tokens = b.fraction_to_tokens(t.tokens)
            elif t.tokens != b.tokens:
                raise ConfigError(f"train.tokens ({t.tokens}) contradicts budget.tokens ({b.tokens}): "
                                  "give one, or train.tokens as a fraction of the budget")
            else:
                tokens = t.tokens
            t.resolve_tokens(tokens)
        else:
            self._resolve_flop_budget(b)

    def _resolve_stages(self) -> None:
        b = self.budget or {}
        unknown = sorted(set(b) - {"tokens", "flops"})
        if unknown or len(b) > 1:
            raise ConfigError("budget: give exactly one of tokens, flops")
        budget_tokens = parse_count(b["tokens"], "budget.tokens") if "tokens" in b else None
        given = self.train.tokens
        self.train.tokens = None
        plan = parse_stages(self, budget_tokens)
        total = sum(s.tokens for s in plan)
        if given is not None and given != total:
            raise ConfigError(f"train.tokens ({given}) contradicts the stages' total ({total}); leave it unset")
        if budget_tokens is not None and total > budget_tokens:
            raise ConfigError(f"stages: their tokens add up to {total}, more than budget.tokens ({budget_tokens})")
        if "flops" in b:
            from .schedules.flops import flops_per_token

            need = 0.0
            for s in plan:
                from .subnet.est import mean_flops_per_token

                # A stage that trains subnetworks (EST) runs fewer FLOPs per token than its model.
                fpt = mean_flops_per_token(s.model.with_vocab(self.data.vocab_size), self.train.seq_len,
                                           s.train.est())
                # A LiGO fit step runs the large model forward and backward and, layerwise (the
                # default), the forward once more under checkpointing: 8ND for its tokens, not 6ND.
                # The operator's own matmuls (a few % at the benchmark's sizes) are not counted here;
                # the run's meter counts them.
                fit = fit_tokens_of(s)
                recompute = 4 / 3 if s.grow and s.grow.options.get("memory", "layerwise") == "layerwise" else 1.0
                need += (s.tokens - fit) * fpt + fit * fpt * recompute
            if need > float(b["flops"]):
                raise ConfigError(f"stages: their tokens need {need:.3e} FLOPs, more than budget.flops "
                                  f"({float(b['flops']):.3e})")
        # Only the total: each stage resolves its own warmup, and train.warmup_tokens must stay as
        # written so that a resumed run (which reads back recipe.yaml) parses the same stages.
        self.train.tokens = total
        self._plan = plan  # not a field: to_dict() keeps the recipe as written

    def stage_plan(self) -> list:
        """The run's stages (one stage, the recipe's model, for a recipe without `stages`)."""
        if self.stages is None:
            return [Stage(0, self.model, self.train.tokens, 0, self.train)]
        return self._plan

    def flops_per_token(self) -> float:
        """Training FLOPs per token of this recipe's model (the tokenizer has data.vocab_size pieces),
        averaged over its subnetwork schedule if it trains subnetworks (EST)."""
        from .subnet.est import mean_flops_per_token

        return mean_flops_per_token(self.model.with_vocab(self.data.vocab_size), self.train.seq_len,
                                    self.train.est())

    def _resolve_flop_budget(self, b) -> None:
        flops_per_token = self.flops_per_token()
        t = self.train
        if t.tokens is None:
            tokens = int(b.flops // flops_per_token)
        elif isinstance(t.tokens, float):
            tokens = int(t.tokens * b.flops // flops_per_token)
        else:
            if t.tokens * flops_per_token > b.flops:
                raise ConfigError(f"train.tokens ({t.tokens}) needs {t.tokens * flops_per_token:.3e} FLOPs, more than "
                                  f"budget.flops ({b.flops:.3e})")
            tokens = t.tokens
        if tokens < t.first_step_tokens():
            raise ConfigError(f"budget.flops ({b.flops:.3e}) is less than one optimizer step "
                              f"({t.first_step_tokens() * flops_per_token:.3e} FLOPs)")
        t.resolve_tokens(tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
DEFAULT_RECIPE = Path(__file__).with_name("default_recipe.yaml")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_recipe(path: Optional[str] = None, overrides: Sequence[str] = (), out: Optional[str] = None) -> Recipe:
    """Read a recipe (the embedded default when `path` is None), apply `--set` overrides and `--out`."""
    src = Path(path) if path else DEFAULT_RECIPE
    if not src.is_file():
        raise ConfigError(f"recipe not found: {src}")
    try:
        tree = yaml.safe_load(src.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {src}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {src}: expected a mapping at the top level")
    return recipe_from_tree(tree, overrides, out)


def recipe_from_tree(tree: dict, overrides: Sequence[str] = (), out: Optional[str] = None) -> Recipe:
    """A recipe from its parsed mapping (a YAML file's, or the copy a checkpoint keeps)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    if out is not None:
        tree["out"] = out
    model = tree.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigError("model: expected a mapping")
    train = tree.get("train")
    if tree.get("stages") is not None and isinstance(train, dict) and train.get("tokens") is not None:
        # A staged recipe's train.tokens can only restate the stages' total. It is set aside while
        # the recipe is built: resolving it first would fix a fractional warmup against the whole
        # run instead of against each stage's own tokens.
        given = parse_count(train["tokens"], "train.tokens")
        recipe = build_typed(Recipe, {**tree, "train": {**train, "tokens": None}}, "")
        if given != recipe.train.tokens:
            raise ConfigError(f"train.tokens ({given}) contradicts the stages' total ({recipe.train.tokens}); "
                              "leave it unset")
        return recipe
    return build_typed(Recipe, tree, "")
