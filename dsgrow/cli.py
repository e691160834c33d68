"""The `dsgrow` console script: `dsgrow train|grow|plan|prune|generate|score ...`.

Subcommands import their modules only when chosen, so `dsgrow plan` never pays for torch or
deepspeed start-up.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: dsgrow COMMAND [ARGS]

commands:
  train     pretrain (or continue) a run: same arguments as launchers/pretrain.py
  grow      grow a small Hugging Face model into a larger one (ligo, stack, fpi, aki, ...)
  plan      compute-optimal sizes and a growth plan for a token or FLOP budget
  prune     score a corpus's blocks with a trained model and keep a fraction (kept list + histogram)
  generate  generation from a model, optionally with a small draft model (assisted generation)
  score     per-block loss of a corpus, optionally by a small-then-large cascade

`dsgrow COMMAND --help` describes each one."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "train":
        from .launch import main as train_main

        return train_main(rest)
    if cmd == "grow":
        from .growth.cli import main as grow_main

        return grow_main(rest)
    if cmd == "plan":
        from .schedules.plan_cli import main as plan_main

        return plan_main(rest)
    if cmd == "prune":
        from .data.prune_cli import main as prune_main

        return prune_main(rest)
    if cmd in ("generate", "score"):
        from .infer import cli as infer_cli

        return getattr(infer_cli, cmd)(rest)
    if cmd in ("--version", "version"):
        from . import __version__

        print(__version__)
        return 0
    print(f"dsgrow: error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
