"""What keeps a run's output folder and its ranks honest: one run per `--out` (a lock), leftovers
of a killed run collected at the next start, and a heartbeat per rank that names a stopped or
frozen rank and ends the job long before a collective would time out.

No DeepSpeed and no torch here: rank 0 takes the lock before anything in `--out` is touched.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ..config import ConfigError

LOCK_FILE = ".dsgrow.lock"
HEARTBEAT_DIR = ".heartbeat"


class OutLock:
    """An exclusive advisory lock (flock) on `<out>/.dsgrow.lock`, held for the process's life.

    flock is released by the kernel when the process dies, however it dies, so a killed run never
    leaves a stale lock; the file itself is left in place (it holds the last owner, for the message).
    """

    def __init__(self, out: Path):
        import fcntl

        self.path = Path(out) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"--out {out} is in use by another dsgrow run ({owner}); "
                              "wait for it to end or choose another --out (nothing was touched)") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def check_out_path(out: Path) -> None:
    """`--out` must be a folder or not exist yet (checked before any compute)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")


def find_leftovers(out: Path) -> list[Path]:
    """What a killed run leaves behind and no complete state points at: half-written checkpoints
    (`*.partial`), checkpoints caught mid-prune (`.trash-*`), universal conversions
    (`.universal*`) and atomic-write temporaries (`.<name>.tmp<pid>`, `.<name>.<random>.tmp`)."""
    out = Path(out)
    found = []
    for folder in (out, out / "checkpoints", out / "stages"):
        if folder.is_dir():
            for p in folder.iterdir():
                n = p.name
                if (n.endswith(".partial") or n.startswith((".trash-", ".universal"))
                        or (n.startswith(".") and ".tmp" in n)):
                    found.append(p)
    return found


def collect_leftovers(out: Path) -> list[str]:
    """Remove `find_leftovers(out)` and the last run's heartbeats. Only called while holding the
    `--out` lock: no live run can own any of them."""
    stale = find_leftovers(out)
    if (Path(out) / HEARTBEAT_DIR).is_dir():
        stale.append(Path(out) / HEARTBEAT_DIR)
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return [str(p) for p in stale]


class Heartbeat:
    """Every rank writes `<out>/.heartbeat/rank<R>` (a counter, its pid, host and step) from a
    daemon thread and watches the next rank's file (a ring: each file is read by one rank, so the
    shared file system sees O(world) small reads per interval, not O(world^2)). A rank whose
    file has not changed for `stall_s` seconds of the watcher's own clock (clock skew between
    nodes does not matter) is stopped, frozen or gone: its watcher prints one line naming it and
    exits, which makes the launcher (torchrun, deepspeed) end the job.

    A thread beats even while the main thread waits in a collective or a long C call that releases
    the GIL; it stops only when the whole process does (SIGSTOP, a frozen node, a crash)."""

    def __init__(self, out: Path, rank: int, world: int, stall_s: float,
                 on_stall: Optional[Callable[[str], None]] = None):
        self.dir = Path(out) / HEARTBEAT_DIR
        self.rank, self.world, self.stall_s = rank, world, float(stall_s)
        self.interval = max(0.2, min(5.0, self.stall_s / 5))
        self.step = 0  # the trainer's optimizer step, for the message
        self.on_stall = on_stall or _exit_job
        self._stop = threading.Event()
        self._count = 0
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (content, local time it last changed)
        self.stalled: list[int] = []
        self._thread: Optional[threading.Thread] = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat()

    def start(self) -> "Heartbeat":
        if self.world > 1:
            self._thread = threading.Thread(target=self._run, name="dsgrow-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is done (or closing): mark it so the others stop watching it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)
        try:
            (self.dir / f"rank{self.rank}").write_text(f"done {os.getpid()} {socket.gethostname()} {self.step}\n")
        except OSError:
            pass

    def _beat(self) -> None:
        self._count += 1
        path = self.dir / f"rank{self.rank}"
        tmp = self.dir / f".rank{self.rank}.tmp"
        tmp.write_text(f"{self._count} {os.getpid()} {socket.gethostname()} {self.step}\n")
        os.replace(tmp, path)  # a reader never sees half a line

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError:
                pass  # a full or flaky disk must not kill training; the collective timeout remains
            stalled = self.check(time.monotonic())
            if stalled is not None:
                self._kill_local_stalled()
                self.on_stall(stalled)
                return

    def _kill_local_stalled(self) -> None:
        """A stopped process ignores the launcher's SIGTERM (torchrun then waits 30 s before its
        SIGKILL): a stalled rank on this host is killed here, so the job ends within the bound."""
        import signal

        host = socket.gethostname()
        for r in self.stalled:
            try:
                _, pid, rank_host, _ = (self.dir / f"rank{r}").read_text().split()[:4]
                if rank_host == host and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def watched(self) -> list[int]:
        return [(self.rank + 1) % self.world] if self.world > 1 else []

    def check(self, now: float) -> Optional[str]:
        """One line naming the watched rank if it has stalled, else None."""
        stalled = []
        for r in self.watched():
            try:
                content = (self.dir / f"rank{r}").read_text().strip()
            except OSError:
                continue  # not started yet: the rendezvous and collective timeout cover that
            if content.startswith("done"):
                self._seen.pop(r, None)
                continue
            prev = self._seen.get(r)
            if prev is None or prev[0] != content:
                self._seen[r] = (content, now)
            elif now - prev[1] > self.stall_s:
                stalled.append((r, content, now - prev[1]))
        self.stalled = [s[0] for s in stalled]
        if not stalled:
            return None
        r, content, age = stalled[0]
        _, pid, host, step = (content.split() + ["?"] * 4)[:4]
        return (f"rank {r} (pid {pid} on {host}) stopped responding: no heartbeat for {age:.0f} s "
                f"(train.stall_timeout_s={self.stall_s:g}), last seen at step {step}; ending the job")


def _exit_job(line: str) -> None:
    print(f"dsgrow: error: {line}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)  # the main thread may be blocked in a collective: only a process exit ends it


__all__ = ["OutLock", "check_out_path", "find_leftovers", "collect_leftovers", "Heartbeat", "LOCK_FILE", "HEARTBEAT_DIR"]
