"""Checkpoints that a crash cannot corrupt and a planted file cannot abuse: DeepSpeed's own state
plus dsgrow's run state.

Layout under `<out>/checkpoints/`:
  <tag>/            DeepSpeed's files (model + ZeRO optimizer shards), one rng_rank<R>.pt per rank,
                    run_state.json (tokens, data position, recipe, manifest of every file: size
                    and sha256)
  latest            the tag of the newest complete checkpoint (DeepSpeed's own convention)
  .universal/<tag>/ a universal-checkpoint copy of <tag>, made when a run resumes at another
                    world size or ZeRO stage (deleted with the next complete checkpoint)

A checkpoint is written into `<tag>.partial/` and renamed to `<tag>/` only once every rank has
finished and the manifest is on disk; `latest` is replaced atomically after that. A process
killed at any point therefore leaves the previous complete checkpoint and `latest` untouched.
Older checkpoints are pruned only after a newer one is complete, by a rename to `.trash-<tag>`
first, so a kill mid-delete leaves a name that the next start collects. Storage must be shared
by all ranks (it is on the clusters dsgrow targets: the launch scripts put `--out` on shared
storage).

What is trusted: nothing in a checkpoint folder runs code. Before anything is unpickled, every
file's sha256 is checked against the manifest (a flipped byte is refused) and every pickle is
scanned for the globals it would import: only tensors, containers and the three DeepSpeed value
classes in SAFE_GLOBALS pass. DeepSpeed's own loader (torch.load with weights_only=False) then
runs with torch.load forced to weights_only=True and that allow-list (`safe_torch_load`). The
manifest itself is not signed: it detects rot and accidents, not a forger who rewrites both.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..config import ConfigError
from ..fileio import atomic_write_text
from .runtime import all_gather_object, barrier, broadcast_object, rank_world

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _my_share(files: list) -> list:
    """This rank's share of a file list: hashing a large checkpoint is spread over the ranks."""
    rank, world = rank_world()
    return files[rank::world]


def _agree(error: Optional[str]) -> Optional[str]:
    """The first rank's error, on every rank (so all raise the same line, none waits alone)."""
    errors = [e for e in all_gather_object(error) if e]
    return errors[0] if errors else None


def save(engine, root: Path, tag: str, run_state: dict, keep: int) -> Path:
    """Write checkpoint `tag` on every rank; returns its final folder.

    A write that fails (disk full, quota, permissions) removes the partial folder and raises one
    CheckpointError line on every rank; the previous complete checkpoint is untouched."""
    root = Path(root)
    partial = root / f"{tag}{PARTIAL}"
    rank = rank_world()[0]
    fault_point("checkpoint_begin", tag)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a run killed mid-save; never a complete checkpoint
            shutil.rmtree(partial)
    barrier()
    error = None
    try:
        engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        error = _write_error(root, tag, e)
    error = _agree(error)
    hashes: dict = {}
    if error is None:
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        try:
            hashes = {rel: {"size": (partial / rel).stat().st_size, "sha256": sha256_file(partial / rel)}
                      for rel in _my_share(files)}
        except OSError as e:
            error = _write_error(root, tag, e)
        error = _agree(error)
    final = root / tag
    if error is None and rank == 0:
        manifest = {}
        for part in all_gather_object(hashes):
            manifest.update(part)
        state = dict(run_state, tag=tag, manifest=dict(sorted(manifest.items())))
        try:
            atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=1, sort_keys=True, allow_nan=False))
            fault_point("checkpoint_before_commit", tag)
            if final.exists():  # same tag written again (e.g. a resumed run's final save): replace it
                _trash(root, final)
            os.replace(partial, final)
            atomic_write_text(root / "latest", tag)
        except OSError as e:
            error = _write_error(root, tag, e)
        if error is None:
            # Stage-end checkpoints (stageN-end) are kept for good: each is a growth's starting point.
            for old in [x for x in complete_tags(root) if not x.startswith("stage")][:-keep]:
                if old != tag:
                    _trash(root, root / old)
            shutil.rmtree(root / UNIVERSAL, ignore_errors=True)  # a resume's conversion: not needed now
    elif error is None:
        all_gather_object(hashes)
    if error is not None and rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    fault_point("checkpoint_after_commit", tag)
    return final


