"""Checkpoints that a crash cannot corrupt: DeepSpeed's own state plus dsgrow's run state.

Layout under `<out>/checkpoints/`:
  <tag>/            DeepSpeed's files (model + ZeRO optimizer shards), one rng_rank<R>.pt per rank,
                    run_state.json (tokens, data position, recipe, manifest of every file + size)
  latest            the tag of the newest complete checkpoint (DeepSpeed's own convention)

A checkpoint is written into `<tag>.partial/` and renamed to `<tag>/` only once every rank has
finished and the manifest is on disk; `latest` is replaced atomically after that. A process
killed at any point therefore leaves the previous complete checkpoint and `latest` untouched.
Older checkpoints are pruned only after a newer one is complete. Storage must be shared by all
ranks (it is on the clusters dsgrow targets: the launch scripts put `--out` on shared storage).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ConfigError
from ..fileio import atomic_write_text
from .runtime import barrier, broadcast_object, rank_world

STATE_FILE = "run_state.json"
PARTIAL = ".partial"


class CheckpointError(ConfigError):
    """A checkpoint that is missing, truncated, or does not belong to this run (one line)."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoints (those with a run state), oldest first by tokens consumed."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and not d.name.endswith(PARTIAL) and (d / STATE_FILE).is_file():
            try:
                tokens = json.loads((d / STATE_FILE).read_text())["tokens"]
            except (ValueError, KeyError):
                continue
            found.append((tokens, d.name))
    return [name for _, name in sorted(found)]


def save(engine, root: Path, tag: str, run_state: dict, keep: int) -> Path:
    """Write checkpoint `tag` on every rank; returns its final folder."""
    root = Path(root)
    partial = root / f"{tag}{PARTIAL}"
    if rank_world()[0] == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a run killed mid-save; never a complete checkpoint
            shutil.rmtree(partial)
    barrier()
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    torch.save(rng_state(), partial / f"rng_rank{rank_world()[0]}.pt")
    barrier()
    final = root / tag
    if rank_world()[0] == 0:
        manifest = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
        state = dict(run_state, tag=tag, manifest=manifest)
        atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        _fault_point("checkpoint_before_commit", tag)
        if final.exists():  # same tag written again (e.g. a resumed run's final save): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / "latest", tag)
        # Stage-end checkpoints (stageN-end) are kept for good: each is a growth's starting point.
        for old in [x for x in complete_tags(root) if not x.startswith("stage")][:-keep]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
    barrier()
    _fault_point("checkpoint_after_commit", tag)
    return final


def latest_tag(root: Path) -> Optional[str]:
    root = Path(root)
    f = root / "latest"
    if f.is_file():
        tag = f.read_text().strip()
        if (root / tag / STATE_FILE).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


def verify(root: Path, tag: str, world_size: int) -> dict:
    """Read and check a checkpoint's run state and files before any engine is touched."""
    d = Path(root) / tag
    sf = d / STATE_FILE
    if not sf.is_file():
        raise CheckpointError(f"checkpoint {d} is incomplete: {STATE_FILE} is missing")
    try:
        state = json.loads(sf.read_text())
    except ValueError:
        raise CheckpointError(f"checkpoint {sf} is truncated or corrupt (not valid JSON)") from None
    for rel, size in state.get("manifest", {}).items():
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {d} is incomplete: {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {f} is truncated ({f.stat().st_size} bytes, expected {size})")
    saved_world = state.get("world_size")
    if saved_world != world_size and state.get("zero_stage", 0) >= 1:
        # DeepSpeed's ZeRO shards are per rank; loading them at another world size fails
        # deep inside load_checkpoint (deepspeed-facts.md), so say it here instead.
        raise CheckpointError(f"checkpoint {d} was written by {saved_world} ranks but this run has {world_size}; "
                              "resume with the same number of ranks")
    return state


def load(engine, root: Path, tag: str) -> None:
    """Restore DeepSpeed state and this rank's RNG from a verified checkpoint."""
    d = Path(root) / tag
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {d}")
    rng_file = d / f"rng_rank{rank_world()[0]}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))


def _fault_point(name: str, tag: str) -> None:
    """Test hook: DSGROW_FAULT=<name>:<tag> SIGKILLs this process at that point (crash tests)."""
    want = os.environ.get("DSGROW_FAULT")
    if want and want == f"{name}:{tag}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def resolve_resume(root: Path, resume: bool) -> Optional[str]:
    """Rank 0 decides which tag to resume from; every rank gets the same answer."""
    tag = latest_tag(root) if rank_world()[0] == 0 else None
    tag = broadcast_object(tag)
    if resume and tag is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {root}")
    if not resume and tag is not None:
        raise CheckpointError(f"{root} already holds checkpoint {tag!r}: pass --resume to continue that run, "
                              "or choose another --out (nothing was overwritten)")
    return tag
