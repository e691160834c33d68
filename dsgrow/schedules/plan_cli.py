"""`dsgrow plan`: compute-optimal size and a growth plan for a budget.

    dsgrow plan --flops 1e21 [--fit epoch|hoffmann]
    dsgrow plan --tokens 1.4T            # the compute-optimal model for that many tokens
    dsgrow plan --params 70B             # the compute-optimal token count for that size
    dsgrow plan --gpu-hours 10000 --mfu 0.4 --peak-tflops 989
    dsgrow plan --flops 3e12 --progressive [--schedule single|doubling] [--write recipe.yaml]
                                         # model shapes and a runnable recipe (progressive_cli.py)

Standalone: python -m dsgrow.schedules.plan_cli --flops 1e21
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .batch import ScheduleError
from .budget import DEFAULT_FIT, FITS, compute_optimal, from_params, from_tokens, get_fit, gpu_hours_to_flops, parse_quantity
from .planner import human, plan_growth
from .progressive_cli import add_options as add_progressive_options
from .progressive_cli import misplaced as misplaced_progressive_options
from .progressive_cli import run_progressive

PROG = "dsgrow plan"
DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16


def _positive(what: str):
    def conv(text: str) -> float:
        try:
            return parse_quantity(text, what)
        except ScheduleError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1] if ": " in str(e) else str(e)) from None
    conv.__name__ = what
    return conv


def _fraction(what: str, allow_zero: bool = False):
    def conv(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not ((0.0 <= x if allow_zero else 0.0 < x) and x <= 1.0):
            raise argparse.ArgumentTypeError(f"{what} must be in {'[' if allow_zero else '('}0, 1], got {text!r}")
        return x
    conv.__name__ = what
    return conv


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plan options to `p`."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--flops", type=_positive("flops"), help="training budget in FLOPs (e.g. 1e21)")
    g.add_argument("--tokens", type=_positive("tokens"), help="token budget (e.g. 1.4T): plan for its compute-optimal model")
    g.add_argument("--params", type=_positive("params"), help="model size (e.g. 70B): plan for its compute-optimal tokens")
    g.add_argument("--gpu-hours", type=_positive("gpu hours"), help="GPU hours, converted with --mfu and --peak-tflops")
    p.add_argument("--mfu", type=_fraction("mfu"), default=None, help=f"model FLOPs utilisation with --gpu-hours (default {DEFAULT_MFU})")
    p.add_argument("--peak-tflops", type=_positive("peak tflops"), default=None,
                   help=f"peak TFLOP/s per GPU with --gpu-hours (default {DEFAULT_PEAK_TFLOPS:g}, H100 SXM bf16 dense)")
    p.add_argument("--fit", choices=sorted(FITS), default=DEFAULT_FIT, help=f"Chinchilla constants (default {DEFAULT_FIT})")
    p.add_argument("--transfer", type=_fraction("transfer", allow_zero=True), default=None,
                   help="fraction of the loss-matched tokens credited after growth (default 1, the ideal)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_progressive_options(p)
    p.set_defaults(func=run, _plan_parser=p)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on a `dsgrow` subparsers object; dispatch with args.func(args)."""
    p = subparsers.add_parser("plan", help="compute-optimal size and a growth plan for a FLOP/token budget",
                              description=__doc__.split("\n\n")[0])
    return configure(p)


def build_parser() -> argparse.ArgumentParser:
    return configure(argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0]))


def _error(args: argparse.Namespace, msg: str) -> int:
    parser = getattr(args, "_plan_parser", None)
    if parser is not None:
        parser.print_usage(sys.stderr)
    print(f"{parser.prog if parser is not None else PROG}: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Print the plan for parsed arguments; 0 on success, 2 on bad input (argparse-style message)."""
    gpu_hours = getattr(args, "gpu_hours", None)
    if gpu_hours is None and (args.mfu is not None or args.peak_tflops is not None):
        return _error(args, "--mfu and --peak-tflops only apply with --gpu-hours")
    given = [name for name in ("flops", "tokens", "params", "gpu_hours") if getattr(args, name, None) is not None]
    if len(given) != 1:
        return _error(args, "give exactly one of --flops, --tokens, --params, --gpu-hours")
    progressive = getattr(args, "progressive", False)
    misplaced = [] if progressive else misplaced_progressive_options(args)
    if misplaced:
        verb = "applies" if len(misplaced) == 1 else "apply"
        return _error(args, f"{', '.join(misplaced)} {verb} only with --progressive")
    if progressive and args.transfer is not None:
        return _error(args, "--transfer applies to the two-stage plan, not to --progressive")
    transfer = 1.0 if args.transfer is None else args.transfer
    fit = get_fit(args.fit)
    try:
        if args.flops is not None:
            flops, source = args.flops, "given"
        elif args.tokens is not None:
            n, d = from_tokens(args.tokens, fit=fit)
            flops, source = 6.0 * n * d, f"{human(d)} tokens at their compute-optimal model size"
        elif args.params is not None:
            n, d = from_params(args.params, fit=fit)
            flops, source = 6.0 * n * d, f"{human(n)} params at their compute-optimal token count"
        else:
            mfu = args.mfu if args.mfu is not None else DEFAULT_MFU
            peak = args.peak_tflops if args.peak_tflops is not None else DEFAULT_PEAK_TFLOPS
            flops = gpu_hours_to_flops(gpu_hours, mfu, peak)
            source = f"{gpu_hours:g} GPU hours x {mfu:g} MFU x {peak:g} TFLOP/s"
        if progressive:
            return run_progressive(args, flops, source, lambda msg: _error(args, msg))
        n_opt, d_opt = compute_optimal(flops, fit)
        plan = plan_growth(flops, fit, transfer=transfer)
    except ScheduleError as e:
        return _error(args, str(e))

    if args.json:
        print(json.dumps({"flops": flops, "budget": source, "fit": fit.name,
                          "compute_optimal": {"params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
                                              "loss": fit.loss(n_opt, d_opt)},
                          "plan": plan.to_dict()}, indent=2))
        return 0
    out = [
        f"budget: {flops:.3g} FLOPs ({source})",
        f"fit: {fit.name} ({fit.source})",
        "compute-optimal from scratch (C = 6 N D):",
        f"  parameters      {human(n_opt)} ({n_opt:.4g})",
        f"  tokens          {human(d_opt)} ({d_opt:.4g})",
        f"  tokens/param    {d_opt / n_opt:.1f}",
        f"  predicted loss  {fit.loss(n_opt, d_opt):.4f}",
        "growth plan (same budget, one growth event):",
        *plan.lines(),
        "assumptions:",
        *(f"  - {a}" for a in plan.assumptions),
    ]
    print("\n".join(out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message
        return int(e.code) if isinstance(e.code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