def _write_error(root: Path, tag: str, e: Exception) -> str:
    prev = latest_tag(root)
    keep = f"the last complete checkpoint ({prev}) is intact" if prev else "no earlier checkpoint exists"
    if isinstance(e, OSError) and e.strerror:
        why = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    return f"checkpoint {tag} could not be written ({why}{free}); {keep}"


def _trash(root: Path, folder: Path) -> None:
    """Delete a checkpoint folder crash-safely: one atomic rename, then the slow delete. A kill in
    between leaves `.trash-<tag>`, which no reader takes for a checkpoint and the next start removes."""
    trash = root / f".trash-{folder.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    fault_point("checkpoint_prune", folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def latest_tag(root: Path) -> Optional[str]:
    root = Path(root)
    f = root / "latest"
    if f.is_file():
        tag = f.read_text().strip()
        if (root / tag / STATE_FILE).is_file():
            return tag
    tags = complete_tags(root)
    return tags[-1] if tags else None


# --------------------------------------------------------------------------------------------
# Reading a checkpoint back: integrity, no code, and the route (direct or universal)
# --------------------------------------------------------------------------------------------
# Classes DeepSpeed pickles into its checkpoints, as plain values: the first, third and fourth
# found with torch.serialization.get_unsafe_globals_in_checkpoint on fp32 CPU runs (ZeRO-2, -3);
# DynamicLossScaler is the fp16 form of the first (from source). bf16/fp16 GPU checkpoints are
# not checked yet: a class missing here is refused in one line, never loaded.
SAFE_GLOBAL_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _safe_globals() -> list:
    import importlib

    found = []
    for name in SAFE_GLOBAL_NAMES:
        mod, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: a file that needs it is refused by the scan
    return found


def unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle would import that are not on the allow-list. A torch zip archive's
    pickle is read without unpickling; a legacy-format file (DeepSpeed's checkpoint
    `use_node_local_storage`/non-zip serialization) gets a weights-only load with the allow-list,
    which refuses any other global without running it."""
    import pickle

    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        found = get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip archive
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                torch.load(path, map_location="cpu", weights_only=True)
            return []
        except pickle.UnpicklingError as e:
            return [(str(e).split("GLOBAL ")[1].split(" ")[0] if "GLOBAL " in str(e) else "an unsupported object")]
        except Exception as e:
            return [f"<unreadable: {type(e).__name__}>"]
    return [g for g in found if g not in SAFE_GLOBAL_NAMES]


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Inside this block every torch.load (DeepSpeed's weights_only=False ones included) is a
    weights-only load with the DeepSpeed allow-list: a pickle that would run code raises instead.

    DeepSpeed reads its checkpoints through several module-level `torch.load(..., weights_only=
    False)` calls (engine, ZeRO-3, universal loader, ds_to_universal); patching the one function
    they all call, for the duration of a load, is the only way to cover them all."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_globals()):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def verify(root: Path, tag: str, check_content: bool = True) -> dict:
    """Read and check a checkpoint before any engine is touched: the run state, every file's size
    and (with `check_content`) sha256, and that no pickle in it imports anything but the
    allow-list. Every rank checks its share of the files; all ranks raise the same one line."""
    d = Path(root) / tag
    sf = d / STATE_FILE
    error, state = None, None
    if not sf.is_file():
        error = f"checkpoint {d} is incomplete: {STATE_FILE} is missing"
    else:
        try:
            state = json.loads(sf.read_text())
        except ValueError:
            error = f"checkpoint {sf} is truncated or corrupt (not valid JSON)"
    if error is None:
        manifest = state.get("manifest", {})
        for rel in manifest:
            if not (d / rel).is_file():
                error = f"checkpoint {d} is incomplete: {rel} is missing"
                break
        for rel in _my_share(sorted(manifest)) if error is None else []:
            error = _check_file(d / rel, manifest[rel], check_content)
            if error:
                break
    error = _agree(error)
    if error is not None:
        raise CheckpointError(error)
    return state


def _check_file(f: Path, entry, check_content: bool) -> Optional[str]:
    size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("sha256"))
    if f.stat().st_size != size:
        return f"checkpoint file {f} is truncated ({f.stat().st_size} bytes, expected {size})"
    if check_content and digest is not None and sha256_file(f) != digest:
        return f"checkpoint file {f} is corrupt: its sha256 differs from the manifest's (refusing to load it)"
    if f.suffix == ".pt":
        bad = unsafe_globals(f)
        if bad:
            return (f"checkpoint file {f} would import {', '.join(bad[:3])} when loaded: dsgrow loads only "
                    "tensors and DeepSpeed's value classes from a checkpoint (refusing it; nothing was run)")
    return None


def resume_route(state: dict, root: Path, tag: str, world_size: int, zero_stage: int) -> str:
    """How a checkpoint loads into this run: "direct", or "universal" (DeepSpeed's universal
    checkpoint, converted first) when the world size or ZeRO stage changed. Raises one line when
    neither can work."""
    saved_world, saved_stage = state.get("world_size"), state.get("zero_stage", 0)
    d = Path(root) / tag
    if saved_world == world_size and saved_stage == zero_stage:
        return "direct"
    if saved_stage == 0 and zero_stage == 0:
        return "direct"  # no shards: the whole model and optimizer sit in one file at any world size
    if saved_stage == 0 or zero_stage == 0 or (saved_stage == 3) != (zero_stage == 3):
        # DeepSpeed 0.19's universal loader fails both ways between ZeRO-3 and ZeRO-1/2 (a
        # KeyError / "Empty ds_version" deep inside; measured), and ZeRO-0 has no shards to convert.
        raise CheckpointError(f"checkpoint {d} was written with ZeRO-{saved_stage} on {saved_world} rank(s); "
                              f"this run has ZeRO-{zero_stage} on {world_size}: any world size works, but keep "
                              "the ZeRO stage (1 <-> 2 may change; 0 and 3 must stay)")
    return "universal"


UNIVERSAL = ".universal"


def make_universal(root: Path, tag: str) -> Path:
    """Rank 0 converts checkpoint `tag` with DeepSpeed's ds_to_universal (under safe_torch_load)
    into `<root>/.universal/<tag>`; returns the folder to pass to `load(..., load_dir=)`. Written
    under a temporary name and renamed, so a kill mid-conversion leaves nothing half-made."""
    root = Path(root)
    load_dir = root / UNIVERSAL
    error = None
    if rank_world()[0] == 0 and not (load_dir / tag / "zero").is_dir():
        import argparse
        import io

        from deepspeed.checkpoint import ds_to_universal

        tmp = root / f"{UNIVERSAL}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(tmp / tag), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        log = io.StringIO()
        try:
            with safe_torch_load(), contextlib.redirect_stdout(log):
                ds_to_universal.main(args)
            shutil.rmtree(load_dir, ignore_errors=True)
            os.replace(tmp, load_dir)
        except Exception as e:  # DeepSpeed's converter raises assorted types; say which checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            error = (f"checkpoint {root / tag} could not be converted to a universal checkpoint for a resume at "
                     f"another world size or ZeRO stage ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    error = broadcast_object(error)
    if error is not None:
        raise CheckpointError(error)
    return load_dir


def load(engine, root: Path, tag: str, load_dir: Optional[Path] = None) -> None:
    """Restore DeepSpeed state and this rank's RNG from a verified checkpoint (from `load_dir`, a
    universal copy, when the engine was built with checkpoint.load_universal)."""
    d = Path(root) / tag
    with safe_torch_load():
        load_path, _ = engine.load_checkpoint(str(load_dir or root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {d}")
    rng_file = d / f"rng_rank{rank_world()[0]}.pt"
    if not rng_file.is_file():  # resumed on more ranks than wrote it: the new ranks take rank 0's
        rng_file = d / "rng_rank0.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))


def fault_point(name: str, tag: str) -> None:
    """Test hook: DSGROW_FAULT=<name>:<tag> SIGKILLs this process at that point (crash tests);
    DSGROW_FAULT=<name>:<tag>:stop SIGSTOPs it instead (a hung rank), and DSGROW_FAULT_RANK=R
    limits either to rank R."""
    want = os.environ.get("DSGROW_FAULT")
    if not want or not want.startswith(f"{name}:{tag}"):
        return
    action = want[len(f"{name}:{tag}"):]
    if action not in ("", ":stop"):
        return
    only = os.environ.get("DSGROW_FAULT_RANK")
    if only is not None and int(only) != rank_world()[0]:
        return
    import signal

    os.kill(os.getpid(), signal.SIGSTOP if action == ":stop" else signal.SIGKILL)


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
