"""Launcher runs cached under a key of everything that produced them (shared by the benchmarks).

A finished run (OUT/summary.json) is reused only when OUT/bench_key holds the key of the run now
asked for: the recipe's settings, the key of the weights it starts from, the code (dsgrow's
sources and the launcher) and the DeepSpeed config. Anything else, an interrupted run included,
is removed and run again; a label alone never brings back a result.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def source_hash(*extra: Path) -> str:
    """Hash of the code a run executes (dsgrow's sources and the launcher, plus `extra` files, e.g.
    a benchmark that trains in its own process)."""
    h = hashlib.sha256()
    for p in sorted([*(REPO / "dsgrow").rglob("*.py"), *(REPO / "dsgrow").rglob("*.yaml"),
                     REPO / "launchers" / "pretrain.py", *(Path(x).resolve() for x in extra)]):
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def key_of(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class KeyedRuns:
    """Launcher runs in `work`, one folder per name, each reused only under its key."""

    def __init__(self, work: Path, ds_config: str, env: dict, code: str | None = None):
        self.work, self.ds_config, self.env = work, ds_config, env
        self.code = source_hash() if code is None else code

    def key(self, recipe_text: str, start: str = "") -> str:
        """What a run's result depends on: its recipe's settings (key order aside), the key of what
        it starts from, the code and the DeepSpeed config (its name and its text)."""
        text = yaml.safe_dump(yaml.safe_load(recipe_text), sort_keys=True)
        cfg = Path(self.ds_config)
        return key_of(text, start, self.code, cfg.name, cfg.read_text() if cfg.is_file() else "")

    def launch(self, name: str, recipe: Path, start: str = "") -> tuple[Path, float | None]:
        """(run folder, seconds it trained; None when an earlier run with the same key was reused)."""
        out = self.work / name
        key = self.key(recipe.read_text(), start)
        if (out / "summary.json").is_file() and (out / "bench_key").is_file() and (out / "bench_key").read_text() == key:
            return out, None
        if out.exists():
            shutil.rmtree(out)  # another recipe, start or code, or an interrupted run: run again
        cmd = [sys.executable, str(REPO / "launchers" / "pretrain.py"), "--ds_config", self.ds_config,
               "--recipe", str(recipe), "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (out / "bench_key").write_text(key)  # written last: a run killed before this is run again
        return out, time.perf_counter() - t0
