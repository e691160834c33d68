"""`launchers/pretrain.py`'s entry point, and what it takes and checks before any compute: one
parser and one preflight, shared by the trainer (dsgrow/train.py) and the multi-node check
(dsgrow/multinode.py), so the two can never disagree about what a run is.

No DeepSpeed import here: the multi-node preflight runs on a login node in a few seconds.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError
from .recipe import Recipe, load_recipe

# ds_configs/zero2.json, packaged: the default engine config works from an installed wheel too
# (tests/test_config.py keeps the two equal).
DEFAULT_DS_CONFIG = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": 50000000, "allgather_bucket_size": 50000000},
    "steps_per_print": 1000000000,
    "wall_clock_breakdown": False,
}


def pretrain_parser(parser_class=argparse.ArgumentParser, **kwargs) -> argparse.ArgumentParser:
    """The options of launchers/pretrain.py (and `dsgrow train`)."""
    p = parser_class(prog="pretrain", description="dsgrow pretraining on DeepSpeed", **kwargs)
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default=None,
                   help="DeepSpeed engine config (ds_configs/*.json; default: ZeRO-2, the packaged "
                        "ds_configs/zero2.json); 'auto' fields come from the recipe")
    p.add_argument("--recipe", default=None, help="YAML recipe (default: the embedded tiny CPU demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (overrides the recipe's 'out')")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def load_run_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe the arguments name; `--resume` without `--recipe` reloads what `--out` trained."""
    path = args.recipe
    if args.resume and path is None and args.out and (Path(args.out) / "recipe.yaml").is_file():
        path = str(Path(args.out) / "recipe.yaml")
    return load_recipe(path, args.overrides, args.out)


def read_run_ds_config(path: Optional[str]) -> dict:
    from .engine.ds_config import read_ds_config, zero_stage

    cfg = copy.deepcopy(DEFAULT_DS_CONFIG) if path is None else read_ds_config(path)
    zero_stage(cfg)
    return cfg


@dataclass
class Preflight:
    recipe: Recipe
    ds_raw: dict
    precision: str
    stages: list


def preflight(recipe: Recipe, ds_config: Optional[str], world: int, gpu: bool) -> Preflight:
    """Every check that needs no data and no DeepSpeed: each stage's batch split over `world`
    ranks and its filled ds_config, and growths whose optimizer mode the ds_config rules out.
    ConfigError (one line) on bad input."""
    from .engine.ds_config import fill_ds_config, resolve_precision

    if world < 1:
        raise ConfigError(f"the world size must be at least 1, got {world}")
    ds_raw = read_run_ds_config(ds_config)
    precision = resolve_precision(recipe.train.precision, gpu)
    stages = recipe.stage_plan()
    for st in stages:
        st.train.check_world(world)
        fill_ds_config(ds_raw, st.train, world, precision)
        if st.grow and st.grow.optimizer == "transfer" and "optimizer" in ds_raw:
            raise ConfigError(f"stages[{st.index}].grow.optimizer: transfer moves the moments of the torch "
                              f"AdamW dsgrow builds; {ds_config} names its own optimizer "
                              f"({ds_raw['optimizer'].get('type')})")
    return Preflight(recipe, ds_raw, precision, stages)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`launchers/pretrain.py` and `dsgrow train` both land here."""
    args = pretrain_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from .train import Trainer

        trainer = Trainer(load_run_recipe(args), args.ds_config, resume=args.resume)
        trainer.run()
        trainer.close()
    except ValueError as e:  # ConfigError, SpecError, DataError, CheckpointError: one line, no traceback
        if os.environ.get("DSGROW_TRACEBACK"):  # ... unless asked for (debugging a ValueError from a library)
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"dsgrow: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["main", "DEFAULT_DS_CONFIG", "pretrain_parser", "load_run_recipe", "read_run_ds_config", "preflight", "Preflight"]
