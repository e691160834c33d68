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
from .recipe import Recipe, load_recipe, recipe_from_tree

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
    """The recipe the arguments name; `--resume` without `--recipe` reloads what `--out` trained:
    its recipe.yaml, or, if that was deleted, the copy in the latest checkpoint's run state."""
    path = args.recipe
    if args.resume and path is None and args.out:
        if (Path(args.out) / "recipe.yaml").is_file():
            path = str(Path(args.out) / "recipe.yaml")
        else:
            saved = _checkpointed_recipe(Path(args.out) / "checkpoints")
            if saved is not None:
                return recipe_from_tree(saved, args.overrides, args.out)
    return load_recipe(path, args.overrides, args.out)


def _checkpointed_recipe(root: Path) -> Optional[dict]:
    """The recipe stored in `root`'s latest complete checkpoint (its run state, plain JSON)."""
    import json

    from .engine.checkpoint import STATE_FILE, latest_tag

    tag = latest_tag(root)
    if tag is None:
        return None
    try:
        recipe = json.loads((root / tag / STATE_FILE).read_text()).get("recipe")
    except (OSError, ValueError):
        return None  # the trainer's own verify reports a damaged checkpoint in one line
    return recipe if isinstance(recipe, dict) else None


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
    except (ValueError, OSError) as e:
        # ConfigError, SpecError, DataError, CheckpointError, and the environment's OSErrors (disk
        # full, permissions): one line, no traceback, unless asked for (DSGROW_TRACEBACK=1).
        if os.environ.get("DSGROW_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"dsgrow: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _is_collective_failure(e) or os.environ.get("DSGROW_TRACEBACK"):
            raise
        # Another rank died or hangs; every surviving rank says so in one line naming itself.
        print(f"dsgrow: error: rank {os.environ.get('RANK', '0')}: a collective failed or timed out "
              f"(train.collective_timeout_s): another rank stopped, crashed or lost its connection; see that "
              f"rank's output ({_one_line(e)[:200]})", file=sys.stderr)
        return 3
    finally:
        from .engine.runtime import release_distributed

        release_distributed()  # main() called from Python leaves no process group or env behind
    return 0


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_collective_failure(e: BaseException) -> bool:
    """torch.distributed's errors for a peer that vanished or a timed-out collective."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    text = str(e)
    return isinstance(e, kinds) or any(s in text for s in ("Timed out", "timed out", "Connection closed by peer",
                                                           "Connection reset by peer"))


__all__ = ["main", "DEFAULT_DS_CONFIG", "pretrain_parser", "load_run_recipe", "read_run_ds_config", "preflight", "Preflight"]
