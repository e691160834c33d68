"""Shared test fixtures: offline environment, a per-session cache, and multi-rank launch helpers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Offline, quiet, and reproducible for every test and every process they start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-compiles its CPU comm op on first use (~40-75 s); keep it under the checkout so
# CI compiles once per run and a developer once per clone.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# Tokenizers and packed blocks are cached per content hash; one cache for the whole session.
os.environ.setdefault("DSGROW_CACHE_DIR", str(REPO / ".cache" / "dsgrow-test"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run launchers/pretrain.py with `nproc` real ranks (torchrun, gloo on CPU)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    cmd += [str(REPO / "launchers" / "pretrain.py"), *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def launcher():
    return run_launcher
