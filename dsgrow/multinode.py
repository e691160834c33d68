"""Multi-node launches: hostfile validation and a preflight that runs before any compute.

Pure Python, no DeepSpeed import, about a second on a login node or a SLURM batch host:

    python -m dsgrow.multinode check --world 16 [--gpu] [--hostfile F] [--print-out] -- \\
        --recipe recipes/x.yaml --ds_config ds_configs/zero3.json --set train.lr=3e-4 --out runs/x

`check` takes, after `--`, the arguments `launchers/pretrain.py` will get, loads the recipe the
same way the launcher does, and checks at the job's world size what would otherwise fail only
after every node has started: each stage's batch arithmetic (`TrainConfig.check_world`), the
ds_config against every stage, a checkpoint already in the output folder (complete, and written
by as many ranks, so that a resume can load it), and the hostfile (every host resolves, slots are positive, no host
twice, the slots add up to the world). Bad input: one `dsgrow: error: ...` line and exit code 2.
`--world` defaults to the hostfile's slot count; `--gpu` resolves `train.precision: auto` as on a
GPU (bf16); `--print-out` prints the run's output folder (absolute) on stdout.

    python -m dsgrow.multinode hostfile launchers/hostfile.example [--world N]

validates a hostfile alone and prints its slot count. The SLURM node list is expanded by
`scontrol show hostnames` (launchers/slurm/pretrain.sbatch), never here.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence


class HostfileError(ValueError):
    """A hostfile that DeepSpeed's launcher would refuse or that cannot work; the message is one line."""


def parse_hostfile(path: str, resolve: bool = True) -> "OrderedDict[str, int]":
    """{host: slots} in file order from lines `HOST slots=N` (`#` starts a comment).

    Raises HostfileError naming the file and line for: a missing or empty file, a line of another
    shape, slots that are not a positive integer, a host listed twice, and (with `resolve`) a host
    name that does not resolve from this machine.
    """
    p = Path(path)
    if not p.is_file():
        raise HostfileError(f"hostfile not found: {p}")
    hosts: "OrderedDict[str, int]" = OrderedDict()
    first_line: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"hostfile {p}:{n}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise HostfileError(f"{where}: expected 'HOST slots=N', got {line!r}")
        host, value = parts[0], parts[1][len("slots="):]
        try:
            slots = int(value)
        except ValueError:
            raise HostfileError(f"{where}: slots must be a positive integer, got {value!r} for {host}") from None
        if slots <= 0:
            raise HostfileError(f"{where}: slots must be a positive integer, got {slots} for {host}")
        if host in hosts:
            raise HostfileError(f"{where}: host {host} is listed twice (first on line {first_line[host]})")
        if resolve:
            try:
                socket.getaddrinfo(host, None)
            except (socket.gaierror, UnicodeError) as e:
                reason = getattr(e, "strerror", None) or str(e)
                raise HostfileError(f"{where}: host {host!r} does not resolve from {socket.gethostname()} "
                                    f"({reason})") from None
        hosts[host] = slots
        first_line[host] = n
    if not hosts:
        raise HostfileError(f"hostfile {p} lists no host (lines are 'HOST slots=N')")
    return hosts


def check_hostfile(path: str, world: Optional[int] = None, resolve: bool = True) -> int:
    """Validate a hostfile (and that its slots add up to `world`, if given); returns the slot count."""
    hosts = parse_hostfile(path, resolve=resolve)
    total = sum(hosts.values())
    if world is not None and total != world:
        raise HostfileError(f"hostfile {path} has {total} slots on {len(hosts)} host(s) but the job has "
                            f"{world} ranks")
    return total


class LauncherArgsError(ValueError):
    """Arguments that launchers/pretrain.py would refuse."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # an unknown launcher option: one line, not argparse's usage text
        raise LauncherArgsError(f"launcher arguments: {message}")


def check_run(pretrain_args: Sequence[str], world: int, gpu: bool = False):
    """Load the recipe as launchers/pretrain.py would and run the trainer's own preflight at
    `world` ranks; returns the recipe. Raises ConfigError (a ValueError) with a one-line message."""
    from .launch import load_run_recipe, preflight, pretrain_parser

    args = pretrain_parser(_OneLineParser, add_help=False).parse_args(list(pretrain_args))
    recipe = load_run_recipe(args)
    pre = preflight(recipe, args.ds_config, world, gpu)
    # A checkpoint already in the output folder (a requeued job resumes from it): complete, and
    # loadable at this job's world size and ZeRO stage (directly, or through a universal
    # checkpoint), or the resume would fail only once the job has started. Sizes only: hashing a
    # large checkpoint on a login node would take minutes (the job itself checks the hashes).
    from .engine.checkpoint import latest_tag, resume_route, verify
    from .engine.ds_config import zero_stage

    root = Path(recipe.out) / "checkpoints"
    tag = latest_tag(root) if root.is_dir() else None
    if tag is not None:
        state = verify(root, tag, check_content=False)
        resume_route(state, root, tag, world, zero_stage(pre.ds_raw))
    return recipe


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m dsgrow.multinode",
                                description="Preflight checks for multi-node dsgrow launches (no DeepSpeed import).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="check a recipe (and a hostfile) at a world size before launching",
                       description="Arguments after `--` are the ones launchers/pretrain.py will get.")
    c.add_argument("--world", type=int, default=None, help="total ranks (default: the hostfile's slots)")
    c.add_argument("--hostfile", default=None, help="hostfile to validate ('HOST slots=N' lines)")
    c.add_argument("--gpu", action="store_true", help="ranks run on GPUs (precision auto -> bf16)")
    c.add_argument("--no-resolve", dest="resolve", action="store_false", help="do not resolve host names")
    c.add_argument("--print-out", action="store_true", help="print the run's output folder on stdout")
    h = sub.add_parser("hostfile", help="validate a hostfile and print its slot count")
    h.add_argument("path")
    h.add_argument("--world", type=int, default=None)
    h.add_argument("--no-resolve", dest="resolve", action="store_false")
    args = p.parse_args(argv)
    try:
        if args.cmd == "hostfile":
            if rest:
                raise HostfileError("`hostfile` takes no arguments after --")
            print(check_hostfile(args.path, args.world, args.resolve))
            return 0
        world = args.world
        if args.hostfile is not None:
            world = check_hostfile(args.hostfile, world, args.resolve)
        if world is None:
            raise HostfileError("check: give --world N or --hostfile F")
        recipe = check_run(rest, world, args.gpu)
        n = len(recipe.stage_plan())
        print(f"dsgrow: preflight ok: {n} stage(s), {world} rank(s), out {Path(recipe.out).resolve()}",
              file=sys.stderr)
        if args.print_out:
            print(Path(recipe.out).resolve())
    except ValueError as e:  # ConfigError, SpecError, HostfileError: one line, exit 2
        print(f"dsgrow: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
